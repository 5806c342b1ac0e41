"""The files of a run directory, read and written here and nowhere else:

  config.json    the configuration, as given
  metrics.csv    step, epoch (epochs completed at that step), seconds (training time so far),
                 split, estimator, value: the learning curves (nats per digit)
  metrics.json   the final summary
  checkpoint.pt  params, optimizer state, RNG state and progress, written atomically at the end
                 of every epoch and on Ctrl-C; resuming from it ends where an uninterrupted run would
  best.pt        with early stopping: the params of the epoch with the best validation score

Every write is atomic (`files.atomic_write`).
"""

import csv
import errno
import fcntl
import hashlib
import io
import json
import os
import secrets
from contextlib import contextmanager
from pathlib import Path

import pyro
import torch

from .files import atomic_write, remove_stale_parts

# 2: one PyTorch optimizer's state (1: pyro.optim's per-param ones); 3: VAE layer names; 4: the networks' buffers
# (format 3 is still read: without buffers, which the networks of those runs held only in IAF layers)
CHECKPOINT_FORMAT = 4
OLDEST_READABLE_FORMAT = 3
RESUMED_SETTINGS = ("model", "guide", "elbo", "dataset", "model_args")  # a resumed run cannot change these


class TrainingError(RuntimeError):
    """Training cannot go on; the message says why and what to do."""


# ---- the directory -------------------------------------------------------------------------
RUN_FILES = ("checkpoint.pt", "best.pt", "metrics.csv", "metrics.json", "config.json", "report.html")
_locked = {}  # run directories this process holds: path -> how many nested holds


def make_run_dir(path):
    """Create the run directory (and its parents), or say in one line why it cannot be."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise TrainingError(f"cannot use {path} as a run directory: {error.strerror or error}") from None
    return path


@contextmanager
def exclusive(path):
    """Hold the run directory for this process: an OS lock (flock) on its `lock` file, released when
    the process ends however it ends. A second process that asks for it is refused at once."""
    key = Path(path).resolve()
    if key in _locked:  # nested: the job holds it, and so does the training inside
        _locked[key] += 1
        try:
            yield
        finally:
            _locked[key] -= 1
        return
    try:
        lock = open(key / "lock", "a+")
    except OSError as error:  # a read-only file system, a folder of another user's
        raise TrainingError(f"cannot write in {path} ({error.strerror or error}): a run writes its checkpoint there; "
                            "copy the folder somewhere writable and use the copy, or give another folder") from None
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            lock.seek(0)
            holder = lock.read().strip() or "another process"
            raise TrainingError(f"{path} is in use by {holder}; wait for that run to end, or write to another "
                                "run directory") from None
        lock.truncate(0)
        lock.write(f"process {os.getpid()}\n")
        lock.flush()
        _locked[key] = 1
        try:
            yield
        finally:
            del _locked[key]
            lock.truncate(0)  # the lock goes with the file descriptor; the file stays, empty


def check_new_run(path, overwrite=False):
    """A new run may not replace a finished or interrupted one (it has a checkpoint) unless asked.
    Asked, the old run stays whole until the new one has passed every check and writes its first
    file (`remove_old_run`): a refused command loses nothing."""
    path = Path(path)
    if (path / "checkpoint.pt").exists() and not overwrite:
        raise TrainingError(f"{path} holds a run already (checkpoint.pt); continue it with `resume=True`, or "
                            "replace it with `overwrite=True`")


def remove_old_run(path):
    """Remove the files of the run `path` held, so that the folder never mixes two runs: RUN_FILES,
    the figures its metrics.json lists and the state files its checkpoint lists (those a family
    keeps between epochs). Other files in the folder are not the run's, and stay."""
    path = Path(path)
    listed = [*listed_names(path / "metrics.json", "figures"), *listed_names(path / "checkpoint.pt", "state_files")]
    for name in (*RUN_FILES, *listed):
        (path / name).unlink(missing_ok=True)


def listed_names(path, key):
    """The file names a run's metrics.json or checkpoint.pt lists under `key`: plain names of files
    in the folder only (nothing if the file is missing or damaged)."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True) if path.suffix == ".pt" else \
            json.loads(path.read_text())
        names = saved.get(key) or []
    except Exception:  # noqa: BLE001 (a damaged file lists nothing: RUN_FILES still go)
        return []
    return [name for name in names if isinstance(name, str) and name == Path(name).name and name not in ("", ".", "..")]


def clear_parts(path, log=print):
    """Remove the temporary files that writers killed mid-write left in the run directory."""
    removed = remove_stale_parts(path)
    if removed:
        log(f"removed {len(removed)} unfinished file{'s' if len(removed) > 1 else ''} that a killed process left in "
            f"{path} ({', '.join(removed[:3])}{', ...' if len(removed) > 3 else ''})")


# ---- what a run is: its identity, and the data it trains on -----------------------------------
def new_run_id():
    """A run's identity, kept in its checkpoint and best.pt: a best.pt copied from another run is refused."""
    return secrets.token_hex(8)


