"""`ppl-models sample | score | fill-in | infer RUN_DIR ...`: use a trained run (ppl_models.load) on
new digits. Numbers go to stdout as JSON (or to --json FILE), pictures to --out, arrays to --npy;
every bad input ends with one line and exit status 2."""

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

from .. import plots
from ..config import as_flags, resolve_device
from ..data import DataError
from ..evaluate import COMPILE_DRAWS
from ..files import WriteError, atomic_write, write_json
from ..inputs import read_digits, read_mask
from ..rundir import TrainingError
from ..trained import COMPILE_NUTS_STEPS, load
from .train import COMPILE_CHOICES, OneLineErrors

SHOWN = 16  # digits drawn in a figure


def sample(model, args, log):
    drawn = model.sample(args.num, seed=args.seed)
    save_array(args.npy, drawn.digits)
    if args.out:
        shown = min(args.num, 64)
        plots.image_grid(torch.cat([drawn.probabilities[:shown], drawn.digits[:shown]]), args.out,
                         f"{shown} samples x ~ p(x): Bernoulli means p(x | z) (top), binary draws (bottom)",
                         ncols=min(shown, 16))
    return {"samples": args.num, "seed": args.seed, "npy": args.npy, "figure": args.out}


def score(model, args, log):
    x, names = read_digits(args.inputs, model, log, download=not args.no_download)
    observed = None if args.observe is None else read_mask(args.observe, x.shape)
    scores = model.log_prob(x, observed, estimator=args.estimator, draws=args.draws, seed=args.seed,
                            progress=not args.quiet)
    save_array(args.npy, scores.log_prob)
    what = "log p(x)" if observed is None else f"log p(x_observed), observed: {args.observe}"
    return {"quantity": what, "estimator": scores.estimator, "units": "nats", "digits": len(x),
            "mean": scores.mean, "standard error over digits": finite(scores.stderr),
            "per digit": dict(zip(names, scores.log_prob.tolist()))}


def fill_in(model, args, log):
    x, names = read_digits(args.inputs, model, log, download=not args.no_download)
    observed = model.observed_pixels(read_mask(args.observe, x.shape), x, args.seed)  # also for the figure
    filled = model.fill_in(x, observed, method=args.method, num_samples=args.num_samples, draws=args.draws,
                           warmup=args.warmup, seed=args.seed, progress=not args.quiet)
    save_array(args.npy, filled.probabilities)
    if args.out:
        n = min(len(x), SHOWN)
        shown = min(args.num_samples, 3)
        rows = [torch.where(observed[:n], x[:n], 0.35), filled.probabilities[:n], *filled.samples[:shown, :n], x[:n]]
        how = "exact posterior predictive" if filled.posterior.exact else filled.estimator
        plots.image_grid(torch.cat(rows), args.out, f"{model.family.summary(model.cfg.guide)}\nmissing pixels (grey) "
                         f"filled in from the observed ({args.observe}): {how}",
                         ncols=n, row_labels=["observed", "p(x | observed)", *[f"sample {s + 1}" for s in range(shown)],
                                              "truth"])
    return {"observed": args.observe, "method": filled.posterior.method, "estimator": filled.estimator,
            "quantity": "log p(x_missing | x_observed) of the missing pixels' own values", "units": "nats",
            "mean": filled.log_prob_missing.mean().item(),
            "per digit": dict(zip(names, filled.log_prob_missing.tolist())),
            "warnings": filled.posterior.warnings(), **diagnostics(filled.posterior, names)}


