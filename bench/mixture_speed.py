"""Epoch time of the Pyro mixture against a plain-PyTorch loop with the same loss.

    PPL_MODELS_DATA=../shared/data python bench/mixture_speed.py [--components 20 500] [--device cpu]

For each K it trains on the same batches of binarized-mnist (50,000 digits, batch 100, RMSprop
0.01, the seed's settings) and prints seconds per epoch for
  pyro        the package's model: TraceEnum_ELBO over the enumerated z, IndexedBernoulli likelihood
  pyro --jit  the same under JitTraceEnum_ELBO
  pyro generic  the same model written with Bernoulli(logits=theta[z]): Pyro's default N x K x D path
  torch       plain PyTorch: logsumexp(log softmax(b) + x theta^T - sum softplus(theta))
and each time as a ratio to torch. Slow variants are timed on --probe-steps steps and scaled to
an epoch (marked "extrapolated"). Not a test: numbers depend on the machine.
"""

import argparse
import platform
import time

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.infer import SVI, config_enumerate
from pyro.optim import RMSprop

from ppl_models.data import load_dataset
from ppl_models.models.mixture import BernoulliMixture
from ppl_models.train import reproducible


class GenericMixture(BernoulliMixture):
    """The same model with Pyro's stock Bernoulli: the broadcast the fast path avoids."""

    @config_enumerate
    def model(self, x, pixel_mask=None):
        b, w, c = self.params(x.device)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Categorical(logits=b))
            pyro.sample("x", dist.Bernoulli(logits=(w + c)[z]).to_event(1), obs=x)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_pyro(model_class, K, batches, jit, device, steps):
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    model = model_class(K)
    svi = SVI(model.model, model.guide_enum, RMSprop({"lr": 0.01}), model.elbo("enum", jit=jit))
    for batch in batches[:3]:  # warm-up: parameter creation, optimizer import, JIT compilation
        svi.step(batch)
    sync(device)
    started = time.perf_counter()
    for batch in batches[:steps]:
        svi.step(batch)
    sync(device)
    return (time.perf_counter() - started) * len(batches) / steps


def time_torch(K, batches, device, steps):
    torch.manual_seed(0)
    b = torch.zeros(K, device=device, requires_grad=True)
    w = (0.01 * torch.randn(K, 784, device=device)).requires_grad_()
    c = torch.zeros(784, device=device, requires_grad=True)
    optimizer = torch.optim.RMSprop([b, w, c], lr=0.01)

    def step(x):
        theta = w + c
        log_joint = torch.log_softmax(b, -1) + x @ theta.T - F.softplus(theta).sum(-1)
        loss = -torch.logsumexp(log_joint, -1).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    for batch in batches[:3]:
        step(batch)
    sync(device)
    started = time.perf_counter()
    for batch in batches[:steps]:
        step(batch)
    sync(device)
    return (time.perf_counter() - started) * len(batches) / steps


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--components", type=int, nargs="+", default=[20, 500])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--probe-steps", type=int, default=25, help="steps timed for the slow generic path")
    parser.add_argument("--skip-generic", action="store_true", help="do not time Pyro's generic path")
    args = parser.parse_args()
    device = torch.device(args.device)

    data = load_dataset("binarized-mnist", device=device, progress=False)
    x = data.binary("train")
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0)).to(device)
    batches = [x[i] for i in order.split(100)]
    print(f"binarized-mnist train, {len(x):,} digits, batch 100 ({len(batches)} steps an epoch), RMSprop 0.01, "
          f"{device}; torch {torch.__version__}, pyro {pyro.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads; deterministic CPU kernels as in training")
    print(f"{'K':>5}  {'variant':<14} {'s/epoch':>9}  {'x torch':>8}")
    with reproducible(device):
        for K in args.components:
            reference = time_torch(K, batches, device, len(batches))
            rows = [("torch", reference, "")]
            rows.append(("pyro", time_pyro(BernoulliMixture, K, batches, False, device, len(batches)), ""))
            rows.append(("pyro --jit", time_pyro(BernoulliMixture, K, batches, True, device, len(batches)), ""))
            if not args.skip_generic:
                rows.append(("pyro generic", time_pyro(GenericMixture, K, batches, False, device, args.probe_steps),
                             f"  extrapolated from {args.probe_steps} steps"))
            for name, seconds, note in rows:
                print(f"{K:>5}  {name:<14} {seconds:>9.2f}  {seconds / reference:>7.2f}x{note}", flush=True)


if __name__ == "__main__":
    main()
