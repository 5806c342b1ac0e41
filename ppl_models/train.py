"""The one SVI training loop every model and guide shares.

A run directory holds:
  config.json    the configuration, as given
  metrics.csv    step, epoch, seconds (training time so far), split, estimator, value: the
                 learning curves (nats per digit)
  metrics.json   the final summary (see `summarise`)
  checkpoint.pt  params, optimizer state, RNG state and progress, written atomically at the end
                 of every epoch and on Ctrl-C; `--resume RUN_DIR` continues from it and ends
                 where an uninterrupted run would.
  best.pt        with --patience: the params of the epoch with the best validation score; the
                 final numbers and figures are that epoch's (early stopping).
Runs on CPU are bit-reproducible: batches come from a per-epoch permutation that depends only on
(seed, epoch), and evaluation draws from its own seeded RNG so it never shifts training's.
"""

import csv
import json
import math
import os
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyro
import torch
from pyro import poutine
from tqdm.auto import tqdm

from .evaluate import estimators, mean_estimates, per_digit_estimate
from .models import networks

CHECKPOINT_FORMAT = 3  # 2: one PyTorch optimizer's state (1: pyro.optim's per-param ones); 3: VAE layer names
OPTIMIZERS = {
    "adam": torch.optim.Adam,
    "rmsprop": torch.optim.RMSprop,
    "sgd": torch.optim.SGD,
    "adagrad": torch.optim.Adagrad,
}


class TrainingError(RuntimeError):
    """Training cannot go on; the message says why and what to do."""


@dataclass
class Config:
    model: str = "mixture"
    guide: str = "enum"
    elbo: str | None = None  # None: the ELBO the guide calls for
    particles: int = 1
    dataset: str = "mnist"
    binarize: str = "threshold"
    data_dir: str | None = None
    model_args: dict = field(default_factory=dict)  # the model family's own hyperparameters
    optimizer: str = "rmsprop"
    lr: float = 0.01
    batch_size: int = 100
    epochs: int = 20
    seed: int = 0
    device: str = "cpu"
    jit: bool = False
    detect_anomaly: bool = False
    eval_every: int = 200
    eval_digits: int = 1000
    eval_samples: int = 0  # k of the final IWAE-k estimate of test log p(x); 0: none
    train_subset: int | None = None
    patience: int | None = None  # early stopping: epochs without a better validation score before stopping

    def validate(self):
        checks = [
            (self.optimizer in OPTIMIZERS, f"--optimizer must be one of {', '.join(OPTIMIZERS)}"),
            (self.lr > 0, "--lr must be positive"),
            (self.batch_size > 0, "--batch-size must be a positive integer"),
            (self.epochs > 0, "--epochs must be a positive integer"),
            (self.eval_every > 0, "--eval-every must be a positive integer"),
            (self.eval_digits > 0, "--eval-digits must be a positive integer"),
            (self.particles > 0, "--particles must be a positive integer"),
            (self.eval_samples >= 0, "--eval-samples must be 0 (none) or a positive integer"),
            (self.train_subset is None or self.train_subset > 0, "--train-subset must be a positive integer"),
            (self.patience is None or self.patience > 0, "--patience must be a positive integer"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


class SVI:
    """Stochastic variational inference with one PyTorch optimizer over the whole param store.

    The gradients are Pyro's: `elbo.loss_and_grads(model, guide, x)`, the call `pyro.infer.SVI.step`
    makes. Only the update differs. `pyro.optim` keeps one PyTorch optimizer per parameter (14
    optimizer steps per VAE step) and `pyro.infer.SVI` traces every step to find the params; here
    the params are collected once, after a first loss on `first_args` has created them all (in a
    fixed order, which checkpoints rely on), and updated by one optimizer. bench/vae_speed.py
    measures the difference against pyro.infer.SVI and plain PyTorch (BENCHMARKS.md). The optimizer
    is `optimizer_class(params, lr=lr)`.
    """

    def __init__(self, model, guide, elbo, optimizer_class, lr, first_args):
        self.model, self.guide, self.elbo = model, guide, elbo  # the same guide object every step: JIT caches on it
        elbo.loss(model, guide, *first_args)
        self.params = [p for _, p in pyro.get_param_store().named_parameters()]
        self.optimizer = optimizer_class(self.params, lr=lr)
        self.checked = False

    def step(self, *args):
        loss = self.elbo.loss_and_grads(self.model, self.guide, *args)
        if not self.checked:  # a param made during this first step would never be updated: say so
            ours = {id(p) for p in self.params}
            missed = [n for n, p in pyro.get_param_store().named_parameters() if id(p) not in ours and p.grad is not None]
            if missed:
                raise RuntimeError(f"params {missed} appeared after the first loss; create them in the first call")
            self.checked = True
        self.optimizer.step()
        self.optimizer.zero_grad()
        return loss


# ---- files ---------------------------------------------------------------------------------
def atomic_torch_save(obj, path):
    """Write to a temporary file beside `path`, then rename: a crash never leaves half a file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise TrainingError(
            f"no checkpoint at {path}: is this a run directory? Start a new run instead of --resume"
        ) from None
    except Exception as error:
        raise TrainingError(
            f"checkpoint {path} is corrupt or not a ppl_models checkpoint ({type(error).__name__}); "
            "delete it and start the run again"
        ) from None


def write_json(obj, path):
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


class MetricsLog:
    """metrics.csv rows kept in memory and rewritten whole, so a resumed run drops the rows an
    interrupted run wrote after its last checkpoint."""

    columns = ("step", "epoch", "seconds", "split", "estimator", "value")

    def __init__(self, path, up_to_step=None):
        self.path = Path(path)
        self.rows = []
        if up_to_step is not None and self.path.exists():
            with open(self.path) as f:
                self.rows = [r for r in csv.DictReader(f) if int(r["step"]) <= up_to_step]

    def add(self, step, epoch, seconds, split, estimator, value):
        self.rows.append(dict(step=step, epoch=epoch, seconds=seconds, split=split, estimator=estimator, value=value))

    def flush(self):
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.columns)
            writer.writeheader()
            writer.writerows(self.rows)
        os.replace(tmp, self.path)


def curve_digits(x, count):
    """The fixed digits every learning-curve point is measured on: `count` digits drawn at random
    with a fixed seed, the same for every run. (Not the first `count`: binarized-mnist's files are
    ordered, and its first 1000 test digits score 27 nats below the split's mean.)"""
    return x[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))[:count].to(x.device)]


# ---- RNG -----------------------------------------------------------------------------------
def epoch_generator(seed, epoch, device):
    """The generator of one epoch's batch order: a function of (seed, epoch) only."""
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + epoch)


