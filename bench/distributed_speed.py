"""Data parallelism on this machine: the same work in 1 process x 1 thread, 1 process x 2 threads
and 2 processes x 1 thread (torch.distributed, gloo), with ppl_models' own training step and
evaluation:

  - an epoch of the VAE (z-dim 40, MLP 300-300, 500 steps of 100 digits), from `--steps` steps;
  - the final iwae-5000 on binarized-mnist's 10,000 test digits, from `--digits` digits;
  - one exact step of the sigmoid belief net at M = 18 (2^18 codes summed for 100 digits), and its
    exact log-likelihood of the 10,000 test digits, from `--sbn-digits` digits (the processes
    share the codes);
  - the all-reduce each step makes (bytes, and seconds from 200 repetitions), and each step at 2
    digits per process: the part of a step that does not shrink as the processes share the batch;
  - how far the layouts' params are apart after `--agreement-steps` steps of that VAE from the same
    start (the same steps, their floating-point sums ordered differently).

    PPL_MODELS_DATA=../shared/data python bench/distributed_speed.py

The layouts run one after the other, `--repeats` times each, interleaved; medians are reported.
"""

import argparse
import socket
import statistics
import tempfile
import time
from pathlib import Path

import pyro
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ppl_models.data import load_dataset
from ppl_models.distributed import current
from ppl_models.evaluate import per_digit_estimate
from ppl_models.models import build_model

from common import pyro_step, training_batches

VAE = {"z_dim": 40, "hidden": (300, 300)}
STEPS_PER_EPOCH = 500


def clock(world):
    if world.size > 1:
        dist.barrier()
    return time.perf_counter()


def step_seconds(step, batches, world):
    step(world.shard(batches[0]))  # warm-up
    started = clock(world)
    for batch in batches[1:]:
        step(world.shard(batch))
    return (clock(world) - started) / (len(batches) - 1)


def parameter_count():
    return sum(p.numel() for _, p in pyro.get_param_store().named_parameters())


def allreduce_seconds(world, numel, repeats=200):
    flat = torch.zeros(numel)
    world.sum(flat)
    started = clock(world)
    for _ in range(repeats):
        world.sum(flat)
    return (clock(world) - started) / repeats


def trained(world, batches, steps, last=100):
    """The bench VAE after `steps` steps from its seeded start, one batch each: its params, and its
    -ELBO per digit over the `last` steps."""
    step = pyro_step("vae", VAE, "normal", "Adam", 1e-3, batches[0], world=world)
    losses = [step(world.shard(batch)) / len(batch) for batch in batches[:steps]]
    return {"params": {name: p.detach().clone() for name, p in pyro.get_param_store().named_parameters()},
            "loss": statistics.mean(losses[-last:])}


def time_layout(rank, size, threads, port, args, out):
    """One process of one layout: its timings, and the VAE `trained` for `args.agreement_steps`, saved by rank 0."""
    torch.set_num_threads(threads)
    if size > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size)
    world = current()
    batches = training_batches(torch.device("cpu"))
    results = {}
    vae = build_model("vae", VAE)
    step = pyro_step("vae", VAE, "normal", "Adam", 1e-3, batches[0], model=vae, world=world)
    results["vae epoch"] = step_seconds(step, batches[:args.steps + 1], world) * STEPS_PER_EPOCH
    results["vae parameters"] = parameter_count()
    small = [batch[:2 * size] for batch in batches[:args.steps + 1]]
    results["vae step of 2 digits per process"] = step_seconds(step, small, world)
    test = load_dataset("binarized-mnist", progress=False).binary("test")
    with torch.no_grad():
        per_digit_estimate(vae, "normal", test[:1], "iwae-5000")  # warm-up
        started = clock(world)
        per_digit_estimate(vae, "normal", test[:args.digits], "iwae-5000", world=world)
        results["iwae-5000, 10,000 digits"] = (clock(world) - started) * len(test) / args.digits
    sbn = build_model("sbn", {"latents": 18})
    step = pyro_step("sbn", {"latents": 18}, "enum", "Adam", 1e-3, batches[0], model=sbn, world=world)
    results["sbn M=18 exact step"] = step_seconds(step, batches[:3], world)
    results["sbn M=18 exact step of 2 digits per process"] = step_seconds(step, [b[:2 * size] for b in batches[:3]],
                                                                          world)
    results["sbn parameters"] = parameter_count()
    per_digit_estimate(sbn, "enum", test[:1], "exact", world=world)  # warm-up
    started = clock(world)
    per_digit_estimate(sbn, "enum", test[:args.sbn_digits], "exact", world=world)
    results["sbn M=18 exact log p(x), 10,000 digits"] = (clock(world) - started) * len(test) / args.sbn_digits
    results["vae trained"] = trained(world, batches, args.agreement_steps)
    if size > 1:
        for name in ("vae", "sbn"):
            results[f"all-reduce, {name}"] = allreduce_seconds(world, results[f"{name} parameters"] + 3)
        dist.destroy_process_group()
    if rank == 0:
        torch.save(results, out)


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


