"""What `--compile` costs before it pays: seconds to trace and compile each family's training step
with inductor's cache empty (cold: a new machine, or a new model) and full (warm: the same model
again, from TORCHINDUCTOR_CACHE_DIR), each in a fresh process; and the steps that repay them.

    PPL_MODELS_DATA=../shared/data python bench/compile_time.py [--device cpu]

Each workload runs in its own process twice (cold, then warm: the same cache folder), and in each
the first compiled step is timed whole (building the model, tracing, Dynamo, AOTAutograd,
inductor's C++ build, the compiled optimizer's step, one step's work), then 200 steps of the
compiled and of the eager step
on binarized-mnist batches, the median of three rounds. Steps to repay: the compile seconds over
the seconds a step saves. Not a test: numbers depend on the machine.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORKLOADS = {  # name: (family, its settings, guide, elbo, optimizer, lr): the benchmarks' settings
    "mixture K=20, enum": ("mixture", {"components": 20}, "enum", None, "RMSprop", 0.01),
    "SBN M=200, bernoulli (score function)": ("sbn", {"latents": 200}, "bernoulli", None, "Adam", 1e-3),
    "VAE z-dim 2, MLP 200-200": ("vae", {"z_dim": 2, "hidden": (200, 200)}, "normal", "trace", "Adam", 1e-3),
    "VAE z-dim 40, MLP 300-300": ("vae", {"z_dim": 40, "hidden": (300, 300)}, "normal", "trace", "Adam", 1e-3),
}


def child(name, device):
    """In a fresh process: {compile seconds, eager and compiled ms per step} of one workload."""
    import pyro
    import torch

    from ppl_models.train import reproducible

    from common import one_epoch, pyro_step, training_batches

    family, settings, guide, elbo, optimizer, lr = WORKLOADS[name]
    device = torch.device(device)
    batches = training_batches(device)[:200]
    store = pyro.get_param_store()
    built, per_step = {}, {"eager": [], "compiled": []}
    with reproducible(device):
        for label in per_step:  # each in a param store of its own
            with store.scope() as params:
                started = time.perf_counter()
                step = pyro_step(family, settings, guide, optimizer, lr, batches[0], elbo_name=elbo,
                                 compile=label == "compiled")
                step(batches[0])
                built[label] = step, params, time.perf_counter() - started
        for _ in range(3):
            for label, (step, params, _) in built.items():
                with store.scope(params):
                    per_step[label].append(one_epoch(step, batches, device) / len(batches) * 1e3)
    compile_seconds = built["compiled"][2]
    return {"compile_seconds": compile_seconds, **{label: statistics.median(v) for label, v in per_step.items()}}


def measure(device="cpu", quick=False, log=print):
    """Rows (workload, cold s, warm s, eager ms/step, compiled ms/step, steps to repay cold, warm); `quick`:
    the smaller VAE only."""
    rows = []
    with tempfile.TemporaryDirectory() as cache:
        for name in WORKLOADS:
            if quick and name.startswith("VAE z-dim 40"):
                continue
            runs = []
            for _ in ("cold", "warm"):
                out = subprocess.run([sys.executable, __file__, "--child", name, "--device", device],
                                     env={**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(Path(cache) / "inductor")},
                                     capture_output=True, text=True, check=True)
                runs.append(json.loads(out.stdout.splitlines()[-1]))
            saved = max(1e-9, (runs[1]["eager"] - runs[1]["compiled"]) / 1e3)
            row = (name, runs[0]["compile_seconds"], runs[1]["compile_seconds"], runs[1]["eager"], runs[1]["compiled"],
                   runs[0]["compile_seconds"] / saved, runs[1]["compile_seconds"] / saved)
            log(f"{name}: compile {row[1]:.1f} s cold, {row[2]:.1f} s warm; {row[3]:.2f} -> {row[4]:.2f} ms per step; "
                f"repaid after {row[5]:,.0f} steps cold, {row[6]:,.0f} warm")
            rows.append(row)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.device)))
    else:
        measure(args.device)


if __name__ == "__main__":
    main()
