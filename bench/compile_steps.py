"""What each part of `--compile` gives: the training step built up from eager Pyro to run.py
--compile's, one part at a time, in milliseconds per step.

    PPL_MODELS_DATA=../shared/data python bench/compile_steps.py

Variants, each timed over 200 binarized-mnist batches of 100, interleaved, the median of three rounds:
  eager                          Pyro's ELBO and the optimizer's step one param at a time (run.py's default)
  graph                          the loss and its gradient as one compiled graph (compiled.CompiledObjective),
                                 the optimizer eager
  graph, selection split         the same with the graph split where Pyro's enumeration selects terms
                                 of nonzero probability (enumerated models only)
  graph + compiled update        the optimizer's step compiled by torch.compile
  graph + fused update           PyTorch's fused optimizer (Adam)
  --compile                      graph, fused update where there is one (else compiled), denormal
                                 floats flushed to zero: run.py --compile
Not a test: numbers depend on the machine.
"""

import argparse
import statistics

import pyro
import torch

import ppl_models.compiled as compiled
from ppl_models.models import build_model
from ppl_models.train import SVI, reproducible

from common import one_epoch, pyro_step, training_batches

WORKLOADS = {  # name: (family, its settings, guide, elbo, optimizer, lr)
    "mixture K=20": ("mixture", {"components": 20}, "enum", None, "RMSprop", 0.01),
    "mixture K=500": ("mixture", {"components": 500}, "enum", None, "RMSprop", 0.01),
    "SBN M=200, score function": ("sbn", {"latents": 200}, "bernoulli", None, "Adam", 1e-3),
    "VAE z-dim 2": ("vae", {"z_dim": 2, "hidden": (200, 200)}, "normal", "trace", "Adam", 1e-3),
    "VAE z-dim 40": ("vae", {"z_dim": 40, "hidden": (300, 300)}, "normal", "trace", "Adam", 1e-3),
}


def graph_step(workload, first_batch, update="eager"):
    """The SVI step with the compiled objective and an optimizer updated `update`: eager, compiled or fused."""
    family, settings, guide, elbo, optimizer, lr = workload
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    model = build_model(family, settings, first_batch.device)
    svi = SVI(model.model, model.guide(guide), model.elbo(guide, elbo, compile=True), getattr(torch.optim, optimizer),
              lr, (first_batch,))
    if update != "eager":
        fast = compiled.CompiledOptimizer(getattr(torch.optim, optimizer), svi.params, lr, fused=update == "fused")
        svi.optimizer, svi.optimizer_step = fast.optimizer, fast.step
    return svi.step


def split_at_selections(workload, first_batch):
    """`graph_step`, its graph compiled split where Pyro's enumeration selects terms."""
    compiled.CAPTURE_DATA_DEPENDENT_SHAPES = False
    try:
        step = graph_step(workload, first_batch)
        step(first_batch)  # (the graph is compiled at its first call)
        return step
    finally:
        compiled.CAPTURE_DATA_DEPENDENT_SHAPES = True


def measure(names=tuple(WORKLOADS), device="cpu", rounds=3, log=print):
    """Rows (workload, variant, ms per step, ratio to eager)."""
    device = torch.device(device)
    batches = training_batches(device)[:200]
    store = pyro.get_param_store()
    rows = []
    with reproducible(device):
        for name in names:
            workload = WORKLOADS[name]
            family, settings, guide, elbo, optimizer, lr = workload
            variants = {"eager": lambda: pyro_step(family, settings, guide, optimizer, lr, batches[0], elbo_name=elbo),
                        "graph": lambda: graph_step(workload, batches[0])}
            if guide == "enum":
                variants["graph, selection split"] = lambda: split_at_selections(workload, batches[0])
            variants["graph + compiled update"] = lambda: graph_step(workload, batches[0], "compiled")
            if optimizer == "Adam":
                variants["graph + fused update"] = lambda: graph_step(workload, batches[0], "fused")
            variants["--compile"] = lambda: pyro_step(family, settings, guide, optimizer, lr, batches[0],
                                                      elbo_name=elbo, compile=True)
            built = {}
            for variant, build in variants.items():
                with store.scope() as params:
                    step = build()
                    for batch in batches[:3]:
                        step(batch)
                built[variant] = step, params
            times = {variant: [] for variant in built}
            for _ in range(rounds):
                for variant, (step, params) in built.items():
                    with store.scope(params):
                        times[variant].append(one_epoch(step, batches, device) / len(batches) * 1e3)
            eager = statistics.median(times["eager"])
            for variant, values in times.items():
                rows.append((name, variant, statistics.median(values), statistics.median(values) / eager))
                log(f"{name}: {variant}: {rows[-1][2]:.3f} ms per step ({rows[-1][3]:.2f}x eager)")
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    measure(args.workloads, args.device)


if __name__ == "__main__":
    main()
