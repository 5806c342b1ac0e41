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

import pyro
import torch
import torch.nn.functional as F

from ppl_models.models.vae import LOG_SCALE_RANGE, VAE
from ppl_models.train import reproducible

from common import epoch_seconds, pyro_step, ratio_rows, training_batches


def torch_step(z_dim, hidden, device):
    torch.manual_seed(0)
    vae = VAE(z_dim, hidden)
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


def measure(z_dim=2, hidden=(200, 200), device="cpu", log=print):
    """Rows (benchmark, variant, seconds per epoch, ratio to plain PyTorch)."""
    device = torch.device(device)
    batches = training_batches(device)
    with reproducible(device):
        def vae_step(**options):
            return pyro_step("vae", {"z_dim": z_dim, "hidden": hidden}, "normal", "Adam", 1e-3, batches[0],
                             elbo_name="trace", **options)

        timings = [("plain PyTorch", epoch_seconds(torch_step(z_dim, hidden, device), batches, device)),
                   ("Pyro Trace_ELBO", epoch_seconds(vae_step(), batches, device)),
                   ("Pyro JitTrace_ELBO", epoch_seconds(vae_step(jit=True), batches, device)),
                   ("Pyro Trace_ELBO, stock pyro.infer.SVI + pyro.optim",
                    epoch_seconds(vae_step(stock=True), batches, device)),
                   ("Pyro JitTrace_ELBO, stock pyro.infer.SVI + pyro.optim",
                    epoch_seconds(vae_step(jit=True, stock=True), batches, device))]
    return ratio_rows(f"VAE z-dim {z_dim}, MLP {'-'.join(map(str, hidden))}, epoch of 50,000", timings, log)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--z-dim", type=int, default=2)
    parser.add_argument("--hidden", type=int, nargs="+", default=[200, 200])
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, pyro {pyro.__version__}, {platform.machine()}, "
          f"{torch.get_num_threads()} threads; "
          "binarized-mnist train, batch 100, Adam 1e-3")
    measure(args.z_dim, args.hidden, args.device)


if __name__ == "__main__":
    main()
