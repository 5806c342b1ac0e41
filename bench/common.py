"""What every benchmark shares: the data, the clock, and the table row."""

import time

import torch

from ppl_models.data import load_dataset


def training_batches(device, batch_size=100):
    """binarized-mnist's 50,000 training digits in a fixed shuffled order, as batches."""
    x = load_dataset("binarized-mnist", device=device, progress=False).binary("train")
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0)).to(device)
    return [x[i] for i in order.split(batch_size)]


def epoch_seconds(step, batches, device, steps=None):
    """Seconds for one epoch of `step`: timed over `steps` batches (all by default) after three
    warm-up steps (parameter creation, lazy imports, JIT compilation), scaled to the epoch."""
    steps = steps or len(batches)
    for batch in batches[:3]:
        step(batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for batch in batches[:steps]:
        step(batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - started) * len(batches) / steps


def ratio_rows(benchmark, timings, log=print):
    """Table rows (benchmark, variant, seconds, ratio to the first timing, the plain-PyTorch
    reference) from [(variant, seconds)], each printed as it is made."""
    reference = timings[0][1]
    rows = []
    for variant, seconds in timings:
        rows.append((benchmark, variant, seconds, seconds / reference))
        log(f"{benchmark}: {variant}: {seconds:.2f} s ({seconds / reference:.2f}x)")
    return rows
