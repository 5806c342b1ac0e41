"""report.html: findings as tables a person reads, settings that apply, how the run was made and how to use it."""

import html
import json
from dataclasses import asdict

import pyro
import torch
from conftest import run_cli

from ppl_models.config import Config
from ppl_models.report import write_report

SUMMARY = dict(model="mixture", guide="enum", dataset="mnist", binarize="threshold", epochs=1, train_digits=500,
               seconds_per_epoch=0.1, units="nats", final_digits={"test": 100}, final={"test": {"exact": -100.0}},
               compile={"compiled": True, "why": "'auto': 3,000 steps", "training_step_seconds": 4.25,
                        "evaluation_seconds": 0.0})


def test_nested_findings_are_tables_keyed_by_their_rows(tmp_path):
    findings = {"cluster_purity_test": 0.5, "detection": {
        "roc_auc": 0.75, "digits": {"natural": 300, "spliced": 200}, "mean_log_p": {"natural": -90.0, "spliced": -95.5},
        "batch_test": {"by_batch_size": {"1": {"threshold": -100.0, "false_alarm": 0.05, "power": 0.25},
                                         "10": {"threshold": -96.0, "false_alarm": 0.04, "power": 0.875}}}}}
    write_report(tmp_path, asdict(Config(model="mixture", guide="enum")), {**SUMMARY, **findings}, [])
    page = (tmp_path / "report.html").read_text()
    assert "0.1 s of training per epoch (the step compiled by torch.compile, &#x27;auto&#x27;: 3,000 steps; 4.2 s " \
           "compiling, not counted)" in page  # said in the page's words, not as a finding
    assert "detection / " not in page  # no flattened paths
    assert "<h3>Detection</h3>" in page and "<h4>Batch test</h4>" in page
    assert "<tr><td>cluster purity test</td><td>0.5</td></tr>" in page
    assert ("<tr><th>batch size</th><th>threshold</th><th>false alarm</th><th>power</th></tr>"
            "<tr><td>1</td><td>-100</td><td>0.05</td><td>0.25</td></tr>"
            "<tr><td>10</td><td>-96</td><td>0.04</td><td>0.875</td></tr>") in page
    assert ("<tr><th></th><th>digits</th><th>mean log p</th></tr><tr><td>natural</td><td>300</td><td>-90</td></tr>"
            "<tr><td>spliced</td><td>200</td><td>-95.5</td></tr>") in page


def test_a_runs_report_says_how_it_was_made_and_how_to_use_it(offline, tiny_binarized, tmp_path):
    out = tmp_path / "vae"
    args = ["--model", "vae", "--dataset", "binarized-mnist", "--data-dir", str(tiny_binarized), "--epochs", "1",
            "--z-dim", "2", "--hidden", "16", "--eval-samples", "0", "--out", str(out)]
    assert run_cli(*args) == 0
    page = (out / "report.html").read_text()
    assert f"<td>command</td><td>python run.py {' '.join(args)} --quiet --no-download</td>" in page
    assert f"torch {torch.__version__}" in page and f"pyro {pyro.__version__}" in page and "CPU cores" in page
    # settings the normal guide and the statically binarized data set do not use are set apart, with why
    configuration = page.split("<h2>Configuration</h2>")[1]
    assert "<td>flows</td>" not in configuration and "<td>binarize</td>" not in configuration
    assert "<code>flows</code> (used by guide iaf only)" in configuration
    assert "<code>binarize</code> (binarized-mnist comes binarized: one fixed (static) draw" in configuration
    assert "<td>z_dim</td><td>2</td>" in configuration and "<td>patience</td><td>not set (the default)</td>" in page
    assert f"ppl-models fill-in {out} test:0-7 --observe top --out fill.png" in page
    python = html.unescape(page.split("<p>In Python:</p><pre>")[1].split("</pre>")[0])
    names = {}
    exec(python, names)  # the report's own example runs as written
    assert names["drawn"].digits.shape == (16, 784) and names["scores"].log_prob.shape == (8,)


def test_an_experiments_report_shows_its_figures_results_and_runs(offline, tiny_binarized, tmp_path):
    out = tmp_path / "experiment"
    assert run_cli("--model", "mixture", "--experiment", "enum-vs-sampled", "--components", "3", "--epochs", "1",
                   "--dataset", "binarized-mnist", "--data-dir", str(tiny_binarized), "--out", str(out)) == 0
    page = (out / "report.html").read_text()
    assert "trains every guide and plots the exact held-out log-likelihood" in page
    assert '<img src="enum_vs_sampled.png"' in page and "KL(q || p(z | x))" in html.unescape(page)
    assert "<h3>By guide</h3><table><tr><th>guide</th><th>train exact (nats)</th>" in page
    assert '<a href="enum/">enum/</a>' in page and '<a href="sampled/">sampled/</a>' in page
    assert "<td>command</td><td>python run.py --model mixture --experiment enum-vs-sampled" in page
    assert "<code>guide</code> (set by the experiment: it trains every guide)" in page
    assert "<td>guide</td>" not in page.split("<h2>Configuration</h2>")[1].split("</table>")[0]


def test_the_default_eval_samples_is_reported_as_what_it_came_to(offline, tiny_binarized, tmp_path):
    out = tmp_path / "sbn"
    assert run_cli("--model", "sbn", "--latents", "3", "--guide", "bernoulli", "--dataset", "binarized-mnist",
                   "--data-dir", str(tiny_binarized), "--epochs", "1", "--out", str(out)) == 0
    page = (out / "report.html").read_text()
    assert "<td>eval_samples</td><td>default: none, the exact log-likelihood is reported</td>" in page


def test_a_resumed_runs_report_keeps_the_command_that_started_it(offline, tiny_binarized, tmp_path):
    out = tmp_path / "vae"
    started = ["--model", "vae", "--dataset", "binarized-mnist", "--data-dir", str(tiny_binarized), "--epochs", "1",
               "--hidden", "8", "--eval-samples", "0", "--out", str(out)]
    assert run_cli(*started) == 0
    assert run_cli("--resume", str(out), "--epochs", "2") == 0
    assert run_cli("--resume", str(out)) == 0  # a finished run, evaluated again: no epoch, still a command
    page = (out / "report.html").read_text()
    assert (f"<tr><td>command</td><td>python run.py {' '.join(started)} --quiet --no-download</td></tr>"
            f"<tr><td>resumed with</td><td>python run.py --resume {out} --epochs 2 --quiet --no-download</td></tr>"
            f"<tr><td>resumed with</td><td>python run.py --resume {out} --quiet --no-download</td></tr>") in page
    assert json.loads((out / "metrics.json").read_text())["provenance"]["commands"][0].endswith(
        f"--out {out} --quiet --no-download")
