"""The one SVI training loop every model family and guide shares, read top to bottom in `train`.

A run writes its directory (see `rundir`): config.json, metrics.csv (learning curves),
metrics.json (the final summary), checkpoint.pt at the end of every epoch and on Ctrl-C (resuming
from it ends where an uninterrupted run would), and best.pt under early stopping.
Runs on CPU are bit-reproducible: batches come from a per-epoch permutation that depends only on
(seed, epoch), and evaluation draws from its own seeded RNG so it never shifts training's.
Under torchrun the same loop runs data-parallel (see `distributed`): each process takes its share
of every batch and of every evaluation, and rank 0 alone writes the run directory.
"""

import math
import signal
import threading
import time
import warnings
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import pyro
import torch
from pyro import poutine
from tqdm import tqdm  # not tqdm.auto: in a notebook without ipywidgets it warns on import

from .compiled import CompiledOptimizer, compiled_seconds, flushing_denormals
from .config import AUTO_EVAL_SAMPLES, OPTIMIZERS, SettingError, steps_per_epoch
from .data import DataError, random_digits
from .distributed import ONE_PROCESS, SameDraws, current, nearest_multiples
from .evaluate import duration, estimators, mean_estimates, per_digit_estimate, seconds_to_estimate
from .files import atomic_torch_save, write_json
from .rundir import (
    CHECKPOINT_FORMAT,
    MetricsLog,
    TrainingError,
    check_new_run,
    check_resumable,
    check_same_data,
    clear_parts,
    data_fingerprint,
    exclusive,
    load_checkpoint,
    make_run_dir,
    new_run_id,
    read_snapshot,
    remove_old_run,
    restore_snapshot,
    rng_state,
    set_rng_state,
    snapshot,
)


class SVI:
    """Stochastic variational inference with one PyTorch optimizer over the whole param store.

    The gradients are Pyro's: `elbo.loss_and_grads(model, guide, x)`, the call `pyro.infer.SVI.step`
    makes. Only the update differs. `pyro.optim` keeps one PyTorch optimizer per parameter (14
    optimizer steps per VAE step) and `pyro.infer.SVI` traces every step to find the params; here
    the params are collected once, after a first loss on `first_args` has created them all (in a
    fixed order, which checkpoints rely on), and updated by one optimizer. bench/vae_speed.py
    measures the difference against pyro.infer.SVI and plain PyTorch (BENCHMARKS.md). The optimizer
    is `optimizer_class(params, lr=lr)`.

    In a `world` of several processes each step's args are this process's shard of the batch: the
    guide draws as one process would (`SameDraws`), the shards' losses and gradients are summed over
    processes (one all-reduce) and every process takes the same step, from rank 0's params.

    `compile=True`: the optimizer's update is fused or compiled too (`compiled.CompiledOptimizer`);
    the ELBO is then a `compiled.CompiledObjective` (the family's `elbo(..., compile=True)`).
    `compile_seconds`: spent compiling both so far; `ran_eagerly`: why either runs eagerly after all
    (torch.compile could not build it, ...), or None.
    """

    def __init__(self, model, guide, elbo, optimizer_class, lr, first_args, world=ONE_PROCESS, compile=False):
        self.model, self.guide, self.elbo = model, guide, elbo  # the same guide object every step: JIT caches on it
        self.world = world
        with self.same_draws():
            elbo.loss(model, guide, *first_args)
        self.params = [p for _, p in pyro.get_param_store().named_parameters()]
        world.broadcast_params(self.params)
        if compile:
            fast = CompiledOptimizer(optimizer_class, self.params, lr)
            self.optimizer, self.optimizer_step, self.compiled_parts = fast.optimizer, fast.step, [elbo, fast]
        else:
            self.optimizer = optimizer_class(self.params, lr=lr)
            self.optimizer_step, self.compiled_parts = self.optimizer.step, []
        self.checked = False

    @property
    def compile_seconds(self):
        return sum(part.seconds for part in self.compiled_parts)

    @property
    def ran_eagerly(self):
        return "; ".join(part.fallback for part in self.compiled_parts if part.fallback) or None

    def step(self, *args, extras=None):
        """One step; the loss summed over the global batch. `extras`, a float tensor, is summed over the
        processes in the same all-reduce as the gradients (in place)."""
        failure = None
        try:
            with self.same_draws():
                loss = self.elbo.loss_and_grads(self.model, self.guide, *args)
        except ValueError as error:  # raised after the all-reduce, which every process must join
            if self.world.size == 1:
                raise
            loss, failure = math.nan, error
        loss = self.sum_over_processes(loss, extras)
        if failure:
            raise failure
        if not self.checked:  # a param made during this first step would never be updated: say so
            ours = {id(p) for p in self.params}
            missed = [n for n, p in pyro.get_param_store().named_parameters()
                      if id(p) not in ours and p.grad is not None]
            if missed:
                raise RuntimeError(f"params {missed} appeared after the first loss; create them in the first call")
            self.checked = True
        self.optimizer_step()
        self.optimizer.zero_grad()
        return loss

    def same_draws(self):
        """Where the guide draws, as one process would for the global batch (a no-op in one process)."""
        return SameDraws(self.world) if self.world.size > 1 else nullcontext()

    def sum_over_processes(self, loss, extras):
        """The loss, the gradients and `extras` summed over the processes, in one all-reduce of one
        buffer laid out alike in every process: a param without a gradient (unused by this step, or
        a process whose step failed) sends zeros, and gets no gradient back."""
        if self.world.size == 1:
            return loss
        extras = torch.zeros(0) if extras is None else extras
        like = self.params[0]
        grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in self.params]
        flat = torch.cat([g.reshape(-1) for g in grads] + [torch.tensor([loss]).to(like), extras.to(like)])
        self.world.sum(flat)
        parts = flat.split([p.numel() for p in self.params] + [1, len(extras)])
        for param, part in zip(self.params, parts):
            if param.grad is not None:
                param.grad.copy_(part.view_as(param))
        extras.copy_(parts[-1])
        return parts[-2].item()


