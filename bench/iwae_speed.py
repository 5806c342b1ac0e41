"""Speed of the final iwae-k evaluation of the VAE against its arithmetic floor, on one thread.

    PPL_MODELS_DATA=../shared/data python bench/iwae_speed.py [--samples 1000] [--digits 200]

iwae-k of a digit is log (1/k) sum_i p(x, z_i) / q(z_i | x) over k draws z_i ~ q(z | x). Its
unavoidable work is one decoder pass per draw, a GEMM of (digits k) x hidden x 784, and the
log-normaliser sum_d softplus(logit_d) of the 784 logits; the encoder runs once per digit. Variants:
  floor        plain PyTorch: the decoder on (digits k) random z in 4,096-row chunks, softplus, sum
  before       ppl_models' evaluation as it was: Pyro's Bernoulli(logits=decoder(z)) at the x site,
               samples x digits x pixels in chunks of 2^25 numbers
  fused        the x site as it is now (LinearBernoulli: x folded into the decoder's last layer,
               so one pass over the logits), still in chunks of 2^25
  now          fused, in chunks of evaluate.CHUNK_FLOATS (cache-sized): what runs eagerly today
  compiled     the same as compiled graphs (--compile, ppl_models.compiled): what a compiled run's final
               estimate runs (its compile seconds paid before the timing, and reported)
Each is timed on the same binarized-mnist test digits (the median of three interleaved rounds)
and scaled to 10,000 digits. Not a test: numbers depend on the machine.
"""

import argparse
import statistics
import time

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F

from ppl_models.data import load_dataset
from ppl_models.evaluate import CHUNK_FLOATS, per_digit_estimate
from ppl_models.models.vae import VAE, kl_weighted

FLOOR_CHUNK = 4096  # decoder rows at once in the floor: its logits (13 MB) stay in cache


class GenericVAE(VAE):
    """The VAE with Pyro's stock Bernoulli at the x site: the model as it was before the fused path."""

    def model(self, x, kl_weight=None, observed=None):
        pyro.module("decoder", self.decoder)
        with pyro.plate("data", x.shape[0]):
            with kl_weighted(kl_weight):
                z = pyro.sample("z", dist.Normal(x.new_zeros(self.z_dim), x.new_ones(self.z_dim)).to_event(1))
            pixels = dist.Bernoulli(logits=self.decoder(z))
            pyro.sample("x", (pixels if observed is None else pixels.mask(observed)).to_event(1), obs=x)


def floor(vae, num_draws):
    """The decoder and the log-normaliser for `num_draws` z: what no implementation can skip."""
    for z in torch.randn(num_draws, vae.z_dim, device=vae.device).split(FLOOR_CHUNK):
        F.softplus(vae.decoder(z)).sum(-1)


def seconds(run, device):
    """Wall-clock seconds of `run()`, waiting for a GPU to finish its queued work."""
    synchronize = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    synchronize()
    started = time.perf_counter()
    run()
    synchronize()
    return time.perf_counter() - started


def measure(settings=((2, (200, 200)), (40, (300, 300))), samples=1000, num_digits=200, device="cpu", rounds=3,
            log=print):
    """Rows (benchmark, variant, seconds per 10,000 digits, ratio to the floor)."""
    x = load_dataset("binarized-mnist", device=device, progress=False).binary("test")[:num_digits]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on CPU, the floor of one core; a GPU does not use these threads
    rows = []
    try:
        for z_dim, hidden in settings:
            torch.manual_seed(0)
            vae = VAE(z_dim, hidden).to(device)
            generic = GenericVAE(z_dim, hidden).to(device)
            generic.load_state_dict(vae.state_dict())
            name = f"iwae-{samples}"
            variants = {
                "floor: decoder GEMMs + softplus, plain PyTorch": lambda: floor(vae, samples * num_digits),
                "before: Pyro Bernoulli(logits=decoder(z)), 2^25-number chunks":
                    lambda: per_digit_estimate(generic, "normal", x, name, memory_floats=2**25),
                "fused x site (LinearBernoulli), 2^25-number chunks":
                    lambda: per_digit_estimate(vae, "normal", x, name, memory_floats=2**25),
                f"now: fused x site, 2^{CHUNK_FLOATS.bit_length() - 1}-number chunks":
                    lambda: per_digit_estimate(vae, "normal", x, name),
                "the same compiled (--compile)": lambda: per_digit_estimate(vae, "normal", x, name, compile=True),
            }
            timings = {variant: [] for variant in variants}
            with torch.no_grad():
                batch = x[:max(1, CHUNK_FLOATS // (samples * x.shape[1]))]  # the shape the timed batches have
                compiling = seconds(lambda: per_digit_estimate(vae, "normal", batch, name, compile=True), device)
                log(f"VAE z-dim {z_dim}: compiling {name}'s graph took {compiling:.1f} s")
                for _ in range(rounds):  # interleaved, so a slow moment of a shared machine hits every variant
                    for variant, run in variants.items():
                        timings[variant].append(seconds(run, device) * 10_000 / num_digits)
            reference = statistics.median(timings[next(iter(variants))])
            where = "1 thread" if torch.device(device).type == "cpu" else torch.cuda.get_device_name(device)
            benchmark = (f"VAE z-dim {z_dim}, MLP {'-'.join(map(str, hidden))}: {name} of 10,000 test digits, {where} "
                         f"(timed on {num_digits})")
            for variant, times in timings.items():
                median = statistics.median(times)
                rows.append((benchmark, variant, median, median / reference))
                log(f"{benchmark}: {variant}: {median:.1f} s ({median / reference:.2f}x floor)")
    finally:
        torch.set_num_threads(threads)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=1000, help="k of iwae-k (default: 1000)")
    parser.add_argument("--digits", type=int, default=200, help="test digits timed (default: 200)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    measure(samples=args.samples, num_digits=args.digits, device=args.device)


if __name__ == "__main__":
    main()
