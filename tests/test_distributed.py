"""Data-parallel training and evaluation (ppl_models.distributed) against one process: two CPU
processes joined by gloo over loopback, started by torch.multiprocessing (the library) and by
torchrun (the command line).

Tolerances are measured, not guessed: two processes sum the shards' gradients where one sums the
whole batch inside its matrix products, and that reduction order moves params after 20 steps by
3e-6 (the mixture, RMSprop), 3e-7 (the SBN) and 1e-7 (the VAE) here, and by 1e-4 for the K=20
mixture on 2,000 binarized-mnist digits (RMSprop and Adam divide by the gradients' size, so rounding
in a near-zero gradient can move its param by up to the learning rate's order). Evaluation at the
same params agrees to float32 rounding.
"""

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import nullcontext
from datetime import timedelta
from pathlib import Path

import pyro
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from pyro import poutine
from pyro.infer import Trace_ELBO

from ppl_models import distributed, files
from ppl_models.cli import train as cli
from ppl_models.config import Config, SettingError
from ppl_models.data import Dataset, load_dataset
from ppl_models.distributed import (
    ONE_PROCESS,
    SameDraws,
    World,
    collective_timeout,
    current,
    launcher_store,
    sendable,
    start,
)
from ppl_models.evaluate import per_digit_estimate
from ppl_models.models import FAMILIES, family_of
from ppl_models.models.sbn import check_enumerable
from ppl_models.rundir import TrainingError
from ppl_models.train import evaluation_rng, train

ROOT = Path(__file__).resolve().parents[1]
QUIET = dict(progress=False, log=lambda line: None)
PARAM_TOLERANCE = 1e-4  # after 20 steps (see the module's docstring); different draws move params by 1e-2 or more

# 600 training digits in batches of 30: 20 steps an epoch.
CASES = {
    "mixture-enum": dict(model="mixture", guide="enum", model_args={"components": 4}, optimizer="rmsprop", lr=0.01),
    "sbn-bernoulli": dict(model="sbn", guide="bernoulli", model_args={"latents": 6, "baseline": "neural"},
                          optimizer="adam", lr=0.003),
    "vae-normal": dict(model="vae", guide="normal", model_args={"z_dim": 3, "hidden": [40, 40]}, optimizer="adam",
                       lr=0.003),
    "vae-normal-compiled": dict(model="vae", guide="normal", model_args={"z_dim": 3, "hidden": [40, 40]},
                                optimizer="adam", lr=0.003, compile=True),  # SameDraws traced into the graph
    "vae-iaf": dict(model="vae", guide="iaf", model_args={"z_dim": 3, "hidden": [40, 40], "flows": 2},
                    optimizer="adam", lr=0.003),  # SameDraws transforms its rows only
}
# k particles left of the data plate: the same random numbers, laid out differently (equal in distribution)
LAID_OUT_DIFFERENTLY = {
    "sbn-vimco": dict(model="sbn", guide="bernoulli", elbo="vimco", particles=3, model_args={"latents": 6},
                      optimizer="adam", lr=0.003),
}
EARLY_STOPPING = dict(model="mixture", guide="sampled", model_args={"components": 4}, optimizer="adam", lr=0.01,
                      epochs=3, patience=1, batch_size=90)  # 6 steps an epoch
ESTIMATORS = {"mixture-enum": ["exact"], "sbn-bernoulli": ["exact", "elbo", "iwae-7"], "vae-normal": ["elbo", "iwae-7"],
              "vae-normal-compiled": ["elbo"], "vae-iaf": ["elbo"]}


def config(case, **overrides):
    settings = {**CASES, **LAID_OUT_DIFFERENTLY, "early-stopping": EARLY_STOPPING}[case]
    return Config(**{**dict(batch_size=30, epochs=1, eval_every=7, eval_digits=90, eval_samples=0), **settings,
                     **overrides})


def dataset():
    from conftest import sample_prototype_digits  # the workers import it too, from tests/

    splits = {split: sample_prototype_digits(n, seed=seed)  # test: not a multiple of the batch or the world
              for split, n, seed in (("train", 600, 1), ("valid", 90, 3), ("test", 130, 2))}
    return Dataset(name="tiny", binarize="threshold", images={split: x for split, (x, _) in splits.items()},
                   labels={split: labels for split, (_, labels) in splits.items()},
                   sources=dict.fromkeys(splits, "generated"), seed=0)


