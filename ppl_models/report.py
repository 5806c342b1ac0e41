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


def _text(value):
    """A finding's value as read: floats to 4 significant figures, lists spelled out."""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    if isinstance(value, (list, tuple)):
        return ", ".join(f"({_text(item)})" if isinstance(item, (list, tuple)) else _text(item) for item in value)
    return str(value)


def _readable(key):
    return str(key).replace("_", " ")


def _heading(name, depth):
    text = _readable(name)
    return f"<h{depth}>{html.escape(text[:1].upper() + text[1:])}</h{depth}>"


def _is_record(value):
    """A dict of plain values (no nested dicts): one row, or one column, of a table."""
    return isinstance(value, dict) and bool(value) and not any(isinstance(v, dict) for v in value.values())


def _record_table(records, row_header):
    """{row: {column: value}} as one table, a row per key and a column per field."""
    columns = list(dict.fromkeys(column for record in records.values() for column in record))
    rows = [[row, *(_text(record.get(column, "")) for column in columns)] for row, record in records.items()]
    return _table(rows, [row_header, *map(_readable, columns)])


def _finding_parts(name, findings, depth):
    """Findings (nested dicts) as a person reads them, driven by their shape: a heading; the plain
    values of this level in a what/value table; dicts of records (e.g. keyed by batch size) as one table,
    a row per key; records that share their keys side by side in one table, a column each; any other
    dict under a heading of its own, one level down."""
    parts = [_heading(name, depth)]
    plain = [(_readable(key), _text(value)) for key, value in findings.items() if not isinstance(value, dict)]
    if plain:
        parts.append(_table(plain, ["what", "value"]))
    records = {key: value for key, value in findings.items() if _is_record(value)}
    by_fields = {}
    for key, record in records.items():  # records with the same fields: one table, a column each
        by_fields.setdefault(tuple(record), {})[key] = record
    for fields, group in by_fields.items():
        if len(group) == 1:  # a record of its own: under its name, what/value
            (key, record), = group.items()
            parts += [_heading(key, depth + 1), _table([(_readable(f), _text(v)) for f, v in record.items()],
                                                       ["what", "value"])]
        else:
            parts.append(_record_table({_readable(f): {key: group[key][f] for key in group} for f in fields}, ""))
    for key, value in findings.items():
        if not isinstance(value, dict) or key in records:
            continue
        if all(_is_record(item) for item in value.values()):
            parts += [_heading(key, depth + 1), _record_table(value, _readable(key).removeprefix("by "))]
        else:
            parts += _finding_parts(key, value, depth + 1)
    return parts


def write_report(run_dir, config, summary, figures):
    """figures: [(file name in run_dir, one sentence on what it shows)]."""
    run_dir = Path(run_dir)
    final_rows = [(split, name, f"{value:.2f}", summary["final_digits"][split])
                  for split, values in summary["final"].items() for name, value in values.items()]
    standard = {"model", "guide", "dataset", "binarize", "epochs", "train_digits", "seconds_per_epoch", "units",
                "final_digits", "final"}
    findings = {key: value for key, value in summary.items() if key not in standard}
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
        parts += _finding_parts("Other findings", findings, 2)
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
