"""Sigmoid belief net: the Pyro model against plain-PyTorch loops with the same losses. Exact
(TraceEnum_ELBO over all 2^M codes) at several M, and the score-function guide at M = 200.

    PPL_MODELS_DATA=../shared/data python bench/sbn_speed.py [--latents 8 12 16] [--device cpu]

Each step sums 2^M states, so epochs are extrapolated from --probe-steps timed steps.
"""

import argparse

import torch
import torch.nn.functional as F

from ppl_models.distributions import all_codes
from ppl_models.models.sbn import SigmoidBeliefNet
from ppl_models.train import reproducible

from common import epoch_seconds, pyro_step, ratio_rows, training_batches


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


def torch_sampled_step(M, device):
    """The score-function ELBO of guide `bernoulli` written out: the same surrogate loss Pyro's
    TraceGraph_ELBO builds (log p + log q x (log p - log q - baseline), detached, plus the neural
    baseline's squared error), with the same encoder and baseline networks."""
    torch.manual_seed(0)
    nets = SigmoidBeliefNet(latents=M)
    encoder, baseline = nets.encoder.to(device), nets.baseline.to(device)
    b = torch.zeros(M, device=device, requires_grad=True)
    w = (0.01 * torch.randn(M, 784, device=device)).requires_grad_()
    c = torch.zeros(784, device=device, requires_grad=True)
    optimizer = torch.optim.Adam([b, w, c, *encoder.parameters(), *baseline.parameters()], lr=1e-3)

    def step(x):
        q = torch.distributions.Bernoulli(logits=encoder(x))
        z = q.sample()
        log_q = q.log_prob(z).sum(-1)
        theta = z @ w + c
        log_p = (z * F.logsigmoid(b) + (1 - z) * F.logsigmoid(-b)).sum(-1) + (x * theta - F.softplus(theta)).sum(-1)
        signal = (log_p - log_q).detach()
        predicted = baseline(x)
        surrogate = log_p + log_q * (signal - predicted.detach())
        loss = -surrogate.sum() + ((signal - predicted) ** 2).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return step


def measure_sampled(latents=(200,), device="cpu", log=print):
    """Rows for guide `bernoulli` (score function, neural baseline), a full epoch each."""
    device = torch.device(device)
    batches = training_batches(device)
    rows = []
    with reproducible(device):
        for M in latents:
            def sbn_step(**options):
                return pyro_step("sbn", {"latents": M}, "bernoulli", "Adam", 1e-3, batches[0], **options)

            timings = [("plain PyTorch", epoch_seconds(torch_sampled_step(M, device), batches, device)),
                       ("Pyro TraceGraph_ELBO", epoch_seconds(sbn_step(), batches, device)),
                       ("Pyro JitTraceGraph_ELBO", epoch_seconds(sbn_step(jit=True), batches, device)),
                       ("Pyro TraceGraph_ELBO, stock pyro.infer.SVI + pyro.optim",
                        epoch_seconds(sbn_step(stock=True), batches, device))]
            rows += ratio_rows(f"SBN M={M}, guide bernoulli (score function + neural baseline), epoch of 50,000",
                               timings, log)
    return rows


def measure(latents=(8, 12, 16), device="cpu", probe_steps=20, log=print):
    """Rows (benchmark, variant, seconds per epoch, ratio to plain PyTorch)."""
    device = torch.device(device)
    batches = training_batches(device)
    rows = []
    with reproducible(device):
        for M in latents:
            enum_step = pyro_step("sbn", {"latents": M}, "enum", "Adam", 1e-3, batches[0])
            timings = [("plain PyTorch", epoch_seconds(torch_step(M, device), batches, device, probe_steps)),
                       ("Pyro", epoch_seconds(enum_step, batches, device, probe_steps))]
            rows += ratio_rows(f"SBN M={M}, exact over {2**M:,} states, epoch of 50,000 (extrapolated from "
                               f"{probe_steps} steps)", timings, log)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--latents", type=int, nargs="+", default=[8, 12, 16])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--probe-steps", type=int, default=20)
    args = parser.parse_args()
    measure(args.latents, args.device, args.probe_steps)
    measure_sampled((200,), args.device)


if __name__ == "__main__":
    main()
