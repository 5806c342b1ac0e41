"""Epoch time of the Pyro VAE against a plain-PyTorch VAE with identical networks and loss.

    PPL_MODELS_DATA=../shared/data python bench/vae_speed.py [--z-dim 2] [--hidden 200 200] [--device cpu]

Same data (binarized-mnist, 50,000 digits), batch 100, Adam 1e-3, the same encoder and decoder
modules; the plain loss is the one-sample ELBO with the Gaussian log-densities written out, as in
the seed's template. Prints seconds per epoch of each variant and its ratio to plain PyTorch.
Not a test: numbers depend on the machine.
"""

import argparse
import math
import platform
import time

import pyro
import torch
import torch.nn.functional as F
from pyro.infer import SVI
from pyro.optim import Adam

from ppl_models.data import load_dataset
from ppl_models.models.vae import LOG_SCALE_RANGE, VAE
from ppl_models.train import reproducible


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed_epoch(step, batches, device):
    for batch in batches[:3]:  # warm-up: parameter creation, optimizer import, JIT compilation
        step(batch)
    sync(device)
    started = time.perf_counter()
    for batch in batches:
        step(batch)
    sync(device)
    return time.perf_counter() - started


def pyro_step(args, jit):
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    vae = VAE(args.z_dim, args.hidden)
    svi = SVI(vae.model, vae.guide_normal, Adam({"lr": 1e-3}), vae.elbo("normal", "trace", jit=jit))
    return svi.step


def torch_step(args, device):
    torch.manual_seed(0)
    vae = VAE(args.z_dim, args.hidden)
    encoder, decoder = vae.encoder.to(device), vae.decoder.to(device)
    optimizer = torch.optim.Adam([*encoder.parameters(), *decoder.parameters()], lr=1e-3)
    half_log_2pi = 0.5 * math.log(2 * math.pi)

    def step(x):
        loc, log_scale = encoder(x)
        log_scale = log_scale.clamp(*LOG_SCALE_RANGE)
        eps = torch.randn_like(loc)
        z = loc + log_scale.exp() * eps
        log_q = (-0.5 * eps**2 - log_scale - half_log_2pi).sum(-1)
        log_prior = (-0.5 * z**2 - half_log_2pi).sum(-1)
        logits = decoder(z)
        log_lik = -F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(-1)
        loss = -(log_lik + log_prior - log_q).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return step


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--z-dim", type=int, default=2)
    parser.add_argument("--hidden", type=int, nargs="+", default=[200, 200])
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    x = load_dataset("binarized-mnist", device=device, progress=False).binary("train")
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0)).to(device)
    batches = [x[i] for i in order.split(100)]
    print(f"VAE z-dim {args.z_dim}, MLP {'-'.join(map(str, args.hidden))}; binarized-mnist train, {len(x):,} digits, "
          f"batch 100 ({len(batches)} steps an epoch), Adam 1e-3, {device}; torch {torch.__version__}, "
          f"pyro {pyro.__version__}, {platform.machine()}, {torch.get_num_threads()} threads")
    with reproducible(device):
        reference = timed_epoch(torch_step(args, device), batches, device)
        rows = [("torch", reference), ("pyro Trace_ELBO", timed_epoch(pyro_step(args, False), batches, device)),
                ("pyro JitTrace_ELBO", timed_epoch(pyro_step(args, True), batches, device))]
    print(f"{'variant':<20} {'s/epoch':>8}  {'x torch':>8}")
    for name, seconds in rows:
        print(f"{name:<20} {seconds:>8.2f}  {seconds / reference:>7.2f}x")


if __name__ == "__main__":
    main()
