"""report.html: one page per run that a person can open in a browser, with no server and no
internet: the configuration, the final numbers with their estimators and splits, and every
figure (by relative path, beside the page) with a sentence saying what it shows."""

import html
import json
from pathlib import Path

from . import plots
from .config import steps_per_epoch
from .files import write_text
from .rundir import read_metrics

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
td, th { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }
th { background: #f3f3f3; }
figure { margin: 1.5em 0; }
img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #444; margin-top: 0.3em; }
code { background: #f6f6f6; padding: 0 0.2em; }
"""


def _table(rows, header):
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _number(value):
    return f"{value:.4g}" if isinstance(value, float) else value


def _flatten(prefix, value):
    """Nested dicts of extra findings as (name, value) rows."""
    if isinstance(value, dict):
        return [row for key, item in value.items() for row in _flatten(f"{prefix} / {key}" if prefix else key, item)]
    return [(prefix, _number(value))]


def write_report(run_dir, config, summary, figures):
    """figures: [(file name in run_dir, one sentence on what it shows)]."""
    run_dir = Path(run_dir)
    final_rows = [(split, name, f"{value:.2f}", summary["final_digits"][split])
                  for split, values in summary["final"].items() for name, value in values.items()]
    standard = {"model", "guide", "dataset", "binarize", "epochs", "train_digits", "seconds_per_epoch", "units",
                "final_digits", "final"}
    findings = [row for key in summary if key not in standard for row in _flatten(key, summary[key])]
    parts = [
        f"<h1>{html.escape(summary['model'])} / guide {html.escape(summary['guide'])} on "
        f"{html.escape(summary['dataset'])}</h1>",
        f"<p>{summary['epochs']} epochs on {summary['train_digits']:,} training digits "
        f"({html.escape(summary['binarize'])} binarization), {summary['seconds_per_epoch']:.1f} s of training per "
        "epoch. Files: <code>config.json</code>, <code>metrics.csv</code> (learning curves), "
        "<code>metrics.json</code>, <code>checkpoint.pt</code>.</p>",
        *([f"<p>Early stopping: the numbers and figures below are those of epoch {chosen['best_epoch']}, the best "
           f"score on the validation split ({html.escape(chosen['selected_by'])}), kept in <code>best.pt</code>.</p>"]
          if (chosen := summary.get("early_stopping")) else []),
        "<h2>Final log-likelihood</h2>",
        "<p>Mean over every digit of each split, in nats per digit (higher is better). <code>exact</code>: log p(x) "
        "summed over every latent state; <code>elbo</code>: a one-sample evidence lower bound; "
        "<code>iwae-k</code>: the importance-weighted estimate with k samples from q, a tighter lower bound.</p>",
        _table(final_rows, ["split", "estimator", "value (nats)", "digits"]),
    ]
    if findings:
        parts += ["<h2>Other findings</h2>", _table(findings, ["what", "value"])]
    parts.append("<h2>Figures</h2>")
    for name, caption in figures:
        parts.append(f'<figure><img src="{html.escape(name)}" alt="{html.escape(caption)}">'
                     f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    settings = sorted((k, json.dumps(v)) for k, v in config.items())
    parts += ["<h2>Configuration</h2>", _table(settings, ["setting", "value"])]
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(summary['model'])} run</title>"
            f"<style>{STYLE}</style></head><body>{''.join(parts)}</body></html>\n")
    write_text(page, run_dir / "report.html")


def draw_learning_curves(run, title):
    """learning_curves.png of a run (a family.RunContext) from its metrics.csv, with early stopping's
    validation scores and the epoch it chose. Returns what the caption must add about its lines: the
    k-sample bound the run trained on, where it is drawn (the only iwae-k a learning curve has)."""
    chosen = run.summary.get("early_stopping")
    rows = read_metrics(run.out)
    plots.learning_curves(rows, run.out / "learning_curves.png", title, steps_per_epoch(run.cfg, run.data),
                          chosen and (chosen["estimator"], chosen["valid_scores"], chosen["best_epoch"]))
    bounds = sorted({row["estimator"] for row in rows if row["estimator"].startswith("iwae-")})
    return "".join(f" The {bound} lines are the {bound.split('-')[1]}-sample importance-weighted bound this run "
                   f"trained on (elbo {run.cfg.elbo}, {run.cfg.particles} particles)." for bound in bounds)


def describe(summary, out):
    """The final numbers of a run as the lines printed at its end."""
    chosen = summary.get("early_stopping")
    when = f"epoch {chosen['best_epoch']} of {chosen['epochs_trained']} (best valid score)" if chosen else \
        f"after {summary['epochs']} epochs"
    lines = [f"final mean log-likelihood per digit (nats), {summary['model']} / {summary['guide']}, {when}:"]
    for split, values in summary["final"].items():
        figures = ", ".join(f"{name} {value:.2f}" for name, value in values.items())
        lines.append(f"  {split} ({summary['final_digits'][split]:,} digits): {figures}")
    lines.append(f"  {summary['seconds_per_epoch']:.1f} s per epoch of training; figures and metrics in {out}/")
    return "\n".join(lines)
