"""`ppl-models train` (and `python run.py`): train a generative model of binarized MNIST with Pyro,
then write its figures and metrics.

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
  torchrun --standalone --nproc_per_node 4 run.py --model vae   # data-parallel in 4 processes (docs/distributed.md)

Every number printed or written says what it is: `exact` log-likelihood, `elbo`, or `iwae-<k>`,
in nats per digit, with the split and the number of digits it was averaged over.
"""

import argparse
import shlex
import signal
import sys
import warnings
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path

from .. import distributed
from ..config import AUTO_EVAL_SAMPLES, OPTIMIZERS, Config, as_flags, flag, resolve_device
from ..data import BINARIZATIONS, DATASETS, DataError
from ..files import WriteError
from ..job import run
from ..models import FAMILIES
from ..rundir import TrainingError, load_checkpoint
from ..train import AUTO_COMPILE_STEPS, STOP_SIGNALS, Interrupted, ignore_stop_signals

DEFAULT_MODEL = next(iter(FAMILIES))  # the first registered family


class OneLineErrors(argparse.ArgumentParser):
    """Bad flags end like every other bad input: one line, exit status 2."""

    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n" if distributed.launched_as_main() else None)


def build_parser(prog=None):
    """The parser of `ppl-models train` (and run.py): every family's settings become its flags."""
    parser = OneLineErrors(
        prog=prog,
        description=__doc__.split("\n\n")[0],
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_arguments(parser)
    family_flags = {}
    for family in FAMILIES.values():
        add_family_arguments(parser, family, family_flags)
    add_data_arguments(parser)
    add_optimisation_arguments(parser)
    add_running_arguments(parser)
    return parser


def add_model_arguments(parser):
    """--model, --guide, --elbo, --experiment: their choices and help come from the families."""
    what = parser.add_argument_group("what to train")
    what.add_argument("--model", choices=sorted(FAMILIES), help=f"model family (default: {DEFAULT_MODEL}): "
                      + "; ".join(f"{name}: {family.title}" for name, family in FAMILIES.items()))
    what.add_argument("--guide", help="inference guide; " + "; ".join(
        f"{name}: " + ", ".join(f"{guide} ({as_flags(text)})" for guide, text in family.guides.items())
        for name, family in FAMILIES.items()))
    with_elbos = {name: family for name, family in FAMILIES.items() if family.elbos}
    what.add_argument("--elbo", choices=sorted({elbo for family in with_elbos.values() for elbo in family.elbos}),
                      help="training objective; " + "; ".join(
                          f"{name}: " + ", ".join(f"{elbo} ({as_flags(text)})" for elbo, text in family.elbos.items())
                          for name, family in with_elbos.items())
                      + "; " + ", ".join(sorted(set(FAMILIES) - set(with_elbos))) + ": the guide decides")
    what.add_argument("--particles", type=int,
                      help="samples of z per digit in the training objective: the k of --elbo iwae (default: 1)")
    experiments = {}
    for name, family in FAMILIES.items():
        for experiment, about in family.experiments.items():
            experiments.setdefault((experiment, about.help), []).append(name)
    what.add_argument("--experiment", help="run an experiment instead of one training run; " + "; ".join(
        f"{' and '.join(models)}: {experiment} ({text})" for (experiment, text), models in experiments.items()))


def add_family_arguments(parser, family, family_flags):
    """The family's hyperparameters as flags. Their default is None here (the family's own default
    applies), so that a flag given for another family can be refused. A name two families share is
    one flag (`family_flags`: name -> its argparse action), whose help says what it is for each."""
    group = parser.add_argument_group(f"{family.title} (--model {family.name})")
    defaults = family.hyperparameter_defaults()
    for name, setting in family.hyperparameters.items():
        default = defaults[name]
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        text = f"{as_flags(setting.help)} (default: {shown})"
        if name in family_flags:
            family_flags[name].help += f"; with --model {family.name}: {text}"
            continue
        family_flags[name] = group.add_argument(flag(name), dest=name, type=setting.type, choices=setting.choices,
                                                help=text)


def add_data_arguments(parser):
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", choices=DATASETS,
                      help="mnist (60k/10k, labelled; default), binarized-mnist (the static binarization of "
                           "Larochelle & Murray 2011, 50k/10k/10k, the split published NLLs use), fashion-mnist")
    data.add_argument("--binarize", choices=BINARIZATIONS,
                      help="for grayscale datasets: threshold (pixel > 127, the seed's rule; default), dynamic (a "
                           "fresh Bernoulli draw every epoch), static (one Bernoulli draw with a fixed seed)")
    data.add_argument("--data-dir", help="where data lives; searched before $PPL_MODELS_DATA and ~/.cache/ppl_models")
    data.add_argument("--no-download", action="store_true", help="never touch the network; use local files only")
    data.add_argument("--train-subset", type=int, help="train on the first N training digits only (quick runs)")


