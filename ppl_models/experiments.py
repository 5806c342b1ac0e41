"""Experiments across model families: exact enumeration against sampled ELBOs. (A family's own
experiments stand beside it, in models/<family>_report.py.)"""

from dataclasses import replace

from . import plots
from .family import Experiment, Report
from .files import write_json
from .report import describe
from .rundir import read_metrics
from .train import train


def enum_vs_sampled(family, cfg, data, out, progress, log=print):
    """Train every guide of the family with the same settings: the exact (enumerated) ones and the
    sampled ones. Plot the exact held-out log-likelihood of each against steps and against
    training time, with each sampled guide's ELBO beside it (their gap is KL(q || p(z | x)))."""
    results = {}
    for guide in family.guides:
        log(f"training with guide '{guide}'")
        model = family(**cfg.model_args).to(cfg.device)
        results[guide] = train(model, data, replace(cfg, guide=guide), out / guide, progress=progress, log=log,
                               overwrite=True)  # the experiment runs whole: its folder was checked before
        write_json(results[guide], out / guide / "metrics.json")

    plot_enum_vs_sampled(out, family.guides, cfg.eval_digits)
    comparison = {guide: {"final": r["final"], "seconds_per_epoch": r["seconds_per_epoch"]}
                  for guide, r in results.items()}
    write_json(comparison, out / "comparison.json")
    for guide, r in results.items():
        log(describe(r, out / guide))
    by_guide = {guide: {**{f"{split} {name} (nats)": value for split, values in r["final"].items()
                           for name, value in values.items()}, "seconds per epoch": r["seconds_per_epoch"]}
                for guide, r in results.items()}
    shown = min(cfg.eval_digits, len(data.binary("test")))  # the learning curves' fixed random test digits
    return Report([("enum_vs_sampled.png", f"The exact log p(x) of {shown:,} fixed random test digits under each "
                    "guide's model (solid) against SVI steps and training time, with each sampled guide's ELBO "
                    "(dotted): the gap between a sampled guide's two lines is KL(q || p(z | x)).")],
                  {"by_guide": by_guide, "numbers": "mean log-likelihood per digit over every digit of each split (of "
                   "train, the digits trained on) at the end of training"})


def plot_enum_vs_sampled(out, guides, eval_digits):
    """enum_vs_sampled.png from the runs' metrics.csv (so it can be redrawn without training)."""
    by_step, by_time = {}, {}
    for guide in guides:
        rows = [r for r in read_metrics(out / guide) if r["split"] == "test"]
        for estimator in sorted({r["estimator"] for r in rows}):
            points = [r for r in rows if r["estimator"] == estimator]
            label = f"guide {guide}: test {estimator}"
            style = "-" if estimator == "exact" else ":"
            values = [float(r["value"]) for r in points]
            by_step[label] = ([int(r["step"]) for r in points], values, style)
            by_time[label] = ([float(r["seconds"]) for r in points], values, style)
    ylabel = "mean log-likelihood per digit (nats)"
    plots.curves_against([("SVI step", ylabel, by_step), ("training time (s, evaluation excluded)", ylabel, by_time)],
                         out / "enum_vs_sampled.png",
                         f"Exact enumeration vs. sampled ELBOs: exact log p(x) of each model, on {eval_digits} fixed "
                         "test digits")


ENUM_VS_SAMPLED = Experiment(
    "trains every guide and plots the exact held-out log-likelihood against steps and wall time, with the sampled "
    "guides' ELBOs", enum_vs_sampled, sets={"guide": "it trains every guide"},
    trains=lambda family, cfg: [replace(cfg, guide=guide) for guide in family.guides])
