"""Inference given the observed pixels, eager against compiled: importance sampling with the guide
as proposal, and NUTS, on VAE digits whose bottom half is missing.

    PPL_MODELS_DATA=../shared/data python bench/inference_speed.py [--digits 100] [--device cpu]

An untrained VAE (z-dim 2, MLP 200-200: the cost of a draw does not depend on the weights), the
first binarized-mnist test digits, one thread. Importance sampling: 1,000 draws per digit, in the
chunks ppl_models.load's queries take; NUTS: one chain over 20 digits, 50 warm-up steps and 100
draws. Each compiled variant's first call (tracing and compiling, and one run) is timed apart;
then eager and compiled alternate, the median of three rounds. NUTS compiles its potential for
every chain (the chain's digits are the graph's constants), so its compiled times include that
compile, from inductor's cache. Not a test: numbers depend on the machine.
"""

import argparse
import statistics
import time

import torch

from ppl_models.data import load_dataset
from ppl_models.masks import observe
from ppl_models.models.vae import VAE

NUTS_DIGITS, WARMUP, NUTS_DRAWS = 20, 50, 100


def seconds(run, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    run()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def measure(digits=100, device="cpu", rounds=3, log=print):
    """Rows (query, variant, seconds, ratio to eager) and {query: seconds of the first compiled call}."""
    device = torch.device(device)
    x = load_dataset("binarized-mnist", device=device, progress=False).binary("test")[:digits]
    observed = observe("top", x.shape).to(device)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        vae = VAE(2, (200, 200)).to(device)
        vae.guide_normal(x[:2])  # registers the encoder's params

        def importance(compile):
            return lambda: [vae.infer(chunk, mask, "normal", "importance", draws=1000, compile=compile)
                            for chunk, mask in zip(x.split(42), observed.split(42))]

        def nuts(compile):
            def run():
                with torch.enable_grad():
                    vae.infer(x[:NUTS_DIGITS], observed[:NUTS_DIGITS], "normal", "nuts", draws=NUTS_DRAWS,
                              warmup=WARMUP, compile=compile)
            return run

        queries = {f"importance sampling, 1,000 draws, {digits} digits": importance,
                   f"NUTS, {WARMUP} + {NUTS_DRAWS} steps, {NUTS_DIGITS} digits in one chain": nuts}
        rows, first = [], {}
        for query, variant in queries.items():
            first[query] = seconds(variant(True), device)
            times = {"eager": [], "compiled": []}
            for _ in range(rounds):
                for label in times:
                    times[label].append(seconds(variant(label == "compiled"), device))
            eager = statistics.median(times["eager"])
            for label, values in times.items():
                rows.append((query, label, statistics.median(values), statistics.median(values) / eager))
                log(f"{query}: {label}: {rows[-1][2]:.2f} s ({rows[-1][3]:.2f}x eager)")
            log(f"{query}: its first compiled call took {first[query]:.1f} s")
    finally:
        torch.set_num_threads(threads)
    return rows, first


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--digits", type=int, default=100)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    measure(args.digits, args.device)


if __name__ == "__main__":
    main()