def fit(case, run_dir, resume=False, **overrides):
    cfg = config(case, **overrides)
    model = family_of(cfg.model)(**cfg.model_args)
    summary = train(model, dataset(), cfg, run_dir, resume=resume, **QUIET)
    return model, summary


def estimates(model, case, world):
    """{estimator: per-digit values on the test digits} at the model's current params, and of the
    top half of each digit given the bottom ('<estimator> | top')."""
    x = dataset().binary("test")
    top = torch.zeros_like(x, dtype=torch.bool)
    top[:, :392] = True
    values = {}
    with evaluation_rng(0, torch.device("cpu")), torch.no_grad():
        for name in ESTIMATORS[case]:
            for label, observed in ((name, None), (f"{name} | top", top)):
                values[label] = per_digit_estimate(model, CASES[case]["guide"], x, name, memory_floats=40 * 784,
                                                   observed=observed, world=world)
    return values


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def worker(rank, port, out):
    """One of two processes: every case trained for 20 steps, evaluation sharded and not, a
    one-process checkpoint resumed, a run begun for the parent to resume alone, a step that fails
    in rank 1 only; rank 1 notes every file it writes."""
    sys.path.insert(0, str(ROOT / "tests"))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    assert current() == World(rank, 2)
    written, open_part = [], files.open_part
    if rank:
        files.open_part = lambda path: written.append(str(path)) or open_part(path)
    results = {}
    for case in CASES:
        pyro.clear_param_store()
        model, summary = fit(case, out / case)
        results[case] = dict(summary=summary, sharded=estimates(model, case, current()),
                             alone=estimates(model, case, ONE_PROCESS))
    for case in [*LAID_OUT_DIFFERENTLY, "early-stopping"]:
        results[case] = fit(case, out / case)[1]
    results["failed step"] = failing_step(rank, out / "failing")
    try:
        check_enumerable(30)
    except SettingError as refusal:
        results["refusal"] = str(refusal)
    pyro.clear_param_store()
    fit("vae-normal", out / "one-then-two", epochs=2, resume=True)
    pyro.clear_param_store()
    fit("vae-normal", out / "two-then-one")
    torch.save(results if rank == 0 else dict(written=written, failed_step=results["failed step"]),
               out / ("results.pt" if rank == 0 else "rank 1.pt"))
    dist.barrier()
    # Ends here, without the interpreter's teardown: rank 0 keeps the group's store, whose threads
    # can abort a process that tears them down while the other rank still talks to them (seen once).
    os._exit(0)


def failing_step(rank, run_dir):
    """The message each rank stops with when rank 1's second step meets an invalid value."""
    calls, loss_and_grads = [], Trace_ELBO.loss_and_grads

    def fail_in_rank_1(self, *args):
        calls.append(1)
        if rank == 1 and len(calls) == 2:
            raise ValueError("Expected parameter loc (Tensor of shape (15, 3)) of distribution Normal to satisfy the "
                             "constraint Real(), but found invalid values")
        return loss_and_grads(self, *args)

    Trace_ELBO.loss_and_grads = fail_in_rank_1
    try:
        fit("vae-normal", run_dir)
    except TrainingError as error:
        return str(error)
    finally:
        Trace_ELBO.loss_and_grads = loss_and_grads


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """The workers' run directories and results, and one process's runs of the same."""
    out = tmp_path_factory.mktemp("distributed")
    pyro.clear_param_store()
    fit("vae-normal", out / "one-then-two")  # epoch 1 of 2 in one process, for the workers to finish
    mp.start_processes(worker, args=(free_port(), out), nprocs=2, start_method="spawn")
    return out


def checkpoint_params(run_dir):
    return torch.load(run_dir / "checkpoint.pt", weights_only=True)["params"]


def assert_same_params(run_dir, other_dir, tolerance=PARAM_TOLERANCE):
    ours, theirs = checkpoint_params(run_dir), checkpoint_params(other_dir)
    assert ours.keys() == theirs.keys()
    gap = max((ours[name] - theirs[name]).abs().max().item() for name in ours)
    assert gap < tolerance, gap


@pytest.mark.parametrize("case", CASES)
def test_two_processes_take_the_steps_one_process_takes(two_processes, tmp_path, case):
    model, summary = fit(case, tmp_path / case)
    assert_same_params(two_processes / case, tmp_path / case)
    theirs = torch.load(two_processes / "results.pt", weights_only=False)[case]["summary"]
    for split, values in summary["final"].items():
        for name, value in values.items():
            assert theirs["final"][split][name] == pytest.approx(value, abs=1e-3), (split, name)


