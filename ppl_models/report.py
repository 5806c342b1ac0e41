"""report.html: one page per run that a person can open in a browser, with no server and no
internet: the configuration, the final numbers with their estimators and splits, and every
figure (by relative path, beside the page) with a sentence saying what it shows."""

import html
import json
import os
import platform
import shlex
from datetime import datetime
from pathlib import Path

import numpy
import pyro
import torch

from . import plots
from .config import steps_per_epoch
from .data import binarize_applies
from .distributed import ONE_PROCESS
from .evaluate import samples_of
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


def provenance(commands, device, world=ONE_PROCESS):
    """How and where a run was made, for its report: its commands (the one that started it, then any
    that resumed it; None: the Python API), the versions that decide its numbers, the date, and the
    machine (rank 0's, and how many processes trained together)."""
    from . import __version__  # here, not at import: the package imports this module while it loads

    machine = {"platform": platform.platform(), "CPU cores": os.cpu_count(), "device": str(device)}
    if world.size > 1:
        machine["processes"] = f"{world.size}, data-parallel (torch.distributed, {world.backend})"
    if str(device).startswith("cuda"):
        machine["GPU"] = torch.cuda.get_device_name(torch.device(device))
    return {
        "commands": [command or "the Python API (ppl_models.job.run), not a command line" for command in commands],
        "versions": {"ppl_models": __version__, "pyro": pyro.__version__, "torch": torch.__version__,
                     "numpy": numpy.__version__, "python": platform.python_version()},
        "date": datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine,
    }


def _provenance_parts(made):
    versions = ", ".join(f"{name} {version}" for name, version in made["versions"].items())
    machine = "; ".join(f"{what} {value}" for what, value in made["machine"].items())
    first, *resumes = made["commands"]
    rows = [("command", first), *(("resumed with", command) for command in resumes), ("date", made["date"]),
            ("versions", versions), ("machine", machine)]
    return ["<h2>How this was made</h2>", _table(rows, ["what", "value"])]


def _usage_parts(run_dir, config):
    """The commands and the Python calls that use the trained model in `run_dir`."""
    run = shlex.quote(str(run_dir))
    commands = [f"ppl-models sample {run} -n 16 --out samples.png     # 16 digits x ~ p(x)",
                f"ppl-models score {run} test:0-99                     # log p(x) of test digits 0-99",
                f"ppl-models fill-in {run} test:0-7 --observe top --out fill.png   # the bottom halves, given the top",
                f"ppl-models infer {run} test:0-3                      # p(z | x) of test digits 0-3"]
    data_dir = f", data_dir={config['data_dir']!r}" if config.get("data_dir") else ""
    binarize = f", binarize={config['binarize']!r}" if binarize_applies(config["dataset"]) else ""
    python = [
        "import ppl_models",
        "from ppl_models.data import load_dataset",
        f"model = ppl_models.load({str(run_dir)!r})",
        f"x = load_dataset({config['dataset']!r}{binarize}, seed={config['seed']}{data_dir})"
        '.binary("test")[:8]',
        "drawn = model.sample(16)              # .digits, .probabilities p(x | z), .latents",
        "scores = model.log_prob(x)            # .log_prob per digit, .estimator, .mean",
        'filled = model.fill_in(x, "top")      # .probabilities p(x_d = 1 | x_observed), .samples',
        "posterior = model.posterior(x)        # .summary, .samples of z",
    ]
    return ["<h2>How to use this model</h2>",
            "<p>From the shell (<code>ppl-models COMMAND --help</code> lists the options; numbers come out as "
            "JSON):</p>", f"<pre>{html.escape(chr(10).join(commands))}</pre>",
            "<p>In Python:</p>", f"<pre>{html.escape(chr(10).join(python))}</pre>"]


def _settings_parts(config, unused):
    """The settings a run used, the family's own (model_args) among them, and apart, those it was
    given but does not use, with why."""
    flat = {**{k: v for k, v in config.items() if k != "model_args"}, **config.get("model_args", {})}
    used = sorted((name, "not set (the default)" if value is None else _text(value))
                  for name, value in flat.items() if name not in unused)
    parts = ["<h2>Configuration</h2>", _table(used, ["setting", "value"])]
    if unused:
        parts.append("<p>Not used by this run: " + "; ".join(
            f"<code>{html.escape(name)}</code> ({html.escape(why)})" for name, why in sorted(unused.items()))
            + ".</p>")
    return parts