def rng_state():
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextmanager
def evaluation_rng(seed, device):
    """Evaluation draws from its own seeded stream and leaves training's untouched."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


@contextmanager
def interrupt_between_steps():
    """Ctrl-C sets a flag that the loop reads after each step, so a checkpoint never holds a
    half-applied update."""
    flag = {"requested": False}

    def handler(signum, frame):
        flag["requested"] = True

    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


# ---- numerical guard -----------------------------------------------------------------------
def diagnose_nonfinite(model, guide, x):
    """Which parameters are not finite, and which sample sites have a non-finite log-probability
    on this batch (checked with validation off, so the bad values can be looked at)."""
    found = [f"param '{name}'" for name, p in pyro.get_param_store().named_parameters() if not torch.isfinite(p).all()]
    with pyro.validation_enabled(False), torch.no_grad():
        guide_trace = poutine.trace(guide).get_trace(x)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(x)
    for where, trace in (("model", model_trace), ("guide", guide_trace)):
        for name, site in trace.nodes.items():
            if site["type"] == "sample" and not torch.isfinite(site["fn"].log_prob(site["value"])).all():
                found.append(f"{where} site '{name}'")
    return ", ".join(found) or "no single parameter or site (the gradient step itself)"


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


def reset_networks(model):
    """Initialise the model's networks from the run's seed, so a run depends on nothing that
    happened before it (not even on when the model object was built)."""
    for network in networks(model):
        for module in network.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()


class BestEpoch:
    """Early stopping (--patience): the validation score after every epoch, the params of the best
    epoch so far kept in best.pt, and whether `patience` epochs have passed without a better one."""

    def __init__(self, path, patience, estimator, state=None, epoch=0):
        self.path, self.patience, self.estimator = Path(path), patience, estimator
        if state and state.get("estimator", estimator) == estimator:
            self.epoch, self.value, self.scores = state["epoch"], state["value"], state.get("scores", [])
        else:  # nothing scored with this estimator yet (or a saved best of another one): count from `epoch`
            self.epoch, self.value, self.scores = epoch, -math.inf, []

    def update(self, epoch, value):
        self.scores.append([epoch, value])  # every epoch's score, reported beside the best
        if value > self.value:
            self.epoch, self.value = epoch, value
            atomic_torch_save(param_values(), self.path)

    def exhausted(self, epoch):
        return epoch - self.epoch >= self.patience

    def state(self):
        return dict(epoch=self.epoch, value=self.value, estimator=self.estimator, scores=self.scores)

    def restore(self, device):
        restore_params(torch.load(self.path, map_location=device, weights_only=True), device)


# ---- the loop ------------------------------------------------------------------------------
@contextmanager
def reproducible(device, detect_anomaly=False):
    """Deterministic kernels on CPU (scatter-adds in backward otherwise sum in thread order, and
    runs differ in the last bits), and optionally autograd's anomaly detection."""
    previous = torch.are_deterministic_algorithms_enabled(), torch.is_anomaly_enabled()
    torch.use_deterministic_algorithms(device.type == "cpu" or previous[0], warn_only=True)
    torch.autograd.set_detect_anomaly(detect_anomaly or previous[1])
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0])
        torch.autograd.set_detect_anomaly(previous[1])