# ---- the loop --------------------------------------------------------------------------------
def train(model, data, cfg, run_dir, resume=False, progress=True, log=print, after_epoch=None, overwrite=False,
          command=None, world=None):
    """Fit `model` with ``cfg.guide`` by SVI, writing the run directory as it goes.

    Example (the tour does this for all three families)::

        cfg = Config(model="vae", guide="normal", model_args={"z_dim": 2}, optimizer="adam", lr=1e-3)
        summary = train(build_model("vae", cfg.model_args), load_dataset("mnist"), cfg, "runs/vae")
        model = ppl_models.load("runs/vae")

    Args:
        model: a `ppl_models.family.Family`, e.g. from `ppl_models.models.build_model`.
        data: a `ppl_models.data.Dataset` (`ppl_models.data.load_dataset`).
        cfg: the run's `ppl_models.config.Config`.
        run_dir: the folder to write: config.json, metrics.csv, checkpoint.pt every epoch, best.pt
            under early stopping, metrics.json at the end (`A run and its files` in the docs).
        resume: go on from the checkpoint in ``run_dir``; the run then ends exactly where an
            uninterrupted one would.
        progress: show progress bars.
        log: where the run's lines go (one string per call).
        after_epoch: ``after_epoch(epoch)``, if given, is called before training (epoch 0) and after
            each epoch, before that epoch's checkpoint.
        overwrite: replace a run the folder holds (a new run refuses such a folder otherwise).
        command: the command line that asked for it (None: the Python API), kept in the checkpoint
            after those of the run's earlier invocations: the summary's ``commands`` lists them all.
        world: the processes that train the model together (default: torch.distributed's process
            group, if this process is in one), each calling `train` alike; rank 0 alone writes, logs,
            shows progress and calls ``after_epoch``, and every rank returns the summary.

    Returns:
        dict: metrics.json's content: ``final`` {split: {estimator: mean log-likelihood per digit, in
        nats}} (``exact``, ``elbo``, ``iwae-k``), ``final_digits`` (how many digits each split's
        numbers average), ``epochs``, ``seconds_per_epoch``, ``compile``, ``commands`` and, under
        early stopping, ``early_stopping``.

    Raises:
        ppl_models.config.SettingError: a setting that cannot work (said as a parameter).
        ppl_models.rundir.TrainingError: a folder in use or holding another run, a damaged or
            mismatched checkpoint, training that diverged or became NaN.
        ppl_models.train.Interrupted: Ctrl-C or SIGTERM between two steps, after the checkpoint was
            written.
    """
    world = world or current()
    if not world.main:
        progress, log, after_epoch = False, lambda line: None, None
    after_epoch = after_epoch or (lambda epoch: None)
    cfg.validate()
    with ExitStack() as held, reproducible(torch.device(cfg.device), cfg.detect_anomaly):
        run_dir = world.on_main(lambda: claim_run_dir(held, run_dir, resume, overwrite, log))
        run = Training(model, data, cfg, run_dir, resume, log, command, world, replacing=overwrite and not resume)
        if run.compiled:
            held.enter_context(flushing_denormals())
        if resume:
            run.save_checkpoint()  # the state it resumed from, with this command: kept even if no epoch is left
        if run.at.step == 0:
            run.evaluate_curves()  # the untrained model, for the start of every curve
            after_epoch(0)
        with interrupt_between_steps() as interrupt:
            while run.at.epoch < cfg.epochs and not (run.best and run.best.exhausted(run.at.epoch)):
                run.train_epoch(interrupt, progress)
                if run.best:
                    run.best.update(run.at.epoch, run.validation_score())
                after_epoch(run.at.epoch)
                run.save_checkpoint()  # the epoch's last write: every file it names is written
                log(run.epoch_line())
        run.evaluate_curves()  # the end of training, if it fell between two eval_every points
        if world.main:
            run.metrics.flush()
        if run.best:
            run.restore_best_epoch()
        summary = summarise(model, data, cfg, run.at.epoch, run.at.seconds / max(run.at.epoch, 1), run.device, progress,
                            log, world, compile=False if cfg.compile is False else "auto")
        summary["compile"] = run.compile_summary()
        if run.best:
            summary["early_stopping"] = run.early_stopping_summary()
        summary["commands"] = run.commands
        if world.main:
            write_json(summary, run.dir / "metrics.json")
        return summary


