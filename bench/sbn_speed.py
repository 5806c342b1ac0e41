"""Exact sigmoid belief net: the Pyro model (TraceEnum_ELBO over all 2^M codes) against a
plain-PyTorch loop with the same exact loss, at several M.

    PPL_MODELS_DATA=../shared/data python bench/sbn_speed.py [--latents 8 12 16] [--device cpu]

Each step sums 2^M states, so epochs are extrapolated from --probe-steps timed steps.
"""

import argparse

import pyro
import torch
import torch.nn.functional as F
from pyro.infer import SVI
from pyro.optim import Adam

from common import epoch_seconds, training_batches
from ppl_models.distributions import all_codes
from ppl_models.models.sbn import SigmoidBeliefNet
from ppl_models.train import reproducible


def pyro_step(M):
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    model = SigmoidBeliefNet(latents=M)
    return SVI(model.model, model.guide_enum, Adam({"lr": 1e-3}), model.elbo("enum")).step


def torch_step(M, device):
    torch.manual_seed(0)
    b = torch.zeros(M, device=device, requires_grad=True)
    w = (0.01 * torch.randn(M, 784, device=device)).requires_grad_()
    c = torch.zeros(784, device=device, requires_grad=True)
    optimizer = torch.optim.Adam([b, w, c], lr=1e-3)
    codes = all_codes(M, device)

    def step(x):
        theta = codes @ w + c
        log_prior = codes @ F.logsigmoid(b) + (1 - codes) @ F.logsigmoid(-b)
        loss = -torch.logsumexp(log_prior + x @ theta.T - F.softplus(theta).sum(-1), -1).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return step


def measure(latents=(8, 12, 16), device="cpu", probe_steps=20, log=print):
    """Rows (benchmark, variant, seconds per epoch, ratio to plain PyTorch)."""
    device = torch.device(device)
    batches = training_batches(device)
    rows = []
    with reproducible(device):
        for M in latents:
            reference = epoch_seconds(torch_step(M, device), batches, device, probe_steps)
            for name, seconds in (("plain PyTorch", reference),
                                  ("Pyro", epoch_seconds(pyro_step(M), batches, device, probe_steps))):
                rows.append((f"SBN M={M}, exact over {2**M:,} states, epoch of 50,000 (extrapolated from "
                             f"{probe_steps} steps)", name, seconds, seconds / reference))
                log(f"{rows[-1][0]}: {name}: {seconds:.2f} s ({seconds / reference:.2f}x)")
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--latents", type=int, nargs="+", default=[8, 12, 16])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--probe-steps", type=int, default=20)
    args = parser.parse_args()
    measure(args.latents, args.device, args.probe_steps)


if __name__ == "__main__":
    main()