def data_fingerprint(data):
    """A short hash of every split's digits: a resumed run must go on with the digits it started with."""
    digest = hashlib.sha256()
    for split in sorted(data.images):
        images = data.images[split].detach().cpu().contiguous()
        digest.update(f"{split} {tuple(images.shape)} {images.dtype}".encode())
        digest.update(images.numpy().tobytes())
    return digest.hexdigest()[:16]


def check_same_data(checkpoint, fingerprint, path, data_dir):
    """Refuse to resume a run on data other than it started with (a checkpoint of older code has no
    fingerprint, and is trusted)."""
    saved = checkpoint.get("data")
    if saved is not None and saved != fingerprint:
        where = f" under {data_dir}" if data_dir else ""
        raise TrainingError(f"the data files{where} hold other digits than {path} was trained on (data fingerprint "
                            f"{fingerprint}, not {saved}): resume it with the files it started with, or start a new "
                            "run")


# ---- checkpoints ---------------------------------------------------------------------------
CHECKPOINT_KEYS = {"format": int, "config": dict, "params": dict, "buffers": dict, "optimizer": dict, "rng": dict,
                   "progress": dict}
PROGRESS_KEYS = ("epoch", "step_in_epoch", "step", "seconds")


def load_checkpoint(path):
    """The checkpoint at `path`, checked: readable, of this format, with every part a run needs."""
    checkpoint = read_checkpoint(path)
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("format"), int):
        raise TrainingError(f"checkpoint {path} is not a ppl_models checkpoint (no format); delete it and start the "
                            "run again")
    if checkpoint["format"] > CHECKPOINT_FORMAT:
        raise TrainingError(f"{path} was written by a newer ppl_models (format {checkpoint['format']}); "
                            "upgrade to resume it")
    if checkpoint["format"] < OLDEST_READABLE_FORMAT:
        raise TrainingError(f"{path} was written by an older ppl_models (format {checkpoint['format']}), whose "
                            "optimizer state or parameter names this one cannot read; start the run again")
    if checkpoint["format"] == 3:
        checkpoint.setdefault("buffers", {})
    wrong = [key for key, kind in CHECKPOINT_KEYS.items() if not isinstance(checkpoint.get(key), kind)]
    wrong += [f"progress.{key}" for key in PROGRESS_KEYS if key not in checkpoint.get("progress", {})]
    if wrong:
        raise TrainingError(f"checkpoint {path} is damaged (missing or malformed: {', '.join(wrong)}); delete it and "
                            "start the run again")
    if checkpoint["format"] == 3:
        checkpoint["buffers"] = None  # not saved then: `restore_snapshot` refuses a model that needs them
    return checkpoint