def claim_run_dir(held, run_dir, resume=False, overwrite=False, log=print):
    """The run directory, made, locked for as long as `held` (an ExitStack) is, and checked: a new run
    refuses one that holds a run unless `overwrite`. Files that a process killed mid-write left are
    removed (under the lock, no other run writes there)."""
    run_dir = make_run_dir(run_dir)
    held.enter_context(exclusive(run_dir))
    clear_parts(run_dir, log)
    if not resume:
        check_new_run(run_dir, overwrite)
    return run_dir


DIVERGED_NATS = 1e5  # a loss past this many nats per digit (the uniform model scores 543) has diverged


class Interrupted(TrainingError):
    """Training was stopped by a signal after a checkpoint was written; says how to resume."""

    def __init__(self, signum, step, run_dir):
        self.signum, self.step, self.run_dir = signum, step, run_dir
        self.what = "interrupted" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"
        super().__init__(f"{self.what} at step {step}; checkpoint saved in {run_dir}; train it again with "
                         "`resume=True` to go on")


@dataclass
class Progress:
    """Where a run is: epochs done, steps into the current epoch, steps in all, training seconds (steps
    only, compiling apart: `compile_seconds`)."""

    epoch: int = 0
    step_in_epoch: int = 0
    step: int = 0
    seconds: float = 0.0
    compile_seconds: float = 0.0