def add_optimisation_arguments(parser):
    opt = parser.add_argument_group("optimisation (defaults depend on the model: the seed template's)")

    def defaults(setting):
        return "; ".join(f"{name}: {family.training_defaults[setting]}" for name, family in FAMILIES.items())

    opt.add_argument("--optimizer", choices=sorted(OPTIMIZERS),
                     help=f"one PyTorch optimizer over every param ({defaults('optimizer')})")
    opt.add_argument("--lr", type=float, help=f"learning rate ({defaults('lr')})")
    opt.add_argument("--batch-size", type=int, help=f"digits per SVI step ({defaults('batch_size')})")
    opt.add_argument("--epochs", type=int, help=f"passes over the training digits ({defaults('epochs')})")
    opt.add_argument("--seed", type=int, help="random seed; CPU runs are bit-reproducible (default: 0)")
    opt.add_argument("--patience", type=int,
                     help="early stopping: after each epoch score the --eval-digits fixed valid digits (exact "
                          "log-likelihood where the model has one, else iwae-k for a k-sample objective (--elbo iwae, "
                          "vimco), else the ELBO), stop after this many epochs "
                          "without a better score, and report and plot the best epoch's model (needs a valid "
                          "split: binarized-mnist; default: train every epoch and keep the last)")
    opt.add_argument("--compile", nargs="?", const="on", choices=tuple(COMPILE_CHOICES),
                     help="compile the training step (loss, gradients and the optimizer's update) with torch.compile: "
                          "the model and guide traced once into one fused graph, the same numbers as eager up to "
                          "rounding; a step takes 0.2-0.5 of its eager time after 3-17 s of compiling (measured on a "
                          "2-core CPU, docs/compiling.md). auto "
                          f"(default): on where the guide can be compiled and the run has {AUTO_COMPILE_STEPS:,} steps "
                          "or more to repay it; a bare --compile is on")
    opt.add_argument("--jit", action="store_true",
                     help="Pyro's JIT ELBOs (TorchScript, which PyTorch has deprecated): --compile replaces it")
    opt.add_argument("--detect-anomaly", action="store_true",
                     help="PyTorch's autograd anomaly detection: names the operation that made a NaN (slow; debugging)")


def add_running_arguments(parser):
    run = parser.add_argument_group("running")
    run.add_argument("--device", default="auto",
                     help="cpu, cuda, cuda:N (one GPU of several) or auto, which picks cuda when a GPU is visible "
                          "(default: auto)")
    run.add_argument("--eval-every", type=int,
                     help="evaluate the learning curves every N steps on --eval-digits digits of every split, the "
                          "same fixed random digits in every run (default: 200)")
    run.add_argument("--eval-digits", type=int,
                     help="digits per learning-curve point, per split (default: 1000, as seed problem 8)")
    run.add_argument("--eval-samples", type=int,
                     help="k of the final importance-sampled estimate of test log p(x), iwae-k, with q as proposal "
                          f"(default: {AUTO_EVAL_SAMPLES} where no exact log-likelihood is reported, none where it "
                          "is: there iwae-k only checks the exact number; 0 skips it; exact guides need none). A "
                          "final estimate that will take long says so, with its cost, before it starts")
    run.add_argument("--out", help="run directory (default: figures/<model>)")
    run.add_argument("--resume", metavar="RUN_DIR",
                     help="continue the run in RUN_DIR with its own settings (give --epochs to train a finished "
                          "run for longer, --patience to go on after early stopping, --lr to go on at another learning "
                          "rate); it ends exactly where an uninterrupted run would")
    run.add_argument("--overwrite", action="store_true",
                     help="let a new run (or experiment) replace the one in --out; without it, a folder holding a "
                          "run is refused, and --resume continues that run instead")
    run.add_argument("--quiet", action="store_true", help="no progress bars (metrics files are unchanged)")