LAYOUTS = {"1 process x 1 thread": (1, 1), "1 process x 2 threads": (1, 2), "2 processes x 1 thread": (2, 1)}
ROWS = ("vae epoch", "vae step of 2 digits per process", "iwae-5000, 10,000 digits", "sbn M=18 exact step",
        "sbn M=18 exact step of 2 digits per process", "sbn M=18 exact log p(x), 10,000 digits")


def measure(args, log=print):
    """Every layout, `args.repeats` times each, interleaved: the markdown section of BENCHMARKS.md."""
    out = Path(tempfile.mkdtemp()) / "timings.pt"  # where each layout's rank 0 leaves its timings
    runs = {layout: [] for layout in LAYOUTS}
    for repeat in range(args.repeats):
        for layout, (size, threads) in LAYOUTS.items():
            log(f"distributed_speed: run {repeat + 1}/{args.repeats}, {layout}")
            mp.start_processes(time_layout, args=(size, threads, free_port(), args, out), nprocs=size,
                               start_method="spawn")
            runs[layout].append(torch.load(out))
    alone, threads, two = ({key: statistics.median(run[key] for run in runs[layout]) for key in runs[layout][0]
                            if key != "vae trained"} for layout in LAYOUTS)
    lines = [
        "## Processes against threads (torch.distributed)", "",
        f"The same work in one process with one thread, in one process with 2 threads and in 2 processes with one "
        f"thread each (gloo, loopback), with ppl_models' training step and evaluation; the median of {args.repeats} "
        f"interleaved runs (bench/distributed_speed.py: VAE z-dim 40, MLP 300-300, from {args.steps} steps; "
        f"iwae-5000 from {args.digits} test digits; the SBN's exact log p(x) from {args.sbn_digits}). A step 'of 2 "
        "digits per process' is the part of a step that does not shrink as processes share the batch; the "
        "speed-ups are those of 2 processes.", "",
        f"| work | {' | '.join(LAYOUTS)} | speed-up on 1 x 1 | on 1 x 2 |", "| --- | --- | --- | --- | --- | --- |",
        *(f"| {key} | {alone[key]:.3g} s | {threads[key]:.3g} s | {two[key]:.3g} s | {alone[key] / two[key]:.2f}x | "
          f"{threads[key] / two[key]:.2f}x |" for key in ROWS),
    ]
    for name in ("vae", "sbn"):
        numel = two[f"{name} parameters"] + 3
        lines.append(f"| all-reduce of a {name} step: {numel:,.0f} floats, {numel * 4 / 1e6:.2f} MB | | | "
                     f"{two[f'all-reduce, {name}'] * 1e3:.2f} ms | | |")
    return lines + [""] + agreement_lines({layout: runs[layout][0]["vae trained"] for layout in LAYOUTS}, args)


def agreement_lines(trained, args):
    """How far each two layouts' VAEs are after the same steps (the runs are deterministic: the first's)."""
    def gaps(ours, theirs):
        differences = torch.cat([(ours[name] - theirs[name]).abs().flatten() for name in ours])
        return differences.max().item(), differences.mean().item()

    params = {layout: run["params"] for layout, run in trained.items()}
    largest = max(p.abs().max().item() for p in params["1 process x 1 thread"].values())
    layouts = list(LAYOUTS)
    pairs = [(one, other) for i, one in enumerate(layouts) for other in layouts[i + 1:]]
    return [
        f"After {args.agreement_steps} steps of that VAE (Adam, lr 1e-3, batches of 100 binarized-mnist digits) "
        f"from the same start, the params of the layouts differ by (the largest param is {largest:.3g}; the -ELBO "
        "per digit of the last 100 steps: " + ", ".join(f"{run['loss']:.3f} in {layout}" for layout, run in
                                                         trained.items()) + "):", "",
        "| layouts | largest difference | mean difference |", "| --- | --- | --- |",
        *(f"| {one} against {other} | {largest_gap:.3g} | {mean_gap:.3g} |"
          for one, other in pairs for largest_gap, mean_gap in [gaps(params[one], params[other])]), "",
    ]


def main():
    print("\n".join(measure(settings())))


def settings(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60, help="VAE steps timed (default: 60)")
    parser.add_argument("--digits", type=int, default=40, help="test digits for iwae-5000 (default: 40)")
    parser.add_argument("--sbn-digits", type=int, default=1000,
                        help="test digits for the SBN's exact log-likelihood (default: 1000)")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each layout (default: 2)")
    parser.add_argument("--agreement-steps", type=int, default=500,
                        help="VAE steps after which the layouts' params are compared (default: 500)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    main()
