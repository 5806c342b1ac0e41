#!/usr/bin/env python
"""Train a generative model of binarized MNIST with Pyro, then write its figures and metrics.

Examples:
  python run.py --model mixture                     # seed defaults: K=20, RMSprop 0.01, 20 epochs
  python run.py --model mixture --guide sampled     # amortized q(z|x), score-function ELBO
  python run.py --model mixture --experiment enum-vs-sampled
  python run.py --model mixture --dataset binarized-mnist --components 500 --epochs 50
  python run.py --model vae --device cuda           # the VAE: seed defaults z-dim 2, 200-200 MLPs, Adam 1e-3
  python run.py --model vae --guide iaf --elbo iwae --particles 5 --z-dim 32
  python run.py --model sbn --latents 16            # exact: all 65,536 states of z summed every step
  python run.py --model sbn --latents 200 --guide bernoulli
  python run.py --resume figures/mixture            # continue an interrupted run

Every number printed or written says what it is: `exact` log-likelihood, `elbo`, or `iwae-<k>`,
in nats per digit, with the split and the number of digits it was averaged over.
"""

import argparse
import sys
import warnings
from dataclasses import fields
from pathlib import Path

from ppl_models.data import BINARIZATIONS, DATASETS, DataError
from ppl_models.experiments import EXPERIMENTS, run
from ppl_models.models import MODELS
from ppl_models.models.sbn import BASELINES
from ppl_models.models.vae import ACTIVATIONS
from ppl_models.train import OPTIMIZERS, Config, TrainingError, load_checkpoint

class OneLineErrors(argparse.ArgumentParser):
    """Bad flags end like every other bad input: one line, exit status 2."""

    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