class Training:
    """A run in progress: the model and its SVI, the run directory's files, and where it is (`at`)."""

    def __init__(self, model, data, cfg, run_dir, resume, log, command=None, world=ONE_PROCESS, replacing=False):
        """`replacing`: the folder's old run is removed once this one has passed its checks."""
        self.model, self.data, self.cfg, self.dir, self.log, self.world = model, data, cfg, run_dir, log, world
        self.device = torch.device(cfg.device)
        self.num_train, self.steps = check_training_data(data, cfg)
        check_data_parallel(model, cfg, world)
        self.curves = {split: random_digits(scored_digits(data, cfg, split), cfg.eval_digits) for split in data.splits}
        bound = trained_bound(model, cfg)
        self.curve_estimators = estimators(model, cfg.guide, split="curves") + ([bound] if bound else [])

        checkpoint = world.on_main(lambda: checked_checkpoint(self.checkpoint_path, cfg)) if resume else None
        self.data_fingerprint = world.on_main(lambda: data_fingerprint(data))  # (rank 0 alone writes and checks it)
        if checkpoint:
            world.on_main(lambda: check_same_data(checkpoint, self.data_fingerprint, self.dir, cfg.data_dir))
        self.run_id = (checkpoint or {}).get("run") or new_run_id()
        self.compiled, self.compile_why = compile_decision(model, cfg, self.steps * cfg.epochs,
                                                           checkpoint.get("compiled", False) if checkpoint else None)
        pyro.clear_param_store()
        pyro.set_rng_seed(cfg.seed)
        model.reset_parameters()
        self.guide = model.guide(cfg.guide)
        elbo = model.elbo(cfg.guide, cfg.elbo, jit=cfg.jit, particles=cfg.particles, compile=self.compiled)
        if cfg.jit:
            warnings.warn("`jit=True` compiles with TorchScript (torch.jit.trace), which PyTorch has deprecated; "
                          "`compile=True` replaces it and runs faster (BENCHMARKS.md)", FutureWarning, stacklevel=3)
        self.svi = SVI(model.model, self.guide, elbo, OPTIMIZERS[cfg.optimizer], cfg.lr,
                       (world.shard(data.binary("train", 0)[: cfg.batch_size]),), world, compile=self.compiled)
        self.loss_name = model.loss_name(cfg.guide, cfg.elbo)
        self.selected = selection_estimator(model, cfg, self.curve_estimators)
        self.commands = [command]  # this invocation's; a resumed run's earlier ones go before it
        self.at, best_state = self.resume(checkpoint) if resume else (Progress(), None)
        self.metrics = world.on_main(lambda: MetricsLog(self.dir / "metrics.csv",
                                                        up_to_step=self.at.step if resume else None))
        if replacing and world.main:  # the new run has passed its checks: the old one goes before the first write
            remove_old_run(self.dir)
        self.best = BestEpoch(model, self.dir / "best.pt", cfg.patience, self.selected, self.run_id, best_state,
                              self.at.epoch, log, world) if cfg.patience else None
        self.running_loss = math.nan
        if world.main:
            write_json(asdict(cfg), self.dir / "config.json")
        if self.compiled:
            log(f"compiling the training step with torch.compile ({self.compile_why}): its first step traces and "
                "compiles it, in seconds (less where inductor's cache holds it)")

    @property
    def checkpoint_path(self):
        return self.dir / "checkpoint.pt"

    def resume(self, checkpoint):
        """Restore params, optimizer, RNG and progress from the checkpoint (rank 0's, sent to every
        rank): (progress, early stopping state)."""
        if self.cfg.jit:
            self.jit_trace_training_step()
        defaults = self.svi.optimizer.defaults  # the saved state holds the old rate and implementation, and
        chosen = {key: defaults[key] for key in ("fused", "foreach") if key in defaults}  # a resume may change
        try:  # the rate and `compile` (the implementation before loading: it decides where the state goes)
            restore_snapshot(self.model, checkpoint, self.device)
            saved = checkpoint["optimizer"]
            self.svi.optimizer.load_state_dict({**saved, "param_groups": [{**group, **chosen, "lr": self.cfg.lr}
                                                                          for group in saved["param_groups"]]})
        except (RuntimeError, KeyError, ValueError, AttributeError, TypeError) as error:
            raise TrainingError(f"{self.checkpoint_path} does not fit this model ({type(error).__name__}: "
                                f"{str(error).splitlines()[0]}); delete it and start the run again") from None
        set_rng_state(checkpoint["rng"], self.device)
        at = Progress(**checkpoint["progress"])
        self.log(f"resuming {self.dir} at epoch {at.epoch + 1}, step {at.step}" if at.epoch < self.cfg.epochs else
                 f"{self.dir} had finished its {self.cfg.epochs} epochs: evaluating it and drawing its figures again")
        self.commands[:0] = checkpoint.get("commands", ["not recorded (a checkpoint of older code)"])
        return at, checkpoint.get("best")

    def jit_trace_training_step(self):
        """Trace the JIT ELBO's gradient step now, before the saved params and RNG state are restored.
        Tracing runs the model and guide once more than a compiled step does, drawing extra random
        numbers: an uninterrupted run pays that at its first step, so a resumed run must pay it
        before its RNG state is restored, or its draws would be shifted from then on."""
        batch = self.world.shard(self.data.binary("train", 0)[: self.cfg.batch_size])
        with self.svi.same_draws():
            self.svi.elbo.loss_and_grads(self.svi.model, self.svi.guide, batch, *self.model.step_args(0.0, self.device))
        self.svi.optimizer.zero_grad()

    def save_checkpoint(self):
        """metrics.csv, then the checkpoint: a kill between the two leaves rows past the checkpoint,
        which a resumed run drops, never a checkpoint whose rows are lost. Rank 0's: every rank holds
        the same state."""
        if not self.world.main:
            return
        self.metrics.flush()
        atomic_torch_save({
            "format": CHECKPOINT_FORMAT,
            "config": asdict(self.cfg),
            **snapshot(self.model),
            "optimizer": self.svi.optimizer.state_dict(),
            "rng": rng_state(self.device),
            "progress": asdict(self.at),
            "compiled": self.compiled,
            "best": self.best.state() if self.best else None,
            "commands": self.commands,
            "run": self.run_id,
            "data": self.data_fingerprint,
            "state_files": list(self.model.state_files),
        }, self.checkpoint_path)

    def evaluate_curves(self):
        """One point of every learning curve, unless this step has one (a resumed run that had finished)."""
        if self.metrics.last_step() == self.at.step:
            return
        with evaluation_rng(self.cfg.seed, self.device):
            for split, x in self.curves.items():
                for name, value in mean_estimates(self.model, self.cfg.guide, x, self.curve_estimators,
                                                  self.world).items():
                    self.metrics.add(self.at.step, self.epochs_completed, round(self.at.seconds, 3), split, name, value)

    @property
    def epochs_completed(self):
        """Epochs whose every step is taken: metrics.csv's `epoch`. The last step of an epoch completes it,
        before `train_epoch` moves `at.epoch` on, so a point evaluated there belongs to the finished epoch."""
        return self.at.epoch + (self.at.step_in_epoch == self.steps)

    def validation_score(self):
        with evaluation_rng(self.cfg.seed, self.device):  # the same draws every epoch: scores differ by the params only
            return mean_estimates(self.model, self.cfg.guide, self.curves["valid"], [self.selected],
                                  self.world)[self.selected]

    def train_epoch(self, interrupt, progress):
        """The rest of the current epoch's steps, in the epoch's own batch order."""
        cfg, at = self.cfg, self.at
        x_epoch = self.data.binary("train", at.epoch)[: self.num_train]
        order = torch.randperm(self.num_train, generator=epoch_generator(cfg.seed, at.epoch, self.device),
                               device=self.device)
        with tqdm(total=self.steps, initial=at.step_in_epoch, disable=not progress, desc=f"epoch {at.epoch + 1}/"
                  f"{cfg.epochs}", unit="step", leave=False) as bar:
            self.running_loss = math.nan
            while at.step_in_epoch < self.steps:
                batch = x_epoch[order[at.step_in_epoch * cfg.batch_size: (at.step_in_epoch + 1) * cfg.batch_size]]
                signals = None if self.world.size == 1 else torch.tensor(  # (several processes share their signals)
                    [interrupt["requested"] == signum for signum in STOP_SIGNALS], dtype=torch.float)
                self.step(self.world.shard(batch), signals)
                bar.set_postfix_str(f"{self.loss_name} {self.running_loss:.2f}")
                bar.update()
                if at.step % cfg.eval_every == 0:
                    self.evaluate_curves()
                # one process acts on a signal after the step; several on the signals they had before it, summed
                requested = interrupt["requested"] if self.world.size == 1 else next(
                    (signum for signum, count in zip(STOP_SIGNALS, signals) if count), None)
                if requested:
                    self.save_checkpoint()
                    raise Interrupted(requested, at.step, self.dir)
        at.epoch, at.step_in_epoch = at.epoch + 1, 0

    def step(self, batch, signals=None):
        """One SVI step on `batch` (this process's shard of it; `signals` summed over the processes);
        a non-finite loss stops the run with what went non-finite."""
        at = self.at
        started, compiling = time.perf_counter(), self.svi.compile_seconds
        try:
            args = self.model.step_args(at.epoch + (at.step_in_epoch + 1) / self.steps, self.device)
            loss = self.svi.step(batch, *args, extras=signals) / self.cfg.batch_size
        except ValueError as error:  # Pyro's validation meeting a value that went non-finite or out of range
            if all(torch.isfinite(p).all() for _, p in pyro.get_param_store().named_parameters()):
                if "Expected parameter" not in str(error):
                    raise
                invalid = str(error).splitlines()[0].split(" but found invalid values")[0]  # not Pyro's tensor dump
                raise TrainingError(f"training diverged at step {at.step + 1} (epoch {at.epoch + 1}): {invalid}. "
                                    f"{self.last_checkpoint()}; try a smaller `lr`") from None
            loss = math.nan
        compiled = self.svi.compile_seconds - compiling
        at.seconds += time.perf_counter() - started - compiled  # steps only: neither evaluation nor compiling
        at.compile_seconds += compiled
        if compiled:
            self.log(f"compiled the training step in {compiled:.1f} s")
        if not math.isfinite(loss):
            raise TrainingError(
                f"the loss became {loss} at step {at.step + 1} (epoch {at.epoch + 1}); not finite: "
                f"{diagnose_nonfinite(self.model.model, self.guide, batch)}. {self.last_checkpoint()}; try a "
                "smaller `lr`, or `detect_anomaly=True` to find the operation"
            )
        if abs(loss) > DIVERGED_NATS:
            raise TrainingError(f"training diverged: the loss reached {loss:.3g} nats per digit at step {at.step + 1} "
                                f"(epoch {at.epoch + 1}). {self.last_checkpoint()}; try a smaller `lr`")
        at.step_in_epoch += 1
        at.step += 1
        self.running_loss = loss if math.isnan(self.running_loss) else 0.98 * self.running_loss + 0.02 * loss

    def compile_summary(self):
        """metrics.json's `compile`: whether the step was compiled, why, and the seconds compiling took
        (kept apart from `seconds_per_epoch`): the training step's over the whole run, the final
        estimates' in this invocation."""
        return {"compiled": self.compiled, "why": self.compile_why, "ran_eagerly": self.svi.ran_eagerly,
                "training_step_seconds": self.at.compile_seconds, "evaluation_seconds": compiled_seconds(self.model)}

    def last_checkpoint(self):
        if self.checkpoint_path.exists():
            return f"The last good checkpoint is kept in {self.checkpoint_path}"
        return "No checkpoint was written (the first epoch had not ended)"

    def epoch_line(self):
        at, best = self.at, self.best
        return (f"epoch {at.epoch}/{self.cfg.epochs}: {self.loss_name} {self.running_loss:.2f} (moving average over "
                f"train batches), {at.seconds / at.epoch:.1f} s/epoch"
                + (f"; best valid {self.selected} {best.value:.2f} at epoch {best.epoch}" if best else ""))

    def restore_best_epoch(self):
        self.stopped_early = self.best.exhausted(self.at.epoch)
        if not math.isfinite(self.best.value):  # no epoch scored since best.pt was lost: the last is reported
            self.best.epoch = self.at.epoch
            self.log(f"note: no epoch was scored on the valid digits since early stopping started afresh; the final "
                     f"numbers and figures are those of the last epoch, {self.at.epoch}")
            return
        self.log(f"{'early stopping: ' if self.stopped_early else ''}{self.at.epoch} epochs trained; the final numbers "
                 f"and figures are those of epoch {self.best.epoch}, the best valid {self.selected} "
                 f"({self.best.value:.2f} on {len(self.curves['valid'])} digits)")
        self.best.restore(self.device)

    def early_stopping_summary(self):
        best = self.best
        return dict(patience=self.cfg.patience, epochs_trained=self.at.epoch, stopped_early=self.stopped_early,
                    best_epoch=best.epoch, estimator=self.selected,
                    selected_by=f"{self.selected} on {len(self.curves['valid'])} fixed random valid digits",
                    best_value=best.value, valid_scores=best.scores)