@pytest.mark.parametrize("case", CASES)
def test_sharded_evaluation_equals_one_process(two_processes, case):
    results = torch.load(two_processes / "results.pt", weights_only=False)[case]
    assert len(results["sharded"]) == 2 * len(ESTIMATORS[case])  # each estimator of whole digits and of top halves
    for name, values in results["sharded"].items():
        assert values.shape == (130,)
        torch.testing.assert_close(values, results["alone"][name], rtol=1e-6, atol=1e-4)


@pytest.mark.parametrize("case", LAID_OUT_DIFFERENTLY)
def test_particles_left_of_the_data_plate_draw_as_many_numbers_as_one_process(two_processes, tmp_path, case):
    """Other draws than one process's (laid out differently), as many: the random state stays in step."""
    fit(case, tmp_path / case)
    ours, theirs = (torch.load(d / case / "checkpoint.pt", weights_only=True) for d in (tmp_path, two_processes))
    assert torch.equal(ours["rng"]["torch"], theirs["rng"]["torch"])
    assert all(torch.isfinite(p).all() for p in theirs["params"].values())


def test_early_stopping_in_two_processes_stops_as_one_process(two_processes, tmp_path):
    _, summary = fit("early-stopping", tmp_path / "alone")
    together = torch.load(two_processes / "results.pt", weights_only=False)["early-stopping"]["early_stopping"]
    alone = summary["early_stopping"]
    assert {key: together[key] for key in ("best_epoch", "epochs_trained", "stopped_early")} == \
        {key: alone[key] for key in ("best_epoch", "epochs_trained", "stopped_early")}
    assert [score for _, score in together["valid_scores"]] == pytest.approx(
        [score for _, score in alone["valid_scores"]], abs=1e-3)
    assert_same_params(two_processes / "early-stopping", tmp_path / "alone")


def test_rank_0_alone_writes(two_processes):
    assert torch.load(two_processes / "rank 1.pt", weights_only=False)["written"] == []
    assert (two_processes / "vae-normal" / "metrics.csv").exists()


def test_a_step_that_fails_in_one_rank_stops_every_rank_at_that_step(two_processes):
    rank_0 = torch.load(two_processes / "results.pt", weights_only=False)["failed step"]
    rank_1 = torch.load(two_processes / "rank 1.pt", weights_only=False)["failed_step"]
    assert rank_0.startswith("the loss became nan at step 2 (epoch 1)"), rank_0
    assert rank_1.startswith("training diverged at step 2 (epoch 1): Expected parameter loc"), rank_1


def test_checkpoints_resume_in_another_number_of_processes(two_processes, tmp_path):
    pyro.clear_param_store()
    fit("vae-normal", tmp_path / "straight", epochs=2)
    assert_same_params(two_processes / "one-then-two", tmp_path / "straight")  # 1 process, then 2
    pyro.clear_param_store()
    fit("vae-normal", two_processes / "two-then-one", epochs=2, resume=True)  # 2 processes, then 1
    assert_same_params(two_processes / "two-then-one", tmp_path / "straight")


def test_the_sbn_refusal_estimates_the_cost_per_process(two_processes):
    refusal = torch.load(two_processes / "results.pt", weights_only=False)["refusal"]
    assert re.search(r"about 215 GB for its share of a batch's log-likelihood table and [\d.]+ hours per step in each "
                     r"of 2 processes", refusal), refusal


def test_the_sbn_sums_its_codes_in_shares():
    model = family_of("sbn")(latents=5)
    pyro.get_param_store().clear()
    x = dataset().binary("test")[:20]
    b, w, c = model.params()
    codes = torch.tensor([[(code >> (4 - m)) & 1 for m in range(5)] for code in range(32)], dtype=torch.float)
    joint = [torch.distributions.Bernoulli(logits=b).log_prob(z).sum() +  # brute force: one code at a time
             torch.distributions.Bernoulli(logits=z @ w + c).log_prob(x).sum(-1) for z in codes]
    parts = torch.stack([model.log_likelihood(x, share=(rank, 3)) for rank in range(3)])  # 11, 11 and 10 codes
    torch.testing.assert_close(torch.logsumexp(parts, 0), torch.logsumexp(torch.stack(joint), 0).detach())
    assert torch.isinf(model.log_likelihood(x, share=(40, 41))).all()  # more shares than codes: an empty one