def parse_args(argv=None):
    parser = OneLineErrors(
        description=__doc__.split("\n\n")[0],
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    what = parser.add_argument_group("what to train")
    what.add_argument("--model", choices=sorted(MODELS), help="model family (default: mixture)")
    what.add_argument(
        "--guide",
        help="inference guide; mixture: enum (exact, default) or sampled (amortized q(z|x), score-function ELBO); "
             "sbn: enum (all 2^M states summed, exact; default), bernoulli (amortized q(z|x), score-function "
             "ELBO with a neural baseline), relaxed (Concrete relaxation, straight-through); "
             "vae: normal (amortized diagonal Normal, default), iaf (Normal + inverse-autoregressive flows), "
             "lowrank (Normal with a low-rank-plus-diagonal covariance)",
    )
    what.add_argument(
        "--elbo", choices=("trace", "meanfield", "iwae", "vimco"),
        help="vae: trace (Trace_ELBO, one reparameterized sample; default), meanfield (KL(q||p) in closed "
             "form where one exists, TraceMeanField_ELBO), iwae (importance-weighted bound over --particles "
             "samples, RenyiELBO with alpha=0); sbn with --guide bernoulli: vimco (the importance-weighted bound "
             "over --particles >= 2 samples with VIMCO's leave-one-out score-function gradients; default: "
             "TraceGraph_ELBO with a neural baseline)",
    )
    what.add_argument("--particles", type=int, default=1,
                      help="samples of z per digit in the training objective: the k of --elbo iwae (default: 1)")
    what.add_argument(
        "--experiment",
        help="run an experiment instead of one training run; mixture and sbn: enum-vs-sampled (trains every guide "
        "and plots the exact held-out log-likelihood against steps and wall time, with the sampled guides' ELBOs); "
        "sbn: cost-vs-latents (seconds and memory per step against M, seed problem 10), gradient-variance (each "
        "sampled guide's gradient variance at fixed parameters, against the exact gradient); vae: prior-vs-importance (seed "
        "problem 13: log p(x) by Monte Carlo from the prior vs. importance sampling from q, M = 1..10^4 samples, "
        "z-dim 2, 5, 20)",
    )

    mixture = parser.add_argument_group("mixture of Bernoullis")
    mixture.add_argument("--components", type=int, default=20, help="K, the number of mixture components (default: 20)")

    sbn = parser.add_argument_group("sigmoid belief net")
    sbn.add_argument("--latents", type=int, default=10,
                     help="M, the number of binary latents; --guide enum sums all 2^M states, so M <= 20 (default: 10)")
    sbn.add_argument("--baseline", choices=BASELINES, default="neural",
                     help="baseline of --guide bernoulli's score-function gradient: neural (an input-dependent "
                          "network, default), average (Pyro's decaying average of the learning signal), both (the "
                          "network fits what is left after the average, as NVIL centres its signal; not with --jit)")
    sbn.add_argument("--temperature", type=float, default=0.5,
                     help="temperature of the Concrete relaxation of --guide relaxed (default: 0.5)")

    vae = parser.add_argument_group("VAE")
    vae.add_argument("--z-dim", type=int, default=2, help="latent dimensions (default: 2, the seed's; 2 gives the manifold plot)")
    vae.add_argument("--hidden", type=layer_sizes, default=(200, 200),
                     help="hidden layer sizes of encoder and decoder, comma-separated (default: 200,200)")
    vae.add_argument("--activation", choices=ACTIVATIONS, default="relu",
                     help="nonlinearity of the hidden layers: relu (default), tanh (the IWAE paper's), gated: "
                          "(W x) * sigmoid(V x), twice the weights (the VampPrior paper's)")
    vae.add_argument("--flows", type=int, default=2, help="inverse-autoregressive flow layers of --guide iaf (default: 2)")
    vae.add_argument("--kl-warmup", type=float, default=0,
                     help="KL warm-up: weight the KL term by a factor growing linearly from 0 to 1 over this many "
                          "epochs (with --elbo trace or meanfield; reported numbers always use the full ELBO; "
                          "default: 0, none)")
    vae.add_argument("--rank", type=int, default=2, help="rank of the covariance factor of --guide lowrank (default: 2)")

    data = parser.add_argument_group("data")
    data.add_argument("--dataset", choices=DATASETS, default="mnist",
                      help="mnist (60k/10k, labelled; default), binarized-mnist (the static binarization of "
                           "Larochelle & Murray 2011, 50k/10k/10k, the split published NLLs use), fashion-mnist")
    data.add_argument("--binarize", choices=BINARIZATIONS, default="threshold",
                      help="for grayscale datasets: threshold (pixel > 127, the seed's rule; default), dynamic (a "
                           "fresh Bernoulli draw every epoch), static (one Bernoulli draw with a fixed seed)")
    data.add_argument("--data-dir", help="where data lives; searched before $PPL_MODELS_DATA and ~/.cache/ppl_models")
    data.add_argument("--no-download", action="store_true", help="never touch the network; use local files only")
    data.add_argument("--train-subset", type=int, help="train on the first N training digits only (quick runs)")

    opt = parser.add_argument_group("optimisation (defaults depend on the model: the seed template's)")
    def defaults(setting):
        return "; ".join(f"{name}: {family.training_defaults[setting]}" for name, family in MODELS.items())

    opt.add_argument("--optimizer", choices=sorted(OPTIMIZERS), help=f"one PyTorch optimizer over every param ({defaults('optimizer')})")
    opt.add_argument("--lr", type=float, help=f"learning rate ({defaults('lr')})")
    opt.add_argument("--batch-size", type=int, help=f"digits per SVI step ({defaults('batch_size')})")
    opt.add_argument("--epochs", type=int, help=f"passes over the training digits ({defaults('epochs')})")
    opt.add_argument("--seed", type=int, default=0, help="random seed; CPU runs are bit-reproducible (default: 0)")
    opt.add_argument("--patience", type=int,
                     help="early stopping: after each epoch score the --eval-digits fixed valid digits (exact "
                          "log-likelihood where the model has one, else iwae-k for a k-sample objective (--elbo iwae, "
                          "vimco), else the ELBO), stop after this many epochs "
                          "without a better score, and report and plot the best epoch's model (needs a valid "
                          "split: binarized-mnist; default: train every epoch and keep the last)")
    opt.add_argument("--jit", action="store_true", help="use Pyro's JIT-compiled ELBOs (faster steps, slower start)")
    opt.add_argument("--detect-anomaly", action="store_true",
                     help="PyTorch's autograd anomaly detection: names the operation that made a NaN (slow; debugging)")

    run = parser.add_argument_group("running")
    run.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                     help="auto picks cuda when a GPU is visible (default: auto)")
    run.add_argument("--eval-every", type=int, default=200,
                     help="evaluate the learning curves every N steps on --eval-digits digits of every split, the "
                          "same fixed random digits in every run (default: 200)")
    run.add_argument("--eval-digits", type=int, default=1000, help="digits per learning-curve point, per split (default: 1000, as the seed's problem 8)")
    run.add_argument("--eval-samples", type=int,
                     help="k of the final importance-sampled estimate of test log p(x), iwae-k, with q as proposal "
                          "(vae: 1000; 0 skips it; mixture: its exact log-likelihood needs none)")
    run.add_argument("--out", help="run directory (default: figures/<model>)")
    run.add_argument("--resume", metavar="RUN_DIR",
                     help="continue the run in RUN_DIR with its own settings (give --epochs to train a finished "
                          "run for longer, --patience to go on after early stopping, --lr to go on at another learning "
                          "rate); it ends exactly where an uninterrupted run would")
    run.add_argument("--quiet", action="store_true", help="no progress bars (metrics files are unchanged)")
    return parser, parser.parse_args(argv)