def check_family_flags(args, model):
    """Refuse a hyperparameter flag that is not the chosen family's, or any on --resume."""
    for name in dict.fromkeys(name for family in FAMILIES.values() for name in family.hyperparameters):
        if getattr(args, name) is None:
            continue
        if args.resume:
            raise ValueError(f"{flag(name)} cannot change when resuming: a resumed run keeps its own settings")
        if name not in FAMILIES[model].hyperparameters:
            owners = " and ".join(family.name for family in FAMILIES.values() if name in family.hyperparameters)
            raise ValueError(f"{flag(name)} is a setting of model {owners}, not of model {model}; drop it")


# What --resume may change: how long and how fast it trains, where it runs and reads data, and its final evaluation.
RESUME_MAY_CHANGE = ("epochs", "patience", "lr", "device", "data_dir", "eval_samples", "detect_anomaly", "compile")
COMPILE_CHOICES = {"auto": "auto", "on": True, "off": False}  # --compile's words, as `compile=`


def config_from_args(args):
    if args.resume:
        return resumed_config(args)
    args.model = args.model or DEFAULT_MODEL
    check_family_flags(args, args.model)
    family = FAMILIES[args.model]
    # Flags have no value unless given (so that --resume can tell what was given): the rest is the
    # family's training defaults and default guide, then Config's own defaults.
    given = {name: value for name, value in vars(args).items() if value is not None}
    model_args = {**family.hyperparameter_defaults(), **{name: given[name] for name in family.hyperparameters
                                                          if name in given}}
    settings = {**family.training_defaults, "guide": family.default_guide,
                **{f.name: given[f.name] for f in fields(Config) if f.name in given}}
    if "compile" in given:
        settings["compile"] = COMPILE_CHOICES[given["compile"]]
    return Config(**{**settings, "model_args": {name: list(value) if isinstance(value, tuple) else value
                                                for name, value in model_args.items()},
                     "device": resolve_device(args.device)})


def given(value):
    """Whether a flag was given: a value (0 included: `--eval-samples 0` is one), or a switch that is on."""
    return value is not None and value is not False


def resumed_config(args):
    """The run's own settings from its checkpoint; only RESUME_MAY_CHANGE may be given."""
    checkpoint = load_checkpoint(Path(args.resume) / "checkpoint.pt")
    saved = checkpoint["config"]
    if args.model and args.model != saved["model"]:
        raise ValueError(f"{args.resume} is a run of model {saved['model']!r}, not {args.model!r}; "
                         f"drop --model to resume it, or start a new run with another --out")
    check_family_flags(args, saved["model"])
    for name in ("out", "experiment", *(f.name for f in fields(Config) if f.name != "model")):
        if name not in RESUME_MAY_CHANGE and given(getattr(args, name, None)):
            raise ValueError(f"{flag(name)} cannot change when resuming: a resumed run keeps its own settings (only "
                             f"{', '.join(map(flag, RESUME_MAY_CHANGE))} may be given)")
    trained = checkpoint["progress"]["epoch"]
    if args.epochs is not None and args.epochs < trained:
        raise ValueError(f"--epochs {args.epochs} is fewer than the {trained} epochs {args.resume} has trained; "
                         "give more, or drop --epochs")
    cfg = Config(**{f.name: saved[f.name] for f in fields(Config) if f.name in saved})
    cfg.device = resolve_device(args.device)
    for setting in RESUME_MAY_CHANGE:
        if setting != "device" and given(getattr(args, setting)):
            value = getattr(args, setting)
            setattr(cfg, setting, COMPILE_CHOICES[value] if setting == "compile" else value)
    return cfg