def check_training_data(data, cfg):
    """Refuse settings the data cannot serve; return (training digits used, steps per epoch)."""
    empty = [split for split in data.splits if data.images[split].shape[0] == 0]
    if empty:
        raise DataError(f"{data.name}'s {' and '.join(empty)} split has no digits: nothing to train on or score; "
                        "check the data files")
    available = data.images["train"].shape[0]
    num_train = cfg.train_subset or available
    if num_train > available:
        raise SettingError(f"`train_subset={num_train}` is more than the {available} training digits there are")
    if cfg.batch_size > num_train:
        raise SettingError(f"`batch_size={cfg.batch_size}` is larger than the {num_train} training digits")
    if cfg.patience and "valid" not in data.splits:
        raise SettingError(f"`patience` stops on the validation split, and {data.name} has none "
                           f"(its splits: {', '.join(data.splits)}); use `dataset='binarized-mnist'`")
    return num_train, steps_per_epoch(cfg, data)


def check_data_parallel(model, cfg, world):
    """Refuse what several processes cannot train as one would."""
    if world.size == 1:
        return
    if cfg.batch_size % world.size:
        choices = " or ".join(f"`batch_size={batch}`" for batch in nearest_multiples(cfg.batch_size, world.size))
        raise SettingError(f"`batch_size={cfg.batch_size}` does not split evenly over {world.size} processes, each of "
                           f"which takes an equal share of every batch; use {choices} (the global batch: the processes "
                           "take together the step one process takes on it, so `lr` needs no change)")
    if cfg.jit:
        raise SettingError(f"`jit=True` trains in one process: its compiled step does not draw the random numbers one "
                           f"process draws, so {world.size} processes would not take one process's steps; drop `jit`")
    refusal = model.data_parallel_refusal(cfg.guide, cfg.elbo)
    if refusal:
        raise SettingError(refusal)