def test_cuda_with_fewer_gpus_than_processes_is_refused_before_joining(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(SettingError, match=r"^`device='cuda'` with 4 processes on this machine needs 4 GPUs, one "
                                           r"per process, and PyTorch sees 2; start at most 2 \(torchrun "
                                           r"--nproc_per_node\)$"):
        start("cuda")
    with pytest.raises(SettingError, match=r"`device='cuda:1'` names one GPU, but each of the 4 processes takes its "
                                           r"own \(GPU LOCAL_RANK\); use `device='cuda'`"):
        start("cuda:1")
    assert not dist.is_initialized()


def test_an_error_that_cannot_reach_the_other_ranks_is_sent_as_its_text():
    error = ValueError("bad input")
    error.handle = lambda: None  # a lambda does not pickle
    sent = sendable(error)
    assert type(sent) is RuntimeError and str(sent) == "ValueError: bad input"
    picklable = SettingError("`lr` must be positive")
    assert sendable(picklable) is picklable


def test_the_ranks_that_stopped_are_those_whose_heartbeat_stopped(monkeypatch):
    """Three ranks: 0 (this process) and 1 alive, 1 perhaps blocked in a collective (its heartbeat is a
    thread of its own), 2 gone; a store kept by a launcher, as torchrun's agent keeps it."""
    port = free_port()
    launcher = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    rank_1 = launcher_store()
    rank_1.add(distributed.key("beat/2"), 5)  # rank 2 beat a few times, then stopped
    distributed.start_heartbeat(0)
    beating = threading.Event()

    def rank_1_beats():
        while not beating.wait(0.1):
            rank_1.add(distributed.key("beat/1"), 1)

    threading.Thread(target=rank_1_beats, daemon=True).start()
    try:
        assert distributed.stopped_ranks(World(0, 3), wait=0.5) == [2]
        distributed.leave_word(2, "no data on this machine")
        assert distributed.last_words([1, 2]) == {2: "no data on this machine"}
        assert distributed.first_to_report() and not distributed.first_to_report()  # one rank says it
    finally:
        beating.set()
        distributed.stop()
        monkeypatch.setattr(distributed, "_store", None)
    assert launcher.add(distributed.key("beat/0"), 0) > 0


def test_the_iaf_guide_draws_one_process_values_and_passes_each_flow_once_per_rank():
    """Its rows of the global batch's base draw, through the flows: one pass each, and log q read from
    their cache (a row of the flows' output for the global batch would be inverted afresh, one pass
    of each flow per latent dimension)."""
    model = family_of("vae")(z_dim=4, hidden=(20, 20), flows=2)
    x = dataset().binary("test")[:6]
    passes = []
    for flow in model.flows:
        flow.arn.register_forward_hook(lambda *args: passes.append(1))

    def draw(world):
        pyro.set_rng_seed(0)
        with SameDraws(world) if world.size > 1 else nullcontext():
            trace = poutine.trace(model.guide_iaf).get_trace(world.shard(x))
        trace.compute_log_prob()  # log q(z | x), as the ELBO reads it
        return trace.nodes["z"]["value"]

    alone = draw(ONE_PROCESS)
    passes.clear()
    torch.testing.assert_close(torch.cat([draw(World(rank, 2)) for rank in (0, 1)]), alone)
    assert len(passes) == 2 * len(model.flows)


def test_a_collective_waits_as_long_as_the_environment_says(monkeypatch):
    monkeypatch.delenv("PPL_MODELS_TIMEOUT", raising=False)
    assert collective_timeout() == timedelta(minutes=10)
    monkeypatch.setenv("PPL_MODELS_TIMEOUT", "2.5")
    assert collective_timeout() == timedelta(seconds=2.5)
    monkeypatch.setenv("PPL_MODELS_TIMEOUT", "soon")
    with pytest.raises(SettingError, match=r"^\$PPL_MODELS_TIMEOUT=soon is not a number of seconds; set it to how "
                                           r"long a rank waits for the others \(default 600\), or unset it$"):
        collective_timeout()


def documented_torchrun_commands():
    """Every torchrun command that starts a run in docs/distributed.md, `run.py --help` and the
    distributed module's docstring, as its words."""
    texts = [(ROOT / "docs" / "distributed.md").read_text(), cli.__doc__, distributed.__doc__]
    lines = re.sub(r"\\\n\s*", " ", "\n".join(texts)).splitlines()  # continuation lines joined
    commands = [shlex.split(line[line.index("torchrun "):].split("#")[0].split("`")[0]) for line in lines
                if re.search(r"torchrun .*run\.py --model", line)]
    assert len(commands) >= 5
    return commands


@pytest.mark.parametrize("command", documented_torchrun_commands(), ids=" ".join)
def test_the_documented_torchrun_commands_are_accepted(command):
    """Their processes split the batch, and one machine's launch takes a free port (plain torchrun
    takes 29500, which any other job may hold)."""
    def given(name, default):
        return command[command.index(name) + 1] if name in command else default

    processes = int(given("--nproc_per_node", 1)) * int(given("--nnodes", 1))
    batch = int(given("--batch-size", FAMILIES[given("--model", cli.DEFAULT_MODEL)].training_defaults["batch_size"]))
    assert batch % processes == 0
    assert "--nnodes" in command or "--standalone" in command


# ---- the command line under torchrun ---------------------------------------------------------
def torchrun(*args, processes=2, script=ROOT / "run.py", launcher=(), env=(), **popen):
    """torchrun (its own flags `launcher`) starting `script` with `args` (and `env` added to the
    environment); `popen` overrides Popen's arguments (stdout and stderr are pipes, as text)."""
    meeting = [] if "--standalone" in launcher else ["--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), *meeting, *launcher,
               str(script), *args, "--quiet", "--no-download"]
    env = {**{name: value for name, value in os.environ.items() if name != "PPL_MODELS_DATA"},  # may be relative
           "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **dict(env)}
    return subprocess.Popen(command, env=env, **{"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True,
                                                 **popen})


def our_lines(stderr):
    """Our own error lines (torchrun adds its report of the failed processes after them)."""
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def test_bad_settings_end_every_rank_with_one_line(tiny_binarized, tmp_path):
    process = torchrun("--model", "mixture", "--dataset", "binarized-mnist", "--data-dir", str(tiny_binarized),
                       "--batch-size", "25", "--out", str(tmp_path / "run"), cwd=tmp_path)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode != 0
    assert our_lines(stderr) == ["error: --batch-size 25 does not split evenly over 2 processes, each of which "
                                 "takes an equal share of every batch; use --batch-size 24 or --batch-size 26 (the "
                                 "global batch: the processes take together the step one process takes on it, so --lr "
                                 "needs no change)"]
    assert re.search(r"exitcode\s*: 2 ", stderr)  # in torchrun's report of the failed processes
    assert "digits from" not in stdout  # refused before any data was loaded


def rank_pid(launcher, rank):
    """The pid of the worker process of `rank` that torchrun started."""
    for entry in Path("/proc").iterdir():
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if parent == launcher and f"RANK={rank}".encode() in environ:
            return int(entry.name)
    return None


def wait_for_a_checkpoint(run_dir, old=None):
    """Until `run_dir` holds a checkpoint other than `old` (its mtime)."""
    deadline = time.time() + 120
    while time.time() < deadline and (not (run_dir / "checkpoint.pt").exists()
                                      or (run_dir / "checkpoint.pt").stat().st_mtime_ns == old):
        time.sleep(0.05)


def signal_rank_1(run_dir, signum, *args, processes):
    """torchrun's ranks training into `run_dir` until it has a checkpoint, then `signum` to rank 1;
    returns (torchrun's exit status, our error lines, all it printed to stderr)."""
    old = (run_dir / "checkpoint.pt").stat().st_mtime_ns if (run_dir / "checkpoint.pt").exists() else None
    process = torchrun(*args, processes=processes, cwd=run_dir.parent)
    wait_for_a_checkpoint(run_dir, old)
    victim = rank_pid(process.pid, 1)
    assert victim, "no rank 1 found"
    os.kill(victim, signum)
    stdout, stderr = process.communicate(timeout=120)
    assert str(ROOT / "ppl_models") not in stderr  # no traceback of ours (torchrun prints one of its own)
    assert stdout.count("binarized-mnist (static binarization)") == 1  # log lines from rank 0 only
    return process.returncode, our_lines(stderr), stderr


def test_a_signalled_or_killed_rank_ends_the_job_with_one_line_and_the_run_resumes(tiny_binarized, tmp_path):
    run_dir = tmp_path / "run"
    args = ["--model", "mixture", "--guide", "sampled", "--components", "3", "--dataset", "binarized-mnist",
            "--data-dir", str(tiny_binarized), "--batch-size", "60", "--epochs", "400", "--eval-every", "1000"]
    status, lines, stderr = signal_rank_1(run_dir, signal.SIGTERM, *args, "--out", str(run_dir), processes=2)
    assert status != 0 and len(lines) == 1, stderr  # every rank stopped after the same step; rank 0 said so
    step = int(re.fullmatch(r"error: stopped by SIGTERM at step (\d+); checkpoint saved\. Resume with: torchrun "
                            r"--standalone --nproc_per_node 2 run\.py --resume \S+", lines[0])[1])
    assert torch.load(run_dir / "checkpoint.pt", weights_only=True)["progress"]["step"] == step

    status, lines, stderr = signal_rank_1(run_dir, signal.SIGKILL, "--resume", str(run_dir), processes=2)
    assert status != 0 and len(lines) == 1, stderr
    assert re.fullmatch(r"error: rank 1 of 2 stopped \(killed, or failed\); the last checkpoint is kept\. Resume with: "
                        r"torchrun --standalone --nproc_per_node 2 run\.py --resume \S+", lines[0])
    checkpoint = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    epoch = checkpoint["progress"]["epoch"]
    assert epoch < 400
    cfg = Config(**{**checkpoint["config"], "epochs": epoch + 1})  # resumed alone, from Python (no report: quicker)
    data = load_dataset("binarized-mnist", data_dir=tiny_binarized, download=False, progress=False)
    summary = train(family_of(cfg.model)(**cfg.model_args), data, cfg, run_dir, resume=True, **QUIET)
    assert summary["epochs"] == epoch + 1
    assert json.loads((run_dir / "metrics.json").read_text())["epochs"] == epoch + 1


RANK_1_FAILS = """import sys, os
sys.argv[0] = "run.py"
import ppl_models.job
from ppl_models.data import DataError
if os.environ["RANK"] == "1":
    def missing(*args, **kwargs):
        raise DataError("no data on this machine: put it in $PPL_MODELS_DATA")
    ppl_models.job.load_dataset = missing
import run
sys.exit(run.main())
"""


def test_an_error_in_one_rank_only_is_said_once_with_its_rank(tiny_binarized, tmp_path):
    script = tmp_path / "rank_1_fails.py"
    script.write_text(RANK_1_FAILS)
    process = torchrun("--model", "mixture", "--dataset", "binarized-mnist", "--data-dir", str(tiny_binarized),
                       "--batch-size", "60", "--out", str(tmp_path / "run"), script=script, cwd=tmp_path)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode != 0
    assert our_lines(stderr) == ["error: rank 1 of 2 stopped (no data on this machine: put it in $PPL_MODELS_DATA); "
                                 "no checkpoint was written: start the run again"], stderr


RANK_1_RESUMES = """import sys, os
sys.argv[0] = "run.py"
if os.environ["RANK"] == "1":
    sys.argv += ["--resume", "run"]
import run
sys.exit(run.main())
"""


def test_ranks_given_different_commands_are_refused_before_they_fall_out_of_step(tiny_binarized, tmp_path):
    script = tmp_path / "rank_1_resumes.py"
    script.write_text(RANK_1_RESUMES)
    process = torchrun("--model", "vae", "--dataset", "binarized-mnist", "--data-dir", str(tiny_binarized),
                       "--batch-size", "60", "--out", "run", script=script, cwd=tmp_path)
    _, stderr = process.communicate(timeout=120)
    assert our_lines(stderr) == ["error: the ranks were started with different commands: --resume is not given on "
                                 "rank 0 and run on rank 1; start every rank with the same command"], stderr
    assert re.search(r"exitcode\s*: 2 ", stderr)


def test_a_stopped_rank_ends_the_job_with_one_line_after_the_timeout(tiny_binarized, tmp_path):
    """Rank 1 stopped (SIGSTOP) after the first checkpoint: rank 0 waits $PPL_MODELS_TIMEOUT seconds
    (3 here; gloo's own default is 30 minutes), then says so and ends."""
    run_dir, said = tmp_path / "run", tmp_path / "stderr"
    with said.open("w") as stderr:
        process = torchrun("--model", "mixture", "--guide", "sampled", "--components", "3", "--dataset",
                           "binarized-mnist", "--data-dir", str(tiny_binarized), "--batch-size", "60", "--epochs",
                           "400", "--eval-every", "1000", "--compile", "off", "--out", str(run_dir),
                           env={"PPL_MODELS_TIMEOUT": "3"}, stderr=stderr, cwd=tmp_path)
        wait_for_a_checkpoint(run_dir)
        stopped = rank_pid(process.pid, 1)
        os.kill(stopped, signal.SIGSTOP)
        try:
            deadline = time.time() + 60
            while time.time() < deadline and not our_lines(said.read_text()):
                time.sleep(0.1)
        finally:
            os.kill(stopped, signal.SIGCONT)  # (else torchrun waits 30 s before it kills the stopped rank)
            process.terminate()  # (torchrun stops every rank still running)
        process.communicate(timeout=120)
    lines = our_lines(said.read_text())
    assert len(lines) == 1 and re.fullmatch(
        r"error: rank 1 of 2 stopped \(no answer in 3 s: stopped, hung or killed; \$PPL_MODELS_TIMEOUT sets how long "
        r"the others wait\); the last checkpoint is kept\. Resume with: torchrun --standalone --nproc_per_node 2 "
        r"run\.py --resume \S+", lines[0]), lines


RANK_1_DIES = """import os, signal, sys
sys.argv[0] = "run.py"
from ppl_models import train
if os.environ["RANK"] == "1" and os.environ["TORCHELASTIC_RESTART_COUNT"] == "0":
    step = train.Training.step

    def killed_in_step_8(self, *args):
        if self.at.step == 7:
            os.kill(os.getpid(), signal.SIGKILL)
        return step(self, *args)

    train.Training.step = killed_in_step_8
import run
sys.exit(run.main())
"""


def test_a_job_torchrun_restarts_resumes_and_ends_where_an_uninterrupted_run_would(tiny_binarized, tmp_path):
    """torchrun --max-restarts 1; rank 1 killed in step 8 of 20 (epoch 2 of 4: the checkpoint of epoch 1 kept)."""
    script, run_dir = tmp_path / "rank_1_dies.py", tmp_path / "run"
    script.write_text(RANK_1_DIES)
    process = torchrun("--model", "vae", "--z-dim", "3", "--hidden", "40,40", "--lr", "0.003", "--dataset",
                       "binarized-mnist", "--data-dir", str(tiny_binarized), "--batch-size", "60", "--epochs", "4",
                       "--eval-every", "1000", "--eval-samples", "0", "--out", str(run_dir), script=script,
                       launcher=("--standalone", "--max-restarts", "1"), cwd=tmp_path)
    stdout, stderr = process.communicate(timeout=180)
    assert process.returncode == 0, stderr
    assert [line for line in stdout.splitlines() if "resuming" in line] == [
        f"torchrun restarted the processes (restart 1 of 1, --max-restarts): resuming {run_dir} from the checkpoint "
        "this job wrote", f"resuming {run_dir} at epoch 2, step 5"]
    cfg = Config(**torch.load(run_dir / "checkpoint.pt", weights_only=True)["config"])
    data = load_dataset("binarized-mnist", data_dir=tiny_binarized, download=False, progress=False)
    summary = train(family_of(cfg.model)(**cfg.model_args), data, cfg, tmp_path / "alone", **QUIET)
    assert summary["epochs"] == json.loads((run_dir / "metrics.json").read_text())["epochs"] == 4
    assert_same_params(run_dir, tmp_path / "alone")


def test_killing_torchrun_leaves_its_ranks_to_end_without_a_trace(tiny_binarized, tmp_path):
    """A SIGKILL of torchrun (which keeps the ranks' store) leaves them running to the end, their
    heartbeat stopped without the C++ stack trace of a call to the closed store."""
    run_dir = tmp_path / "run"
    process = torchrun("--model", "mixture", "--guide", "sampled", "--components", "3", "--dataset",
                       "binarized-mnist", "--data-dir", str(tiny_binarized), "--batch-size", "60", "--epochs", "3",
                       "--eval-every", "1000", "--compile", "off", "--out", str(run_dir), cwd=tmp_path)
    wait_for_a_checkpoint(run_dir)
    process.kill()
    _, stderr = process.communicate(timeout=120)  # the ranks hold its pipes until they end
    assert "TCPStore" not in stderr and "frame #" not in stderr, stderr
    assert json.loads((run_dir / "metrics.json").read_text())["epochs"] == 3