def train(model, data, cfg: Config, run_dir, resume=False, progress=True, log=print, after_epoch=None):
    """Fit `model` with `cfg.guide` by SVI; write the run directory; return the summary dict.
    `after_epoch(epoch)`, if given, is called before training (epoch 0) and after each epoch."""
    with reproducible(torch.device(cfg.device), cfg.detect_anomaly):
        return _train(model, data, cfg, run_dir, resume, progress, log, after_epoch or (lambda epoch: None))


def _train(model, data, cfg, run_dir, resume, progress, log, after_epoch):
    cfg.validate()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(cfg.device)
    checkpoint_path = run_dir / "checkpoint.pt"

    x_train_all = data.binary("train", 0)
    num_train = cfg.train_subset or x_train_all.shape[0]
    if num_train > x_train_all.shape[0]:
        raise ValueError(f"--train-subset {num_train} is more than the {x_train_all.shape[0]} training digits there are")
    if cfg.batch_size > num_train:
        raise ValueError(f"--batch-size {cfg.batch_size} is larger than the {num_train} training digits")
    steps = steps_per_epoch(cfg, data)
    if cfg.patience and "valid" not in data.splits:
        raise ValueError(f"--patience stops on the validation split, and {data.name} has none "
                         f"(its splits: {', '.join(data.splits)}); use --dataset binarized-mnist")
    curves = {split: curve_digits(data.binary(split), cfg.eval_digits) for split in data.splits}
    names = estimators(model, cfg.guide, split="curves")

    pyro.clear_param_store()
    pyro.set_rng_seed(cfg.seed)
    reset_networks(model)
    guide = model.guide(cfg.guide)
    elbo = model.elbo(cfg.guide, cfg.elbo, jit=cfg.jit, particles=cfg.particles)
    svi = SVI(model.model, guide, elbo, OPTIMIZERS[cfg.optimizer], cfg.lr, (x_train_all[: cfg.batch_size],))
    loss_name = model.loss_name(cfg.guide, cfg.elbo)

    epoch, step_in_epoch, step, seconds = 0, 0, 0, 0.0
    best_state = None
    if resume:
        checkpoint = load_checkpoint(checkpoint_path)
        check_resumable(checkpoint, cfg, checkpoint_path)
        restore_params(checkpoint["params"], device)
        svi.optimizer.load_state_dict(checkpoint["optimizer"])
        for group in svi.optimizer.param_groups:  # the saved state holds the old rate: --resume --lr may change it
            group["lr"] = cfg.lr
        set_rng_state(checkpoint["rng"])
        epoch, step_in_epoch, step, seconds = (checkpoint["progress"][k] for k in ("epoch", "step_in_epoch", "step", "seconds"))
        best_state = checkpoint.get("best")
        log(f"resuming {run_dir} at epoch {epoch + 1}, step {step}" if epoch < cfg.epochs else
            f"{run_dir} had finished its {cfg.epochs} epochs: evaluating it and drawing its figures again")
    metrics = MetricsLog(run_dir / "metrics.csv", up_to_step=step if resume else None)
    selected = selection_estimator(cfg, names)
    best = BestEpoch(run_dir / "best.pt", cfg.patience, selected, best_state, epoch) if cfg.patience else None
    write_json(asdict(cfg), run_dir / "config.json")

    def save_checkpoint():
        atomic_torch_save(
            {
                "format": CHECKPOINT_FORMAT,
                "config": asdict(cfg),
                "params": param_values(),
                "optimizer": svi.optimizer.state_dict(),
                "rng": rng_state(),
                "progress": dict(epoch=epoch, step_in_epoch=step_in_epoch, step=step, seconds=seconds),
                "best": best.state() if best else None,
            },
            checkpoint_path,
        )
        metrics.flush()

    def evaluate_curves():
        if metrics.rows and int(metrics.rows[-1]["step"]) == step:
            return  # already measured (a resumed run that had finished)
        with evaluation_rng(cfg.seed, device):
            for split, x in curves.items():
                for name, value in mean_estimates(model, cfg.guide, x, names).items():
                    metrics.add(step, epoch, round(seconds, 3), split, name, value)

    if step == 0:
        evaluate_curves()  # the untrained model, for the start of every curve
        after_epoch(0)

    def validation_score():
        with evaluation_rng(cfg.seed, device):  # the same draws every epoch: scores differ by the params only
            return mean_estimates(model, cfg.guide, curves["valid"], [selected])[selected]

    with interrupt_between_steps() as interrupt:
        while epoch < cfg.epochs and not (best and best.exhausted(epoch)):
            x_epoch = data.binary("train", epoch)[:num_train]
            order = torch.randperm(num_train, generator=epoch_generator(cfg.seed, epoch, device), device=device)
            bar = tqdm(
                total=steps, initial=step_in_epoch, disable=not progress,
                desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="step", leave=False,
            )
            running = math.nan
            while step_in_epoch < steps:
                batch = x_epoch[order[step_in_epoch * cfg.batch_size : (step_in_epoch + 1) * cfg.batch_size]]
                started = time.perf_counter()
                try:
                    loss = svi.step(batch, *step_args(model, epoch + (step_in_epoch + 1) / steps, device)) / cfg.batch_size
                except ValueError:  # Pyro's validation meeting a parameter that went non-finite
                    if all(torch.isfinite(p).all() for _, p in pyro.get_param_store().named_parameters()):
                        raise
                    loss = math.nan
                seconds += time.perf_counter() - started  # training time only: evaluation is not counted
                if not math.isfinite(loss):
                    raise TrainingError(
                        f"the loss became {loss} at step {step + 1} (epoch {epoch + 1}); not finite: "
                        f"{diagnose_nonfinite(model.model, guide, batch)}. The last good checkpoint is kept in "
                        f"{checkpoint_path}; try a smaller --lr, or --detect-anomaly to find the operation"
                    )
                step_in_epoch += 1
                step += 1
                running = loss if math.isnan(running) else 0.98 * running + 0.02 * loss
                bar.set_postfix_str(f"{loss_name} {running:.2f}")
                bar.update()
                if step % cfg.eval_every == 0:
                    evaluate_curves()
                if interrupt["requested"]:
                    bar.close()
                    save_checkpoint()
                    raise TrainingError(
                        f"interrupted at step {step}; checkpoint saved. Resume with: python run.py --resume {run_dir}"
                    )
            bar.close()
            epoch, step_in_epoch = epoch + 1, 0
            if best:
                best.update(epoch, validation_score())
            save_checkpoint()
            after_epoch(epoch)
            log(f"epoch {epoch}/{cfg.epochs}: {loss_name} {running:.2f} (moving average over train "
                f"batches), {seconds / epoch:.1f} s/epoch" + (
                    f"; best valid {selected} {best.value:.2f} at epoch {best.epoch}" if best else ""))

    evaluate_curves()  # the end of training, if it fell between two --eval-every points
    metrics.flush()
    if best:
        stopped = best.exhausted(epoch)
        log(f"{'early stopping: ' if stopped else ''}{epoch} epochs trained; the final numbers and figures are those of "
            f"epoch {best.epoch}, the best valid {selected} ({best.value:.2f} on {len(curves['valid'])} digits)")
        best.restore(device)
    summary = summarise(model, data, cfg, epoch, seconds / max(epoch, 1), device, progress)
    if best:
        summary["early_stopping"] = dict(
            patience=cfg.patience, epochs_trained=epoch, stopped_early=stopped, best_epoch=best.epoch,
            estimator=selected, selected_by=f"{selected} on {len(curves['valid'])} fixed random valid digits",
            best_value=best.value, valid_scores=best.scores)
    write_json(summary, run_dir / "metrics.json")
    return summary