AUTO_COMPILE_STEPS = 2000  # `compile='auto'` compiles a run of this many steps or more (docs/compiling.md)


def compile_decision(model, cfg, steps, started_compiled=None):
    """(whether the run compiles its step, why). `compile=True` compiles, or refuses with the reason
    this run cannot be compiled (`check_compile`); 'auto' compiles where it can and the run has
    `steps` >= AUTO_COMPILE_STEPS to repay the seconds compiling costs, and a resumed run as it
    started (`started_compiled`), so that it ends where an uninterrupted one would."""
    if cfg.compile is False:
        return False, "`compile=False`"
    check_compile(model, cfg)
    if cfg.compile is True:
        return True, "`compile=True`"
    reason = compile_refusal(model, cfg)
    if reason:
        return False, f"'auto': not compiled, since {reason}"
    if started_compiled is not None:
        return started_compiled, f"'auto': {'compiled' if started_compiled else 'not compiled'}, as the run started"
    if steps < AUTO_COMPILE_STEPS:
        return False, f"'auto': not compiled, {steps:,} steps being too few to repay compiling (fewer than " \
                      f"{AUTO_COMPILE_STEPS:,})"
    return True, f"'auto': {steps:,} steps"


def check_compile(model, cfg):
    """Refuse `compile=True` for a run whose step cannot be compiled, saying why."""
    reason = compile_refusal(model, cfg) if cfg.compile is True else None
    if reason:
        raise SettingError(reason if reason.startswith("`compile=True`") else f"`compile=True`: {reason}")


