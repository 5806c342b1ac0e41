"""Fill-in quality of trained runs on binarized-mnist test digits: the table of docs/filling_in.md.

    PPL_MODELS_DATA=../shared/data python bench/fill_in.py RUN_DIR[:METHOD[:DIGITS[:DRAWS]]] ... [--json FILE]

For each run (and inference method: exact, importance, prior, nuts; default the run's first) and
each mask (the bottom half missing given the top half; a random 50% of the pixels missing), on the
first DIGITS test digits (default 1000), with DRAWS importance samples or NUTS draws per digit
(default --draws): the mean log p(x_missing | x_observed) in nats per digit
with its standard error over digits, the mean absolute error of the predictive mean
E[x_d | x_observed] on the missing pixels, and the seconds it took. For estimates, the median
effective sample size (importance) or the worst split R-hat (NUTS). Not a test: needs trained runs.
"""

import argparse
import json
import platform
import time

import torch

import ppl_models
from ppl_models import load, observe
from ppl_models.data import load_dataset

MASKS = {"bottom half given top": "top", "random 50% missing": "random:0.5"}


def measure(model, x, method, mask_spec, seed=0, draws=1000, warmup=200):
    observed = observe(mask_spec, x.shape, generator=torch.Generator().manual_seed(seed))
    start = time.perf_counter()
    filled = model.fill_in(x, observed, method=method, num_samples=1, draws=draws, warmup=warmup, seed=seed,
                           progress=True)
    seconds = time.perf_counter() - start
    missing = ~observed
    error = ((filled.probabilities - x).abs() * missing).sum() / missing.sum()
    values = filled.log_prob_missing
    row = {"estimator": filled.estimator, "digits": len(x), "mean log p(x_missing | x_observed)": values.mean().item(),
           "standard error": (values.std() / len(values) ** 0.5).item(), "mean abs error": error.item(),
           "seconds": seconds, "warnings": filled.posterior.warnings()}
    diagnostics = filled.posterior.diagnostics
    if "effective sample size" in diagnostics:
        row["median effective sample size"] = diagnostics["effective sample size"].median().item()
    if "split R-hat, worst coordinate" in diagnostics:
        row["worst split R-hat"] = diagnostics["split R-hat, worst coordinate"].max().item()
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="RUN_DIR[:METHOD[:DIGITS[:DRAWS]]]")
    parser.add_argument("--draws", type=int, default=1000, help="importance samples, or NUTS draws, per digit")
    parser.add_argument("--warmup", type=int, default=200, help="NUTS warm-up steps")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    rows = []
    for spec in args.runs:
        run_dir, method, digits, draws = (spec.split(":") + [None, None, None])[:4]
        model = load(run_dir)
        cfg = model.cfg
        x = load_dataset(cfg.dataset, binarize=cfg.binarize, data_dir=cfg.data_dir, seed=cfg.seed,
                         progress=False).binary("test")[: int(digits or 1000)]
        method = method or next(iter(model.inference_methods))
        for label, mask in MASKS.items():
            row = {"run": run_dir, "model": model.family.summary(), "guide": model.cfg.guide, "method": method,
                   "mask": label, **measure(model, x, method, mask, draws=int(draws or args.draws), warmup=args.warmup)}
            rows.append(row)
            print(f"| {row['model']}, guide {row['guide']} | {method}, {draws or args.draws} draws | {label} | "
                  f"{row['mean log p(x_missing | x_observed)']:.2f} ± {row['standard error']:.2f} | "
                  f"{row['mean abs error']:.3f} | {row['seconds'] / len(x) * 1000:.0f} ms/digit "
                  f"({len(x)} digits) | {row.get('median effective sample size', row.get('worst split R-hat', ''))}",
                  flush=True)
    print(f"\n{platform.machine()}, torch {torch.__version__}, ppl_models {ppl_models.__version__}, "
          f"{torch.get_num_threads()} threads")
    if args.json:
        with open(args.json, "w") as file:
            json.dump(rows, file, indent=1)


if __name__ == "__main__":
    main()