def selection_estimator(cfg, names):
    """What early stopping maximises on the valid digits: the exact log-likelihood where the model
    has one; else the training objective's own bound, iwae-k for a k-sample objective (--elbo iwae
    or vimco: its one-sample ELBO can fall while the bound it trains rises); else the ELBO."""
    if "exact" not in names and cfg.elbo in ("iwae", "vimco"):
        return f"iwae-{cfg.particles}"
    return names[0]


def step_args(model, epochs_done, device):
    """Extra arguments of model and guide at this point of training (epochs_done, fractional), for
    model families with a schedule (the VAE's KL warm-up); none for the others."""
    return model.step_args(epochs_done, device) if hasattr(model, "step_args") else ()


def steps_per_epoch(cfg, data):
    """SVI steps in an epoch: the last partial batch is dropped (fixed shapes for --jit)."""
    return (cfg.train_subset or len(data.images["train"])) // cfg.batch_size


def summarise(model, data, cfg, epochs, seconds_per_epoch, device, progress=True):
    """metrics.json: final -> split -> estimator -> mean log-likelihood per digit (nats), on every
    digit of each split (`final_digits` says how many); IWAE-k with --eval-samples k on test only."""
    with evaluation_rng(cfg.seed, device):
        final = {split: mean_estimates(model, cfg.guide, data.binary(split), estimators(model, cfg.guide, split=split))
                 for split in data.splits}
        if cfg.eval_samples and cfg.guide != "enum":
            name = f"iwae-{cfg.eval_samples}"
            final["test"][name] = per_digit_estimate(model, cfg.guide, data.binary("test"), name, progress).mean().item()
    return {
        "model": cfg.model,
        "guide": cfg.guide,
        "dataset": cfg.dataset,
        "binarize": data.binarize,
        "epochs": epochs,
        "train_digits": cfg.train_subset or len(data.images["train"]),
        "seconds_per_epoch": seconds_per_epoch,
        "units": "mean log-likelihood per digit, nats",
        "final_digits": {split: len(data.images[split]) for split in data.splits},
        "final": final,
    }


def check_resumable(checkpoint, cfg, path):
    if checkpoint.get("format", 0) > CHECKPOINT_FORMAT:
        raise TrainingError(f"{path} was written by a newer ppl_models (format {checkpoint['format']}); upgrade to resume it")
    if checkpoint.get("format", 0) < CHECKPOINT_FORMAT:
        raise TrainingError(f"{path} was written by an older ppl_models (format {checkpoint.get('format', 0)}), whose "
                            "optimizer state or parameter names this one cannot read; start the run again")
    saved = checkpoint["config"]
    for key in ("model", "guide", "elbo", "dataset", "model_args"):
        if saved.get(key) != getattr(cfg, key):
            raise TrainingError(
                f"{path} is a run of {key} {saved.get(key)!r}, not {getattr(cfg, key)!r}; resume it without "
                f"overriding --{key.replace('_', '-')}, or start a new run with another --out"
            )
