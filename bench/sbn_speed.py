"""Sigmoid belief net: the Pyro model against plain-PyTorch loops with the same losses. Exact
(TraceEnum_ELBO over all 2^M codes) at several M, and the score-function guide at M = 200.

    PPL_MODELS_DATA=../shared/data python bench/sbn_speed.py [--latents 8 12 16] [--device cpu]

Each step sums 2^M states, so epochs are extrapolated from --probe-steps timed steps.
"""

import argparse

import torch
import torch.nn.functional as F

from ppl_models.distributions import STATE_CHUNK, all_codes
from ppl_models.models.sbn import SigmoidBeliefNet
from ppl_models.train import reproducible

import peers
from common import interleaved_rows, plain_step, pyro_step, training_batches


def torch_step(M, device):
    torch.manual_seed(0)
    b = torch.zeros(M, device=device, requires_grad=True)
    w = (0.01 * torch.randn(M, 784, device=device)).requires_grad_()
    c = torch.zeros(784, device=device, requires_grad=True)
    codes = all_codes(M, device)

    def loss(x):
        theta = codes @ w + c
        log_prior = codes @ F.logsigmoid(b) + (1 - codes) @ F.logsigmoid(-b)
        return -torch.logsumexp(log_prior + x @ theta.T - F.softplus(theta).sum(-1), -1).sum()

    return plain_step(loss, torch.optim.Adam([b, w, c], lr=1e-3))


def torch_sampled_step(M, device, compile=False):
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

    def loss(x):
        q = torch.distributions.Bernoulli(logits=encoder(x))
        z = q.sample()
        log_q = q.log_prob(z).sum(-1)
        theta = z @ w + c
        log_p = (z * F.logsigmoid(b) + (1 - z) * F.logsigmoid(-b)).sum(-1) + (x * theta - F.softplus(theta)).sum(-1)
        signal = (log_p - log_q).detach()
        predicted = baseline(x)
        surrogate = log_p + log_q * (signal - predicted.detach())
        return -surrogate.sum() + ((signal - predicted) ** 2).sum()

    return plain_step(loss, optimizer, compile)


def measure_sampled(latents=(200,), device="cpu", log=print):
    """Rows for guide `bernoulli` (score function, neural baseline), a full epoch each, and the JAX loop's
    when installed."""
    device = torch.device(device)
    batches = training_batches(device)
    skipped = peers.missing(device)
    rows = []
    with reproducible(device):
        for M in latents:
            def sbn_step(**options):
                return lambda: pyro_step("sbn", {"latents": M}, "bernoulli", "Adam", 1e-3, batches[0], **options)

            variants = [("plain PyTorch", lambda: torch_sampled_step(M, device), None),
                        ("plain PyTorch, torch.compile of the loss", lambda: torch_sampled_step(M, device, True), None),
                        ("Pyro TraceGraph_ELBO", sbn_step(), None),
                        ("Pyro JitTraceGraph_ELBO (--jit)", sbn_step(jit=True), None),
                        ("Pyro --compile", sbn_step(compile=True), None),
                        ("Pyro TraceGraph_ELBO, stock pyro.infer.SVI + pyro.optim", sbn_step(stock=True), None),
                        ("JAX loop, jax.jit", lambda: None if skipped else peers.sbn_jax(M, batches), None)]
            rows += interleaved_rows(f"SBN M={M}, guide bernoulli (score function + neural baseline), epoch of "
                                     "50,000", variants, batches, device, log=log)
    return rows


def measure(latents=(8, 12, 16), device="cpu", probe_steps=20, log=print):
    """Rows (benchmark, variant, seconds per epoch, ratio to plain PyTorch); --compile where it is
    allowed (2^M at most one chunk of states)."""
    device = torch.device(device)
    batches = training_batches(device)
    rows = []
    with reproducible(device):
        for M in latents:
            def enum_step(**options):
                return lambda: pyro_step("sbn", {"latents": M}, "enum", "Adam", 1e-3, batches[0], **options)

            variants = [("plain PyTorch", lambda: torch_step(M, device), probe_steps),
                        ("Pyro", enum_step(), probe_steps)]
            if 2**M <= STATE_CHUNK:
                variants.append(("Pyro --compile", enum_step(compile=True), probe_steps))
            rows += interleaved_rows(f"SBN M={M}, exact over {2**M:,} states, epoch of 50,000 (extrapolated from "
                                     f"{probe_steps} steps)", variants, batches, device, log=log)
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
