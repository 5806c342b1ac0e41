"""Epoch time of the Pyro mixture against a plain-PyTorch loop with the same loss.

    PPL_MODELS_DATA=../shared/data python bench/mixture_speed.py [--components 20 500] [--device cpu]

For each K it trains on the same batches of binarized-mnist (50,000 digits, batch 100, RMSprop
0.01, the seed's settings) and prints seconds per epoch for
  torch            plain PyTorch: logsumexp(log softmax(b) + x theta^T - sum softplus(theta)); also
                   with denormal floats flushed to zero, and compiled by torch.compile
  pyro             run.py's step: TraceEnum_ELBO over the enumerated z, IndexedBernoulli likelihood
  pyro --jit       the same under JitTraceEnum_ELBO
  pyro --compile   the same compiled (ppl_models.compiled), denormals flushed as run.py flushes them,
                   and kept
  stock SVI        the same ELBO under pyro.infer.SVI with pyro.optim (one optimizer per param)
  NumPyro, JAX     the peers (bench/peers.py), where installed
  pyro generic     the same model written with Bernoulli(logits=theta[z]): Pyro's default N x K x D path
and each time as a ratio to torch, the variants timed interleaved. Slow variants are timed on
--probe-steps steps and scaled to an epoch (marked "extrapolated"). Not a test: numbers depend on
the machine.
"""

import argparse
import platform

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.infer import config_enumerate

from ppl_models.models.mixture import BernoulliMixture
from ppl_models.train import reproducible

import peers
from common import interleaved_rows, plain_step, pyro_step, training_batches


class GenericMixture(BernoulliMixture):
    """The same model with Pyro's stock Bernoulli: the broadcast the fast path avoids."""

    @config_enumerate
    def model(self, x, pixel_mask=None):
        b, w, c = self.params(x.device)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Categorical(logits=b))
            pyro.sample("x", dist.Bernoulli(logits=(w + c)[z]).to_event(1), obs=x)


def torch_step(K, device, compile=False, flush=False):
    torch.manual_seed(0)
    b = torch.zeros(K, device=device, requires_grad=True)
    w = (0.01 * torch.randn(K, 784, device=device)).requires_grad_()
    c = torch.zeros(784, device=device, requires_grad=True)

    def loss(x):
        theta = w + c
        log_joint = torch.log_softmax(b, -1) + x @ theta.T - F.softplus(theta).sum(-1)
        return -torch.logsumexp(log_joint, -1).sum()

    return plain_step(loss, torch.optim.RMSprop([b, w, c], lr=0.01), compile, flush)


def measure(components=(20, 500), device="cpu", probe_steps=25, generic=True, log=print):
    """Rows (benchmark, variant, seconds per epoch, ratio to plain PyTorch), and the peers' when installed."""
    device = torch.device(device)
    batches = training_batches(device)
    skipped = peers.missing(device)
    if skipped:
        log(f"NumPyro and JAX rows {skipped}")
    rows = []
    with reproducible(device):
        for K in components:
            def mixture_step(**options):
                return lambda: pyro_step("mixture", {"components": K}, "enum", "RMSprop", 0.01, batches[0], **options)

            variants = [
                ("plain PyTorch", lambda: torch_step(K, device), None),
                ("plain PyTorch, denormals flushed", lambda: torch_step(K, device, flush=True), None),
                ("plain PyTorch, torch.compile of the loss", lambda: torch_step(K, device, compile=True), None),
                ("Pyro", mixture_step(), None),
                ("Pyro --jit", mixture_step(jit=True), None),
                ("Pyro --compile", mixture_step(compile=True), None),
                ("Pyro --compile, denormals kept", mixture_step(compile=True, flush=False), None),
                ("Pyro, stock pyro.infer.SVI + pyro.optim", mixture_step(stock=True), None),
                ("NumPyro SVI, TraceEnum_ELBO, Bernoulli(logits=theta[z]), jax.jit",
                 lambda: None if skipped else peers.mixture_numpyro(K, batches), None),
                ("JAX loop, jax.jit", lambda: None if skipped else peers.mixture_jax(K, batches), None),
            ]
            if generic:
                variants.append((f"Pyro, generic Bernoulli(logits=theta[z]) (extrapolated from {probe_steps} steps)",
                                 mixture_step(model=GenericMixture(K)), probe_steps))
            rows += interleaved_rows(f"mixture K={K}, exact (TraceEnum_ELBO), epoch of 50,000", variants, batches,
                                     device, log=log)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--components", type=int, nargs="+", default=[20, 500])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--probe-steps", type=int, default=25, help="steps timed for the slow generic path")
    parser.add_argument("--skip-generic", action="store_true", help="do not time Pyro's generic path")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, pyro {pyro.__version__}, {platform.machine()}, "
          f"{torch.get_num_threads()} threads; "
          "binarized-mnist train, batch 100, RMSprop 0.01, deterministic CPU kernels as in training")
    measure(args.components, args.device, args.probe_steps, not args.skip_generic)


if __name__ == "__main__":
    main()
