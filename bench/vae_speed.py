"""Epoch time of the Pyro VAE against a plain-PyTorch VAE with identical networks and loss.

    PPL_MODELS_DATA=../shared/data python bench/vae_speed.py [--z-dim 2] [--hidden 200 200] [--device cpu]

Same data (binarized-mnist, 50,000 digits), batch 100, Adam 1e-3, the same encoder and decoder
modules; the plain loss is the one-sample ELBO with the Gaussian log-densities written out, as in
the seed's template (also compiled by torch.compile). Beside them the peers, NumPyro and a JAX loop
(bench/peers.py), where installed. Prints seconds per epoch of each variant and its ratio to plain
PyTorch, the variants timed interleaved. Not a test: numbers depend on the machine.
"""

import argparse
import math
import platform

import pyro
import torch
import torch.nn.functional as F

from ppl_models.models.vae import LOG_SCALE_RANGE, VAE
from ppl_models.train import reproducible

import peers
from common import interleaved_rows, plain_step, pyro_step, training_batches


def torch_step(z_dim, hidden, device, compile=False):
    torch.manual_seed(0)
    vae = VAE(z_dim, hidden)
    encoder, decoder = vae.encoder.to(device), vae.decoder.to(device)
    optimizer = torch.optim.Adam([*encoder.parameters(), *decoder.parameters()], lr=1e-3)
    half_log_2pi = 0.5 * math.log(2 * math.pi)

    def loss(x):
        loc, log_scale = encoder(x)
        log_scale = log_scale.clamp(*LOG_SCALE_RANGE)
        eps = torch.randn_like(loc)
        z = loc + log_scale.exp() * eps
        log_q = (-0.5 * eps**2 - log_scale - half_log_2pi).sum(-1)
        log_prior = (-0.5 * z**2 - half_log_2pi).sum(-1)
        logits = decoder(z)
        log_lik = -F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(-1)
        return -(log_lik + log_prior - log_q).sum()

    return plain_step(loss, optimizer, compile)


def measure(z_dim=2, hidden=(200, 200), device="cpu", log=print):
    """Rows (benchmark, variant, seconds per epoch, ratio to plain PyTorch), and the peers' when installed."""
    device = torch.device(device)
    batches = training_batches(device)
    skipped = peers.missing(device)
    with reproducible(device):
        def vae_step(**options):
            return lambda: pyro_step("vae", {"z_dim": z_dim, "hidden": hidden}, "normal", "Adam", 1e-3, batches[0],
                                     elbo_name="trace", **options)

        variants = [("plain PyTorch", lambda: torch_step(z_dim, hidden, device), None),
                    ("plain PyTorch, torch.compile of the loss", lambda: torch_step(z_dim, hidden, device, True), None),
                    ("Pyro Trace_ELBO", vae_step(), None),
                    ("Pyro JitTrace_ELBO (--jit)", vae_step(jit=True), None),
                    ("Pyro --compile", vae_step(compile=True), None),
                    ("Pyro Trace_ELBO, stock pyro.infer.SVI + pyro.optim", vae_step(stock=True), None),
                    ("NumPyro SVI, Trace_ELBO, jax.jit", lambda: None if skipped else peers.vae_numpyro(
                        z_dim, hidden, batches), None),
                    ("JAX loop, jax.jit", lambda: None if skipped else peers.vae_jax(z_dim, hidden, batches), None)]
        if skipped:
            log(f"NumPyro and JAX rows {skipped}")
        return interleaved_rows(f"VAE z-dim {z_dim}, MLP {'-'.join(map(str, hidden))}, epoch of 50,000", variants,
                                batches, device, log=log)


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