def _figure_parts(figures):
    """The Figures section: each image with its caption; none at all for a page without figures."""
    return ["<h2>Figures</h2>"] * bool(figures) + [
        f'<figure><img src="{html.escape(name)}" alt="{html.escape(caption)}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>" for name, caption in figures]


def _write_page(path, title, parts):
    write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
               f"<style>{STYLE}</style></head><body>{''.join(parts)}</body></html>\n", path)


def _early_stopping_parts(chosen):
    """Early stopping in a sentence (none without it); its every-epoch scores are in the learning curves."""
    if not chosen:
        return []
    return [f"<p>Early stopping (patience {chosen['patience']}): {chosen['epochs_trained']} epochs trained"
            f"{', stopped early' if chosen['stopped_early'] else ''}; the numbers and figures below are those of "
            f"epoch {chosen['best_epoch']}, the best score on the validation split, {chosen['best_value']:.2f} "
            f"({html.escape(chosen['selected_by'])}), kept in <code>best.pt</code>. Every epoch's score is in the "
            "learning curves and in <code>metrics.json</code>.</p>"]


def write_report(run_dir, config, summary, figures, unused=None):
    """report.html of a training run. figures: [(file name in run_dir, one sentence on what it shows)];
    unused: {setting: why} for the settings the run was given but does not use."""
    run_dir = Path(run_dir)
    if config.get("eval_samples", 0) is None:  # the default: say what it came to
        asked = [name for name in summary["final"]["test"] if name.startswith("iwae-")]
        config = {**config, "eval_samples": f"default: {asked[0]}, no exact log-likelihood to report" if asked else
                  "default: none, the exact log-likelihood is reported"}
    final_rows = [(split, name, f"{value:.2f}", f"{summary['final_digits'][split]:,}")
                  for split, values in summary["final"].items() for name, value in values.items()]
    # said in the page's own words (early stopping in a sentence, its every-epoch scores in the learning curves)
    standard = {"model", "guide", "dataset", "binarize", "epochs", "train_digits", "seconds_per_epoch", "units",
                "final_digits", "final", "provenance", "early_stopping", "compile", "figures"}
    findings = {key: value for key, value in summary.items() if key not in standard}
    parts = [
        f"<h1>{html.escape(summary['model'])} / guide {html.escape(summary['guide'])} on "
        f"{html.escape(summary['dataset'])}</h1>",
        f"<p>{summary['epochs']} epochs on {summary['train_digits']:,} training digits "
        f"({html.escape(summary['binarize'])} binarization), {summary['seconds_per_epoch']:.1f} s of training per "
        f"epoch{html.escape(compiling(summary))}. Files: <code>config.json</code>, <code>metrics.csv</code> "
        "(learning curves), <code>metrics.json</code>, <code>checkpoint.pt</code>.</p>",
        *_early_stopping_parts(summary.get("early_stopping")),
        "<h2>Final log-likelihood</h2>",
        "<p>Mean over every digit of each split (of train, the digits trained on), in nats per digit (higher is "
        "better). <code>exact</code>: log p(x) summed over every latent state; <code>elbo</code>: a one-sample "
        "evidence lower bound; <code>iwae-k</code>: the importance-weighted estimate with k samples from q, a "
        "tighter lower bound.</p>",
        _table(final_rows, ["split", "estimator", "value (nats)", "digits"]),
    ]
    if findings:
        parts += _finding_parts("Other findings", findings, 2)
    parts += [*_figure_parts(figures), *_usage_parts(run_dir, config),
              *_settings_parts(config, unused or {})]
    if "provenance" in summary:
        parts += _provenance_parts(summary["provenance"])
    _write_page(run_dir / "report.html", f"{summary['model']} run", parts)