def main(argv=None, prog=None):
    """`prog` is how the user called it ("ppl-models train"; run.py's name by default), for its hints."""
    warnings.formatwarning = lambda message, category, *rest: f"warning: {message}\n"
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    command = distributed.launch_command(prog or "python run.py")
    out, world = None, distributed.ONE_PROCESS
    main_rank = distributed.launched_as_main()  # under torchrun only rank 0 says what every rank would
    if not main_rank:
        warnings.simplefilter("ignore")

    def say(line):  # rank 0's, unless another rank has reported already why the job stopped
        if main_rank and distributed.first_to_report():
            print(line, file=sys.stderr)

    try:
        with stop_signals_as_interrupt():
            if distributed.launched():  # joined first: a resumed run's settings come from rank 0's checkpoint
                world, device = distributed.start(resolve_device(args.device))
                distributed.check_same_settings(world, vars(args))
                args = distributed.resume_after_restart(world, args, args.out or Path("figures") / (args.model or
                                                        DEFAULT_MODEL), RESUME_MAY_CHANGE)
            cfg = world.on_main(lambda: checked_config(args))
            if world.size > 1:
                cfg.device = device  # this rank's GPU (cuda:LOCAL_RANK) or cpu
            out = Path(args.resume or args.out or Path("figures") / cfg.model)
            run(cfg, out, experiment=args.experiment, resume=bool(args.resume), progress=not args.quiet,
                download=not args.no_download, overwrite=args.overwrite, command=f"{command} {shlex.join(argv)}",
                log=lambda line: print(as_flags(line)), world=world)
    except Interrupted as stop:  # in the training loop: a checkpoint was saved
        say(f"error: {stop.what} at step {stop.step}; checkpoint saved. Resume with: {command} --resume "
            f"{stop.run_dir}")
        return 128 + stop.signum
    except KeyboardInterrupt as stop:  # before or after the training loop (under torchrun: perhaps as another rank
        ignore_stop_signals()          # stopped)
        signum = getattr(stop, "signum", signal.SIGINT)
        what = "interrupted" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"
        if world.size > 1:
            report_stop(world, what, out, command)
        else:
            say(f"error: {what}; {resume_hint(out, command)}")
        return 128 + signum
    except (ValueError, DataError, TrainingError, WriteError) as error:  # library errors name settings: as flags
        say(f"error: {as_flags(str(error))}")
        distributed.leave_word(world.rank, as_flags(str(error)))  # rank 0 says it if only this rank had it
        return 2
    except Exception as error:
        if world.size == 1 or not distributed.failed_collective(error):
            raise
        report_stop(world, f"a collective operation failed ({str(error).splitlines()[0]})", out, command, error)
        return 1
    finally:
        distributed.stop()
    return 0


def checked_config(args):
    cfg = config_from_args(args)
    cfg.validate()
    return cfg


def report_stop(world, seen, out, command, error=None):
    """The job stops in a rank that saw `seen` (a failed collective, an interrupt), perhaps because
    another rank stopped, after which torchrun stops the rest: the first rank to get here says, in
    one line, which rank(s) stopped (with the error a rank left, if it left one) or else what it
    saw, and how to resume; the others say nothing. `error`: the failed collective's, if it failed
    (one that timed out says so of the ranks that left no word)."""
    ignore_stop_signals()  # torchrun stops the survivors too: let this one say why
    stopped = distributed.stopped_ranks(world)
    if stopped is None:  # nobody can tell who stopped: every rank says what it saw
        print(f"error: rank {world.rank}: {seen}; {resume_hint(out, command)}", file=sys.stderr)
    elif distributed.first_to_report():
        words = distributed.last_words(stopped)
        ranks = ("ranks " if len(stopped) > 1 else "rank ") + f"{', '.join(map(str, stopped))} of {world.size}"
        what = f"{ranks} stopped ({'; '.join(words.values()) or distributed.silent_stop(error)})" if stopped else seen
        print(f"error: {what}; {resume_hint(out, command)}", file=sys.stderr)


class Stopped(KeyboardInterrupt):
    """Ctrl-C or SIGTERM outside the training loop (which checkpoints on them instead)."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


@contextmanager
def stop_signals_as_interrupt():
    """Ctrl-C or SIGTERM outside the training loop ends the job by raising `Stopped` once; the
    signals are ignored from then on, so that a second one cannot cut short its last line or end
    the process by the signal itself (exit status -15, an atexit traceback)."""
    def stop(signum, frame):
        ignore_stop_signals()
        raise Stopped(signum)

    previous = {signum: signal.signal(signum, stop) for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        if signal.getsignal(signal.SIGTERM) is not signal.SIG_IGN:  # (ignored: the process is ending by one)
            for signum, handling in previous.items():
                signal.signal(signum, handling)


def resume_hint(out, command):
    if out is not None and (out / "checkpoint.pt").exists():
        return f"the last checkpoint is kept. Resume with: {command} --resume {out}"
    return "no checkpoint was written: start the run again"

