"""What every benchmark shares: the data, the Pyro steps, the clock, and the table row."""

import statistics
import time

import pyro
import pyro.optim
import torch

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
              model=None, world=ONE_PROCESS):
    """A fresh model's SVI step. `stock=False`: the step run.py takes (ppl_models.train.SVI, one
    PyTorch optimizer over the param store; in a `world` of processes, each given its shard of the
    batch); `stock=True`: pyro.infer.SVI with pyro.optim's per-param optimizers, for comparison.
    `optimizer` names both ("Adam", "RMSprop")."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    model = model or build_model(name, model_args, first_batch.device)
    guide = model.guide(guide_name)
    elbo = model.elbo(guide_name, elbo_name, jit=jit)
    if stock:
        return pyro.infer.SVI(model.model, guide, getattr(pyro.optim, optimizer)({"lr": lr}), elbo).step
    return SVI(model.model, guide, elbo, getattr(torch.optim, optimizer), lr, (world.shard(first_batch),), world).step


def epoch_seconds(step, batches, device, steps=None, repeats=3):
    """Seconds for one epoch of `step`: the median of `repeats` timings over `steps` batches (all
    by default), after three warm-up steps (parameter creation, lazy imports, JIT compilation),
    scaled to the epoch. The median, because a shared machine has slow moments."""
    steps = steps or len(batches)
    for batch in batches[:3]:
        step(batch)
    timings = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        for batch in batches[:steps]:
            step(batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
        timings.append((time.perf_counter() - started) * len(batches) / steps)
    return statistics.median(timings)


def ratio_rows(benchmark, timings, log=print):
    """Table rows (benchmark, variant, seconds, ratio to the first timing, the plain-PyTorch
    reference) from [(variant, seconds)], each printed as it is made."""
    reference = timings[0][1]
    rows = []
    for variant, seconds in timings:
        rows.append((benchmark, variant, seconds, seconds / reference))
        log(f"{benchmark}: {variant}: {seconds:.2f} s ({seconds / reference:.2f}x)")
    return rows
