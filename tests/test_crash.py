"""Crash safety with a real process: SIGKILL mid-run, then --resume ends where an uninterrupted
run ends (CPU, same seed)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import run

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.filterwarnings("ignore:`jit=True` compiles with TorchScript:FutureWarning")
@pytest.mark.parametrize("compiled", [["--compile", "off"], ["--jit"], ["--compile"]])
def test_sigkill_then_resume_matches_an_uninterrupted_run(offline, tiny_binarized, tmp_path, compiled):
    args = [*compiled, "--model", "mixture", "--guide", "sampled", "--components", "3", "--dataset", "binarized-mnist",
            "--data-dir", str(tiny_binarized), "--epochs", "60", "--batch-size", "50", "--eval-every", "7", "--quiet",
            "--no-download"]

    killed = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, str(ROOT / "run.py"), *args, "--out", str(killed)], cwd=tmp_path,
                               env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (killed / "checkpoint.pt").exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # into a later epoch
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    progress = torch.load(killed / "checkpoint.pt", weights_only=True)["progress"]
    assert 1 <= progress["epoch"] < 60, progress  # the kill landed mid-run, after a checkpoint
    assert not (killed / "metrics.json").exists()

    assert run.main(["--resume", str(killed), "--quiet", "--no-download"]) == 0
    assert run.main([*args, "--out", str(tmp_path / "straight")]) == 0
    resumed, straight = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("killed", "straight"))
    assert resumed["final"] == straight["final"]
    params = [torch.load(tmp_path / d / "checkpoint.pt", weights_only=True)["params"] for d in ("killed", "straight")]
    assert all(torch.equal(params[0][name], params[1][name]) for name in params[1])
