"""`ppl-models sample | score | fill-in | infer` on a tiny trained run, as a user calls them: real
files in, JSON, PNG and .npy out, and every bad input ending with one line and exit status 2."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import run_cli
from PIL import Image

from ppl_models import load, read_digits
from ppl_models.cli import main
from ppl_models.config import SettingError


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A 2-epoch SBN (M = 4, score-function guide) on 300 random binary digits, its data beside it."""
    root = tmp_path_factory.mktemp("use")
    rng = np.random.default_rng(0)
    (root / "data").mkdir()
    np.savez(root / "data" / "binarized_mnist.npz", **{split: (rng.random((n, 784)) < 0.2).astype(np.uint8)
                                                       for split, n in (("train", 300), ("valid", 50), ("test", 50))})
    out = root / "run"
    assert run_cli("--model", "sbn", "--latents", "4", "--guide", "bernoulli", "--dataset", "binarized-mnist",
                   "--data-dir", str(root / "data"), "--epochs", "2", "--batch-size", "50", "--eval-samples", "10",
                   "--out", str(out)) == 0
    return out


def answer(capsys, *argv):
    assert main([str(a) for a in argv]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def refused(capsys, *argv):
    """The one line a bad input ends with (argparse's own errors exit through SystemExit)."""
    try:
        status = main([str(a) for a in argv])
    except SystemExit as exit:
        status = exit.code
    assert status == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


def test_sample_writes_digits_figure_and_array(trained_run, tmp_path, capsys):
    result = answer(capsys, "sample", trained_run, "-n", "12", "--out", tmp_path / "s.png", "--npy", tmp_path / "s.npy")
    assert result["samples"] == 12 and "sigmoid belief net with 4 binary latents" in result["model"]
    digits = np.load(tmp_path / "s.npy")
    assert digits.shape == (12, 784) and set(np.unique(digits)) <= {0.0, 1.0}
    assert Image.open(tmp_path / "s.png").size[0] > 200


def test_score_of_the_runs_test_split_is_the_number_metrics_json_has(trained_run, capsys):
    result = answer(capsys, "score", trained_run, "test:0-49", "--quiet")
    metrics = json.loads((trained_run / "metrics.json").read_text())["final"]["test"]
    assert result["estimator"] == "exact" and result["digits"] == 50
    assert result["mean"] == pytest.approx(metrics["exact"], abs=1e-4)
    iwae = answer(capsys, "score", trained_run, "test:0-49", "--estimator", "iwae-10", "--quiet")
    assert iwae["mean"] == pytest.approx(metrics["iwae-10"], abs=1e-4)
    assert list(result["per digit"])[:2] == ["test:0", "test:1"] and result["standard error over digits"] > 0


def test_an_image_of_any_size_drawn_dark_on_light_is_inverted_and_scored(trained_run, tmp_path, capsys):
    picture = np.full((96, 80), 255, np.uint8)  # white paper
    picture[20:76, 36:44] = 0  # a black stroke: a "1"
    Image.fromarray(picture).save(tmp_path / "one.png")
    digit = np.zeros((28, 28), np.uint8)
    digit[6:22, 12:16] = 1
    np.save(tmp_path / "digits.npy", np.stack([digit, digit]))  # (N, 28, 28) 0/1 values
    assert main(["score", str(trained_run), str(tmp_path / "one.png"), str(tmp_path / "digits.npy")]) == 0
    captured = capsys.readouterr()
    assert "one.png: dark on light, inverted to the training data's light on dark" in captured.err
    scores = json.loads(captured.out)["per digit"]
    assert list(scores) == [str(tmp_path / "one.png"), f"{tmp_path / 'digits.npy'}[0]", f"{tmp_path / 'digits.npy'}[1]"]
    model = load(trained_run)
    assert scores[f"{tmp_path / 'digits.npy'}[0]"] == pytest.approx(model.log_prob(digit).mean, abs=1e-4)
    notes = []  # the same files from Python read as the same digits
    x, names = read_digits([str(tmp_path / "one.png"), str(tmp_path / "digits.npy")], model, notes.append)
    assert names == list(scores) and any("inverted" in note for note in notes)
    assert model.log_prob(x).log_prob.tolist() == pytest.approx(list(scores.values()), abs=1e-4)
    one, _ = read_digits(tmp_path / "one.png", model, notes.append)  # one file, as a Path
    assert torch.equal(one, x[:1])
    with pytest.raises(SettingError, match="no digits to read"):
        read_digits([], model)


def test_fill_in_writes_the_completion_figure_and_exact_numbers(trained_run, tmp_path, capsys):
    result = answer(capsys, "fill-in", trained_run, "test:0-3", "--observe", "bottom", "--out", tmp_path / "f.png",
                    "--npy", tmp_path / "f.npy", "--num-samples", "2")
    assert result["estimator"] == "exact" and len(result["per digit"]) == 4
    assert np.load(tmp_path / "f.npy").shape == (4, 784)
    assert Image.open(tmp_path / "f.png").size[1] > 300  # five rows: observed, probabilities, 2 samples, truth
    mask = np.zeros((28, 28), np.uint8)
    mask[:, :10] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    assert main(["fill-in", str(trained_run), "test:0", "--observe", str(tmp_path / "mask.png"), "--method",
                 "importance", "--draws", "200", "--json", str(tmp_path / "numbers.json")]) == 0
    assert capsys.readouterr().out == ""  # the numbers went to the file
    numbers = json.loads((tmp_path / "numbers.json").read_text())
    assert numbers["estimator"].startswith("estimate: importance sampling") and "effective sample size" in \
        numbers["diagnostics"]


def test_compiled_scores_and_fill_ins_are_the_eager_ones(trained_run, capsys):
    for command in (["score", "--estimator", "iwae-50"], ["fill-in", "--observe", "top", "--method", "importance"]):
        eager, compiled = (answer(capsys, command[0], trained_run, "test:0-9", *command[1:], "--compile", setting,
                                  "--quiet") for setting in ("off", "on"))
        assert compiled["per digit"] == pytest.approx(eager["per digit"], abs=1e-3), command[0]


def test_infer_reports_the_posterior_and_its_method(trained_run, tmp_path, capsys):
    exact = answer(capsys, "infer", trained_run, "test:5", "--out", tmp_path / "i.png")
    assert exact["exact"] and set(exact["posterior"]) == {"p(z_m = 1 | x)", "most probable z"}
    assert len(exact["posterior"]["p(z_m = 1 | x)"]["test:5"]) == 4
    estimate = answer(capsys, "infer", trained_run, "test:5", "--observe", "random:0.5", "--method", "prior")
    assert not estimate["exact"] and "q(z | x) mean" in estimate["posterior"]


@pytest.mark.parametrize("argv,message", [
    (["score", "{missing}", "test:0"], "is not a training run"),
    (["score", "{run}", "{tmp}/nothing.png"], "no file"),
    (["score", "{run}", "{tmp}/garbage.png"], "cannot read"),
    (["score", "{run}", "{tmp}/wrong.npy"], "wrong.npy: digits must be (784,) or (N, 784) arrays, or 28 x 28 images"),
    (["score", "{run}", "test:60"], "has 50 digits"),
    (["score", "{run}", "test:3-1"], "give digit indices as 0-15"),
    (["score", "{run}", "test:0", "--estimator", "iwae"], "unknown --estimator iwae"),
    (["fill-in", "{run}", "test:0", "--observe", "{tmp}/none.png"], "marks no pixel of digit 0 as observed"),
    (["fill-in", "{run}", "test:0", "--observe", "{tmp}/all.png"], "marks every pixel of digit 0 as observed"),
    (["fill-in", "{run}", "test:0", "--observe", "middle"], "unknown --observe middle"),
    (["fill-in", "{run}", "test:0", "--observe", "top", "--method", "nuts"], "choose one of: exact, importance, prior"),
    (["infer", "{run}", "test:0", "--draws", "0", "--method", "prior"],
     "--draws must be a positive integer up to 1,000,000, got 0"),
    (["sample", "{run}", "-n", "0"], "must be a positive integer"),
    (["sample", "{run}", "-n", "2", "--npy", "{tmp}/missing/x.npy"], "x.npy"),
    (["sample", "{run}", "--device", "bogus"], "--device bogus is not a device"),
    (["score", "{run}", "test:1-"], "give digit indices as 0-15"),
    (["score", "{run}", "{tmp}/negative.npy"], "give digits as 0/1 or grayscale"),
    (["score", "{run}", "{tmp}/tiny.png"], "too small to hold a digit"),
    (["score", "{run}", "test:0", "--estimator", "iwae-99999999999"], "at most iwae-1,000,000"),
    (["score", "{run}", "test:0", "--draws", "1.5"], "argument --draws: invalid int value"),
    (["sample", "{run}", "-n", "100000000000000000000"], "-n must be a positive integer up to 1,000,000, got 10000"),
    (["fill-in", "{run}", "test:0", "--observe", "top", "--warmup", "-1"],
     "--warmup must be an integer from 0 up to 1,000,000, got -1"),
    (["score", "{run}", "test:0-99999999999"], "has 50 digits"),
    (["score", "{run}", "{tmp}/animated.gif"], "holds 2 frames (an animated or multi-page image)"),
    (["bogus"], "invalid choice: 'bogus'"),
])
def test_every_bad_input_ends_with_one_line(trained_run, tmp_path, capsys, argv, message):
    (tmp_path / "garbage.png").write_bytes(b"not an image")
    np.save(tmp_path / "wrong.npy", np.zeros((3, 5)))
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(tmp_path / "none.png")
    Image.fromarray(np.full((28, 28), 255, np.uint8)).save(tmp_path / "all.png")
    Image.fromarray(np.zeros((1, 1), np.uint8)).save(tmp_path / "tiny.png")
    np.save(tmp_path / "negative.npy", -np.ones(784))
    Image.new("L", (28, 28)).save(tmp_path / "animated.gif", save_all=True,
                                  append_images=[Image.new("L", (28, 28), 255)])
    filled = [a.format(run=trained_run, tmp=tmp_path, missing=tmp_path / "missing") for a in argv]
    assert message in refused(capsys, *filled)


def test_the_installed_command_and_python_m_run_the_same_cli(trained_run):
    done = subprocess.run([sys.executable, "-m", "ppl_models", "sample", str(trained_run), "-n", "2"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and json.loads(done.stdout)["samples"] == 2
    help_text = subprocess.run([sys.executable, "-m", "ppl_models", "train", "--help"], capture_output=True, text=True,
                               timeout=120).stdout
    assert help_text.startswith("usage: ppl-models train") and "--components" in help_text


def test_loaded_digits_of_any_dtype_score_alike(trained_run):
    model = load(trained_run)
    digits = np.load(trained_run.parent / "data" / "binarized_mnist.npz")["test"][:3]
    reference = model.log_prob(digits).log_prob
    for same in (digits.astype(bool), digits.astype(np.float64), torch.as_tensor(digits).reshape(3, 28, 28)):
        assert torch.equal(model.log_prob(same).log_prob, reference)