def infer(model, args, log):
    x, names = read_digits(args.inputs, model, log, download=not args.no_download)
    observed = None if args.observe is None else read_mask(args.observe, x.shape)
    posterior = model.posterior(x, observed, method=args.method, num_samples=args.num_samples, draws=args.draws,
                                warmup=args.warmup, seed=args.seed, progress=not args.quiet)
    save_array(args.npy, posterior.samples)
    if args.out:
        n = min(len(x), SHOWN)
        with model.active(args.seed), torch.no_grad():
            images = torch.sigmoid(model.family.pixel_logits(posterior.samples[:3, :n])).flatten(0, 1)
        plots.image_grid(torch.cat([x[:n], images]), args.out, f"p(z | x) by {posterior.method}: digits, then "
                         "p(x | z) for three posterior draws of z", ncols=n,
                         row_labels=["digit", "p(x | z1)", "p(x | z2)", "p(x | z3)"][: 1 + len(images) // n])
    summary = {name: dict(zip(names, value.tolist())) for name, value in posterior.summary.items()}
    return {"method": posterior.method, "exact": posterior.exact, "posterior": summary,
            "warnings": posterior.warnings(), **diagnostics(posterior, names)}


def diagnostics(posterior, names):
    return {"diagnostics": {name: dict(zip(names, value.tolist())) for name, value in posterior.diagnostics.items()}}


def finite(value):
    return value if math.isfinite(value) else None


def save_array(path, values):
    if path:
        atomic_write(path, lambda file: np.save(file, values.detach().cpu().numpy()))


COMMANDS = {
    "sample": (sample, "draw digits x ~ p(x) from the trained model"),
    "score": (score, "log p(x) of digits: exact where the model has it, else an importance-weighted estimate"),
    "fill-in": (fill_in, "complete digits from their observed pixels: p(x_missing | x_observed)"),
    "infer": (infer, "the posterior over the latents p(z | x) (or given only the observed pixels)"),
}


def parser():
    top = OneLineErrors(
        prog="ppl-models", description="Train generative models of binary digits with Pyro, then use them.",
        epilog="Examples:\n  ppl-models train --model vae\n  ppl-models sample figures/vae -n 64 --out samples.png\n"
               "  ppl-models score figures/vae my_digit.png\n"
               "  ppl-models fill-in figures/vae test:0-15 --observe top --out filled.png\n"
               "  ppl-models infer figures/vae my_digit.png",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=OneLineErrors)
    commands.add_parser("train", help="train a model (python run.py's flags; ppl-models train --help)",
                        add_help=False)
    for name, (_, help_text) in COMMANDS.items():
        command = commands.add_parser(name, help=help_text, description=help_text)
        command.add_argument("run_dir", type=Path, help="a training run's folder (what `ppl-models train --out` wrote)")
        add_inputs(command, name)
        command.add_argument("--seed", type=int, help="seed of every random draw (default: the run's)")
        command.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: cpu)")
        if name == "sample":
            command.set_defaults(compile="auto")  # (ancestral sampling: one cheap pass, nothing to compile)
        else:
            command.add_argument("--compile", nargs="?", const="on", default="auto", choices=tuple(COMPILE_CHOICES),
                                 help="run importance sampling (score's elbo and iwae-k, fill-in's and infer's "
                                      "posteriors) and NUTS's potential as compiled graphs: the same "
                                      "numbers up to rounding, in 0.6-0.7 of the time after seconds of compiling; auto "
                                      f"(default): for {COMPILE_DRAWS:,} importance draws or more in all, or NUTS "
                                      f"chains of {COMPILE_NUTS_STEPS:,} digit-steps (docs/compiling.md)")
        command.add_argument("--json", type=Path, help="write the numbers to this file instead of stdout")
        command.add_argument("--npy", help="save the result array here: samples, per-digit log p, fill-in "
                             "probabilities (N, 784), or posterior draws of z")
        command.add_argument("--quiet", action="store_true", help="no progress bars or notes")
        command.add_argument("--no-download", action="store_true", help="never download data (for split:indices)")
    return top


def add_inputs(command, name):
    if name == "sample":
        command.add_argument("-n", "--num", type=int, default=64, help="how many digits (default: 64)")
        command.add_argument("--out", help="a PNG of the samples")
        return
    command.add_argument("inputs", nargs="+", help="digits: image files (PNG, JPEG; any size, dark on light is "
                         "inverted), .npy arrays of 0/1 or grayscale values, or the run's data as split:indices, "
                         "e.g. test:0-15")
    command.add_argument("--observe", required=name == "fill-in",
                         help="the observed pixels: top, bottom, left, right, random:F (a random fraction F), or a "
                              "mask image (white = observed)")
    command.add_argument("--draws", type=int, default=1000, help="importance samples per digit, or MCMC draws "
                         "after warm-up (default: 1000)")
    if name == "score":
        command.add_argument("--estimator", help="exact, elbo or iwae-k (default: exact where the model has it, "
                             "else iwae-<draws>)")
        return
    command.add_argument("--method", help="how p(z | x_observed) is found: exact (enumeration), importance (the "
                         "trained guide as proposal), prior (the prior as proposal), nuts (MCMC, continuous latents); "
                         "default: the first the model offers")
    command.add_argument("--num-samples", type=int, default=8 if name == "fill-in" else 100,
                         help="completed digits / posterior draws of z returned per digit (default: %(default)s)")
    command.add_argument("--warmup", type=int, default=200, help="NUTS warm-up steps (default: 200)")
    command.add_argument("--out", help="a PNG of the digits and the answer")


def main(argv=None):
    args = parser().parse_args(argv)
    log = (lambda message: None) if args.quiet else (lambda message: print(message, file=sys.stderr))
    try:
        model = load(args.run_dir, device=resolve_device(args.device),
                     compile=COMPILE_CHOICES[args.compile])
        args.seed = model.cfg.seed if args.seed is None else args.seed
        answer = {"command": args.command, "run": str(args.run_dir), "model": model.family.summary(model.cfg.guide),
                  "guide": model.cfg.guide, "params": model.source, **COMMANDS[args.command][0](model, args, log)}
        if args.json:
            write_json(answer, args.json)
        else:
            print(json.dumps(answer, indent=1))
    except (ValueError, DataError, TrainingError, WriteError) as error:
        print(f"error: {as_flags(str(error)).splitlines()[0]}", file=sys.stderr)
        return 2
    except RuntimeError as error:  # torch's allocator: sizes past the machine's memory
        if "allocate" not in str(error):
            raise
        print("error: not enough memory for these sizes (-n, --draws, --num-samples or the number of digits); use "
              "fewer", file=sys.stderr)
        return 2
    return 0