def read_checkpoint(path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        if (Path(path).parent / "experiment.json").exists():
            raise TrainingError(f"{Path(path).parent} holds an experiment, and experiments cannot be resumed: run it "
                                "again with `overwrite=True`") from None
        raise TrainingError(
            f"no checkpoint at {path}: is this a run directory? Start a new run instead of resuming"
        ) from None
    except Exception as error:
        raise TrainingError(
            f"checkpoint {path} is corrupt or not a ppl_models checkpoint ({type(error).__name__}); "
            "delete it and start the run again"
        ) from None


def check_resumable(checkpoint, cfg, path):
    """Refuse the checkpoint of a run with other settings than `cfg`'s."""
    saved = checkpoint["config"]
    for key in RESUMED_SETTINGS:
        if saved.get(key) != getattr(cfg, key):
            raise TrainingError(
                f"{path} is a run of {key} {saved.get(key)!r}, not {getattr(cfg, key)!r}; resume it without "
                f"overriding `{key}`, or start a new run in another directory"
            )


# ---- the param store -----------------------------------------------------------------------
def plain(tensor):
    """A detached CPU copy as a plain Tensor (Pyro keeps some state in Tensor subclasses)."""
    return tensor.detach().cpu().clone().as_subclass(torch.Tensor)


def param_values():
    """{name: plain CPU copy} of every unconstrained value in Pyro's param store."""
    return {n: plain(p) for n, p in pyro.get_param_store().named_parameters()}


def restore_params(saved, device):
    """Copy saved unconstrained values into the param store in place (so networks and optimizer
    keep the same tensors), and recreate entries Pyro makes lazily during a step, such as
    TraceGraph_ELBO's decaying-average baselines."""
    store = pyro.get_param_store()
    with torch.no_grad():
        for name, value in saved.items():
            if name in store:
                unconstrained = dict(store.named_parameters())[name]
                unconstrained.copy_(value)
            else:
                store[name] = value.to(device)


def buffers(model):
    """{name: tensor} of the buffers the family's networks keep in their state (e.g. a flow's order)."""
    parameters = {name for name, _ in model.named_parameters()}
    return {name: b for name, b in model.state_dict().items() if name not in parameters}


def snapshot(model):
    """What a trained model is: the unconstrained values of Pyro's param store (networks registered
    with pyro.module included) and the buffers the family's networks hold."""
    return {"params": param_values(), "buffers": {name: plain(b) for name, b in buffers(model).items()}}


def read_snapshot(path, run=None):
    """A `snapshot` saved at `path` (best.pt), checked: readable, and of the run whose id is `run`
    (a snapshot without one, of older code, is trusted)."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise TrainingError(f"{path} is missing or unreadable ({type(error).__name__})") from None
    if isinstance(saved, dict) and saved and all(torch.is_tensor(v) for v in saved.values()):
        return {"params": saved, "buffers": None}  # written before buffers were kept (format 3)
    if not (isinstance(saved, dict) and isinstance(saved.get("params"), dict) and
            isinstance(saved.get("buffers"), dict)):
        raise TrainingError(f"{path} is not a ppl_models snapshot (no params and buffers)")
    if run is not None and saved.get("run", run) != run:
        raise TrainingError(f"{path} is another run's (run {saved['run']}, and checkpoint.pt is run {run}'s): "
                            f"delete {Path(path).name} to use the last checkpoint, or copy the whole run folder")
    return saved


def restore_snapshot(model, saved, device):
    """Put a `snapshot` back: params into the param store, buffers into the family's networks."""
    if saved["buffers"] is None and buffers(model):
        raise TrainingError("this run was saved before ppl_models kept the networks' buffers (checkpoint format 3), "
                            f"and its model holds some ({', '.join(buffers(model))}): start it again")
    restore_params(saved["params"], device)
    with torch.no_grad():
        for name, value in (saved["buffers"] or {}).items():
            model.get_buffer(name).copy_(value)


# ---- RNG -----------------------------------------------------------------------------------
def rng_state(device):
    """The CPU generator's state, and that of the GPU training runs on (`device`): the one a process
    draws from, whichever GPU it is."""
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state, device):
    """Put `rng_state` back, the GPU's into `device` (each process of a run restores it into its own)."""
    torch.set_rng_state(state["torch"])
    if "cuda" not in state or device.type != "cuda":
        return
    if isinstance(state["cuda"], (list, tuple)):  # older checkpoints: every GPU's state
        torch.cuda.set_rng_state_all(state["cuda"])
    else:
        torch.cuda.set_rng_state(state["cuda"], device)


# ---- learning curves -----------------------------------------------------------------------
class MetricsLog:
    """metrics.csv rows kept in memory and rewritten whole, so a resumed run drops the rows an
    interrupted run wrote after its last checkpoint."""

    columns = ("step", "epoch", "seconds", "split", "estimator", "value")

    def __init__(self, path, up_to_step=None):
        self.path = Path(path)
        self.rows = []
        if up_to_step is not None and self.path.exists():
            try:
                rows = read_metrics(self.path.parent)
                self.rows = [r for r in rows if int(r["step"]) <= up_to_step and set(r) == set(self.columns)]
                if len(self.rows) < sum(int(r["step"]) <= up_to_step for r in rows):
                    raise ValueError("rows with other columns")
            except (ValueError, KeyError, TypeError, UnicodeDecodeError, csv.Error) as error:
                reason = f"its columns are not {', '.join(self.columns)}" if isinstance(error, KeyError) else error
                raise TrainingError(f"{self.path} is not a ppl_models metrics file ({reason}); delete it and resume: "
                                    f"the learning curves then start again at step {up_to_step}") from None

    def add(self, step, epoch, seconds, split, estimator, value):
        self.rows.append(dict(step=step, epoch=epoch, seconds=seconds, split=split, estimator=estimator, value=value))

    def last_step(self):
        return int(self.rows[-1]["step"]) if self.rows else None

    def flush(self):
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, fieldnames=self.columns)
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write(self.path, lambda file: file.write(text.getvalue().encode()))


def read_metrics(run_dir):
    with open(Path(run_dir) / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))