def write_experiment_report(out, name, about, config, report, made, unused=None):
    """report.html of an experiment: what it is (`about`), its figures and findings (a family.Report),
    a link to each sub-run's folder with its final numbers, its settings and how it was made."""
    out = Path(out)
    parts = [f"<h1>Experiment {html.escape(name)}: {html.escape(config['model'])} on "
             f"{html.escape(config['dataset'])}</h1>", f"<p>{html.escape(about)}.</p>"]
    if report.findings:
        parts += _finding_parts("Results", report.findings, 2)
    parts += _figure_parts(report.figures)
    runs = sorted(folder for folder in out.iterdir() if (folder / "metrics.json").is_file())
    if runs:
        parts += ["<h2>Runs</h2>", "<p>The training runs of the experiment, each a folder that "
                  "<code>ppl-models</code> and <code>ppl_models.load</code> use as a model; final mean log-likelihood "
                  "per digit (nats):</p><ul>"]
        for folder in runs:
            summary = json.loads((folder / "metrics.json").read_text())
            numbers = "; ".join(f"{split} ({summary['final_digits'][split]:,} digits) " + ", ".join(
                f"{estimator} {value:.2f}" for estimator, value in values.items())
                for split, values in summary["final"].items())
            own = f' (<a href="{folder.name}/report.html">its report</a>)' if (folder / "report.html").is_file() else ""
            parts.append(f'<li><a href="{html.escape(folder.name)}/">{html.escape(folder.name)}/</a>{own}: '
                         f"{html.escape(numbers)}</li>")
        parts.append("</ul>")
    parts += [*_settings_parts(config, unused or {}), *_provenance_parts(made)]
    _write_page(out / "report.html", f"experiment {name}", parts)


def draw_learning_curves(run, title):
    """learning_curves.png of a run (a family.RunContext) from its metrics.csv, with early stopping's
    validation scores and the epoch it chose. Returns what the caption must add about its lines: the
    k-sample bound the run trained on, where it is drawn (the only iwae-k a learning curve has)."""
    chosen = run.summary.get("early_stopping")
    rows = read_metrics(run.out)
    plots.learning_curves(rows, run.out / "learning_curves.png", title, steps_per_epoch(run.cfg, run.data),
                          chosen and (chosen["estimator"], chosen["valid_scores"], chosen["best_epoch"]))
    bounds = sorted({row["estimator"] for row in rows if row["estimator"].startswith("iwae-")})
    return "".join(f" The {bound} lines are the {samples_of(bound)}-sample importance-weighted bound this run "
                   f"trained on (elbo {run.cfg.elbo}, {run.cfg.particles} particles)." for bound in bounds)


def draw_samples(model, run, latent, label=None):
    """samples.png: 16 digits drawn from the model (seeded by the run), each its Bernoulli means
    p(x_d = 1 | z) above a binary draw; `latent` says how z was drawn, `label(latents)` gives the text
    above each sample. Returns the figure's caption."""
    with torch.random.fork_rng():
        torch.manual_seed(run.cfg.seed)
        drawn = model.sample(16)
    plots.means_and_draws(drawn.probabilities, drawn.digits, run.out / "samples.png",
                          f"16 samples of the model of epoch {run.reported_epoch}: {latent},\nthe Bernoulli means "
                          "p(x_d = 1 | z) and a binary draw x ~ p(x | z) from them",
                          captions=label and label(drawn.latents))
    return (f"16 digits sampled from the model of epoch {run.reported_epoch}: {latent} first, then the pixels' "
            "Bernoulli means p(x_d = 1 | z) (rows 1 and 3) and a binary draw x ~ p(x | z) from them (rows 2 and 4).")


def describe(summary, out):
    """The final numbers of a run as the lines printed at its end."""
    chosen = summary.get("early_stopping")
    when = f"epoch {chosen['best_epoch']} of {chosen['epochs_trained']} (best valid score)" if chosen else \
        f"after {summary['epochs']} epochs"
    lines = [f"final mean log-likelihood per digit (nats), {summary['model']} / {summary['guide']}, {when}:"]
    for split, values in summary["final"].items():
        figures = ", ".join(f"{name} {value:.2f}" for name, value in values.items())
        lines.append(f"  {split} ({summary['final_digits'][split]:,} digits): {figures}")
    lines.append(f"  {summary['seconds_per_epoch']:.1f} s per epoch of training{compiling(summary)}; figures and "
                 f"metrics in {out}/")
    return "\n".join(lines)


def compiling(summary):
    """' (the step compiled: why; N s compiling, apart)' for a compiled run, or what ran eagerly after
    all, and why; for a run 'auto' left eager, why; else ''."""
    compiled = summary["compile"]
    if not compiled["compiled"]:
        return "" if compiled["why"] == "`compile=False`" else f" (the step eager, {compiled['why']})"
    if compiled.get("ran_eagerly"):
        return f" (to be compiled, {compiled['why']}, but run eagerly: {compiled['ran_eagerly']})"
    seconds = compiled["training_step_seconds"] + compiled["evaluation_seconds"]
    return f" (the step compiled by torch.compile, {compiled['why']}; {seconds:.1f} s compiling, not counted)"