def compile_refusal(model, cfg):
    """Why this run's training step cannot be compiled (a message naming settings), or None."""
    if cfg.jit:
        return "`jit=True` compiles the step with TorchScript instead; drop `jit` (PyTorch has deprecated TorchScript)"
    if cfg.detect_anomaly:
        return "`detect_anomaly=True` watches eager autograd, which a compiled step does not run; drop `compile`"
    try:
        model.elbo(cfg.guide, cfg.elbo, particles=cfg.particles, compile=True)
    except SettingError as error:
        return str(error)
    return None


def checked_checkpoint(path, cfg):
    checkpoint = load_checkpoint(path)
    check_resumable(checkpoint, cfg, path)
    return checkpoint


def scored_digits(data, cfg, split):
    """The digits of a split that its learning curves and final numbers are over: of the training split,
    only those trained on (the first `train_subset`), so a train figure says how the model fits its data."""
    return data.binary(split)[: cfg.train_subset if split == "train" else None]


def trained_bound(model, cfg):
    """The k-sample bound a run trains on, iwae-k, for an importance-weighted objective with k > 1
    particles (its one-sample ELBO can fall while the bound it trains rises); else None."""
    if cfg.elbo in model.importance_weighted_elbos and cfg.particles > 1:
        return f"iwae-{cfg.particles}"
    return None


def selection_estimator(model, cfg, names):
    """What early stopping maximises on the valid digits: the exact log-likelihood where the model
    has one; else the training objective's own bound (`trained_bound`); else the ELBO."""
    return "exact" if "exact" in names else trained_bound(model, cfg) or names[0]


LONG_EVALUATION_SECONDS = 20  # a final estimate expected to take longer is announced with its cost


def summarise(model, data, cfg, epochs, seconds_per_epoch, device, progress=True, log=print, world=ONE_PROCESS,
              compile=False):
    """metrics.json: final -> split -> estimator -> mean log-likelihood per digit (nats), on every
    digit of each split, of train those trained on (`final_digits` says how many); iwae-k with
    `eval_samples=k` on test only (`eval_samples=None`: iwae-1000 where no exact log-likelihood is
    reported). Each estimate draws from its own stream seeded by the run's seed; one that will take
    long is announced first. The processes of `world` share the work; `compile` is
    `per_digit_estimate`'s."""
    def final_estimate(split, name):  # each from the run's seed: `ppl_models.load(run).log_prob` says the same
        x = scored_digits(data, cfg, split)
        with evaluation_rng(cfg.seed, device):
            seconds = seconds_to_estimate(model, cfg.guide, x, name, world.size)
        if seconds > LONG_EVALUATION_SECONDS:
            where = "on this machine" if world.size == 1 else f"in {world.size} processes"
            log(f"final {name} on {len(x):,} {split} digits: about {duration(seconds)} {where}"
                + ("; `eval_samples=0` skips it" if name.startswith("iwae-") else ""))
        with evaluation_rng(cfg.seed, device), torch.no_grad():
            return per_digit_estimate(model, cfg.guide, x, name, progress, world=world, compile=compile).mean().item()

    final = {split: {name: final_estimate(split, name) for name in estimators(model, cfg.guide, split=split)}
             for split in data.splits}
    samples = cfg.eval_samples if cfg.eval_samples is not None else 0 if "exact" in final["test"] else \
        AUTO_EVAL_SAMPLES
    if samples and cfg.guide not in model.exact_guides:
        final["test"][f"iwae-{samples}"] = final_estimate("test", f"iwae-{samples}")
    return {
        "model": cfg.model,
        "guide": cfg.guide,
        "dataset": cfg.dataset,
        "binarize": data.binarize,
        "epochs": epochs,
        "train_digits": cfg.train_subset or len(data.images["train"]),
        "seconds_per_epoch": seconds_per_epoch,
        "units": "mean log-likelihood per digit, nats",
        "final_digits": {split: len(scored_digits(data, cfg, split)) for split in data.splits},
        "final": final,
    }


