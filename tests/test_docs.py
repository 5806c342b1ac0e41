"""The documentation builds, its tour runs, and the docstrings' examples hold.

The build is the one a user runs (`python -m sphinx -W docs ...`, from the `docs` extra): warnings
are errors and every cross-reference must name something that exists (conf.py: nitpicky), so a
renamed function or a broken link fails here. The build executes docs/tour.ipynb top to bottom, so
the tutorial breaks when the API it shows does; it runs in a Jupyter kernel of this very interpreter
(a kernel spec for sys.executable first on $JUPYTER_PATH, so that no `python3` kernel of another
environment is picked up), with this process's environment ($PPL_MODELS_DATA included)."""

import doctest
import importlib
import os
import pkgutil
import shutil
import subprocess
import sys
from pathlib import Path

from ipykernel.kernelspec import write_kernel_spec

import ppl_models

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def sphinx(source, out, tmp_path):
    """Run the documented build command on `source` into `out`, the tour executed whatever a cache
    holds; (exit status, its output)."""
    write_kernel_spec(tmp_path / "jupyter" / "kernels" / "python3",
                      extra_arguments=["--InteractiveShell.colors=nocolor"])
    env = dict(os.environ, JUPYTER_PATH=str(tmp_path / "jupyter"))
    command = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
               "-D", "nb_execution_mode=force", str(source), str(out)]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    return done.returncode, done.stdout + done.stderr


def test_docs_build_without_warnings_and_run_the_tour(tmp_path):
    status, output = sphinx(DOCS, tmp_path / "html", tmp_path)
    assert status == 0, f"the documentation does not build:\n{output[-6000:]}"
    pages = {page.stem for page in (tmp_path / "html").glob("*.html")}
    assert {"index", "tour", "using", "api", "cli", "results", "errors"} <= pages
    tour = (tmp_path / "html" / "tour.html").read_text()
    assert "nats per digit (+- standard error over digits)" in tour  # a cell's printed output: it ran
    api = (tmp_path / "html" / "api.html").read_text()
    assert 'id="ppl_models.trained.TrainedModel.fill_in"' in api
    cli = (tmp_path / "html" / "cli.html").read_text()
    assert "--observe" in cli and "--compile" in cli  # from the parsers themselves


def test_a_reference_to_nothing_fails_the_build(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    shutil.copy(DOCS / "conf.py", source)
    (source / "index.md").write_text("# Broken\n\nSee {py:meth}`ppl_models.trained.TrainedModel.fill_out`.\n")
    status, output = sphinx(source, tmp_path / "html", tmp_path)
    assert status != 0 and "ppl_models.trained.TrainedModel.fill_out" in output, output[-3000:]


def test_docstring_examples_hold():
    attempted = 0
    for module in pkgutil.walk_packages(ppl_models.__path__, "ppl_models."):
        if module.name.endswith("__main__"):
            continue  # running it is the CLI
        result = doctest.testmod(importlib.import_module(module.name), optionflags=doctest.ELLIPSIS)
        assert result.failed == 0, f"{module.name}: {result.failed} docstring examples failed (printed above)"
        attempted += result.attempted
    assert attempted >= 3