def layer_sizes(text):
    try:
        sizes = tuple(int(size) for size in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not comma-separated integers, e.g. 200,200") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: layer sizes must be positive, e.g. 200,200")
    return sizes


def resolve_device(name):
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but PyTorch sees no CUDA GPU; use --device cpu (or auto)")
    return name


def config_from_args(args):
    if args.resume:  # the run's own settings; only the device and (to extend it) --epochs, --patience, --lr may change
        saved = load_checkpoint(Path(args.resume) / "checkpoint.pt")["config"]
        if args.model and args.model != saved["model"]:
            raise ValueError(f"{args.resume} is a run of model {saved['model']!r}, not {args.model!r}; "
                             f"drop --model to resume it, or start a new run with another --out")
        cfg = Config(**{f.name: saved[f.name] for f in fields(Config) if f.name in saved})
        cfg.device = resolve_device(args.device)
        for setting in ("epochs", "patience", "lr"):
            if getattr(args, setting) is not None:
                setattr(cfg, setting, getattr(args, setting))
        return cfg
    args.model = args.model or "mixture"
    family = MODELS[args.model]
    defaults = family.training_defaults
    return Config(
        model=args.model,
        guide=args.guide or family.default_guide,
        elbo=args.elbo,
        particles=args.particles,
        dataset=args.dataset,
        binarize=args.binarize,
        data_dir=args.data_dir,
        model_args={name: list(v) if isinstance(v := getattr(args, name), tuple) else v
                    for name in family.hyperparameters},
        optimizer=defaults["optimizer"] if args.optimizer is None else args.optimizer,
        lr=defaults["lr"] if args.lr is None else args.lr,
        batch_size=defaults["batch_size"] if args.batch_size is None else args.batch_size,
        epochs=defaults["epochs"] if args.epochs is None else args.epochs,
        seed=args.seed,
        device=resolve_device(args.device),
        jit=args.jit,
        detect_anomaly=args.detect_anomaly,
        eval_every=args.eval_every,
        eval_digits=args.eval_digits,
        eval_samples=defaults["eval_samples"] if args.eval_samples is None else args.eval_samples,
        train_subset=args.train_subset,
        patience=args.patience,
    )


def main(argv=None):
    parser, args = parse_args(argv)
    try:
        cfg = config_from_args(args)
        cfg.validate()
        if args.experiment and cfg.model not in EXPERIMENTS.get(args.experiment, ((),))[0]:
            choices = [name for name, (models, _) in EXPERIMENTS.items() if cfg.model in models]
            raise ValueError(f"unknown experiment {args.experiment!r} for model {cfg.model}; "
                             f"choose from: {', '.join(choices) or 'none'}")
        out = Path(args.resume or args.out or Path("figures") / cfg.model)
        run(cfg, out, experiment=args.experiment, resume=bool(args.resume), progress=not args.quiet,
            download=not args.no_download)
    except (ValueError, DataError, TrainingError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    warnings.formatwarning = lambda message, category, *rest: f"warning: {message}\n"
    sys.exit(main())