# ---- early stopping --------------------------------------------------------------------------
class BestEpoch:
    """Early stopping (`patience`): the validation score after every epoch, the params of the best
    epoch so far kept in best.pt, and whether `patience` epochs have passed without a better one."""

    def __init__(self, model, path, patience, estimator, run_id, state=None, epoch=0, log=print, world=ONE_PROCESS):
        self.model, self.path, self.patience, self.estimator = model, Path(path), patience, estimator
        self.run_id, self.world = run_id, world
        if state and state.get("estimator", estimator) == estimator:
            self.epoch, self.value, self.scores = state["epoch"], state["value"], state.get("scores", [])
            if math.isfinite(self.value) and self.load() is None:
                log(f"note: {self.path} is missing, unreadable or another run's, so the best epoch so far "
                    f"({self.epoch}) is lost; early stopping starts afresh from epoch {epoch}")
                self.epoch, self.value = epoch, -math.inf
        else:  # nothing scored with this estimator yet (or a saved best of another one): count from `epoch`
            self.epoch, self.value, self.scores = epoch, -math.inf, []

    def update(self, epoch, value):
        self.scores.append([epoch, value])  # every epoch's score, reported beside the best
        if value > self.value:
            self.epoch, self.value = epoch, value
            if self.world.main:
                atomic_torch_save({**snapshot(self.model), "run": self.run_id}, self.path)

    def exhausted(self, epoch):
        return epoch - self.epoch >= self.patience

    def state(self):
        return dict(epoch=self.epoch, value=self.value, estimator=self.estimator, scores=self.scores)

    def load(self):
        """best.pt's snapshot (rank 0's, on every rank), or None if it is missing or unreadable."""
        def read():
            try:
                return read_snapshot(self.path, self.run_id)
            except TrainingError:
                return None

        return self.world.on_main(read)

    def restore(self, device):
        saved = self.load()
        if saved is None:
            raise TrainingError(f"{self.path} is missing or unreadable, so the best epoch's model is lost; resume the "
                                "run (`resume=True`): early stopping then starts afresh from its last epoch")
        restore_snapshot(self.model, saved, device)


# ---- RNG, signals, numerics ------------------------------------------------------------------
def epoch_generator(seed, epoch, device):
    """The generator of one epoch's batch order: a function of (seed, epoch) only."""
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + epoch)


@contextmanager
def evaluation_rng(seed, device):
    """Evaluation draws from its own seeded stream and leaves training's untouched."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextmanager
def interrupt_between_steps(signals=STOP_SIGNALS):
    """Ctrl-C (SIGINT) or SIGTERM (what kill, Docker, systemd and Slurm send) records the signal in
    a flag that the loop reads after each step, so a checkpoint never holds a half-applied update."""
    flag = {"requested": None}

    def handler(signum, frame):
        flag["requested"] = flag["requested"] or signum  # the first says how the run ended

    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = {signum: signal.signal(signum, handler) for signum in signals}
    try:
        yield flag
    finally:
        if flag["requested"]:  # the process is ending: a second signal must not cut its checkpoint or last line
            ignore_stop_signals()
        else:
            for signum, handling in previous.items():
                signal.signal(signum, handling)


def ignore_stop_signals():
    """Ignore Ctrl-C and SIGTERM from now on: for a process that is ending because of one of them."""
    if threading.current_thread() is threading.main_thread():
        for signum in STOP_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)


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
