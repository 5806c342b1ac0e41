"""What every benchmark shares: the data, the Pyro steps, the clock, and the table row."""

import statistics
import time
from contextlib import nullcontext

import pyro
import pyro.optim
import torch

from ppl_models.compiled import flushing_denormals
from ppl_models.data import load_dataset
from ppl_models.distributed import ONE_PROCESS
from ppl_models.models import build_model
from ppl_models.train import SVI


def training_batches(device, batch_size=100):
    """binarized-mnist's 50,000 training digits in a fixed shuffled order, as batches."""
    x = load_dataset("binarized-mnist", device=device, progress=False).binary("train")
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0)).to(device)
    return [x[i] for i in order.split(batch_size)]


def pyro_step(name, model_args, guide_name, optimizer, lr, first_batch, jit=False, stock=False, elbo_name=None,
              model=None, world=ONE_PROCESS, compile=False, flush=True):
    """A fresh model's SVI step. `stock=False`: the step run.py takes (ppl_models.train.SVI, one
    PyTorch optimizer over the param store; in a `world` of processes, each given its shard of the
    batch; with `compile`, compiled as run.py --compile compiles it, denormals flushed unless not
    `flush`); `stock=True`: pyro.infer.SVI with pyro.optim's per-param optimizers, for comparison.
    `optimizer` names both ("Adam", "RMSprop")."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    model = model or build_model(name, model_args, first_batch.device)
    guide = model.guide(guide_name)
    elbo = model.elbo(guide_name, elbo_name, jit=jit, compile=compile)
    if stock:
        return pyro.infer.SVI(model.model, guide, getattr(pyro.optim, optimizer)({"lr": lr}), elbo).step
    svi = SVI(model.model, guide, elbo, getattr(torch.optim, optimizer), lr, (world.shard(first_batch),), world,
              compile=compile)
    if not (compile and flush):
        return svi.step

    def step(*args):
        with flushing_denormals():
            return svi.step(*args)

    return step


def plain_step(loss, optimizer, compile=False, flush=False):
    """The plain-PyTorch training step: `loss(x)` (compiled by torch.compile if `compile`), backward,
    the optimizer's step; denormals flushed if `flush`."""
    loss = torch.compile(loss) if compile else loss

    def step(x):
        with flushing_denormals() if flush else nullcontext():
            value = loss(x)
            optimizer.zero_grad()
            value.backward()
            optimizer.step()
        return value.item()

    return step


def one_epoch(step, batches, device, steps=None):
    """Seconds for `steps` batches of `step` (all by default), scaled to the whole epoch."""
    steps = steps or len(batches)
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for batch in batches[:steps]:
        step(batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - started) * len(batches) / steps


def interleaved_rows(benchmark, variants, batches, device, rounds=3, log=print):
    """Table rows (benchmark, variant, seconds per epoch, ratio to the first variant, the reference)
    for `variants` [(name, build, steps)]: each `build()` makes its step in a Pyro param store of its
    own and takes three warm-up steps (parameter creation, lazy imports, compiling); then in each of
    `rounds` rounds every variant times one epoch (`steps` batches scaled to the epoch, all if None),
    interleaved so that a slow moment of a shared machine hits every variant; the median of the
    rounds. A variant whose build returns None is left out (a peer that is not installed)."""
    store = pyro.get_param_store()
    built = []
    for name, build, steps in variants:
        with store.scope() as params:
            step = build()
            if step is None:
                continue
            for batch in batches[:3]:
                step(batch)
        built.append((name, step, steps, params))
    timings = {name: [] for name, *_ in built}
    for _ in range(rounds):
        for name, step, steps, params in built:
            with store.scope(params):
                timings[name].append(one_epoch(step, batches, device, steps))
    return ratio_rows(benchmark, [(name, statistics.median(times)) for name, times in timings.items()], log)


def ratio_rows(benchmark, timings, log=print):
    """Table rows (benchmark, variant, seconds, ratio to the first timing, the plain-PyTorch
    reference) from [(variant, seconds)], each printed as it is made."""
    reference = timings[0][1]
    rows = []
    for variant, seconds in timings:
        rows.append((benchmark, variant, seconds, seconds / reference))
        log(f"{benchmark}: {variant}: {seconds:.2f} s ({seconds / reference:.2f}x)")
    return rows
