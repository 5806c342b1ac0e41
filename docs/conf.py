"""Sphinx configuration of ppl_models' documentation: `python -m sphinx -W docs docs/_build/html`
(from `pip install -e '.[docs]'`; offline). The pages are MyST Markdown; the API reference comes
from the docstrings (autodoc, Google style), the CLI reference from the argparse parsers
(sphinx-argparse), and the tour notebook is executed by myst-nb during the build (cached in
docs/_build, so a rebuild re-runs it only when its code changed)."""

import importlib
import os
from pathlib import Path

from docutils import nodes
from sphinx.util.docutils import SphinxDirective

import ppl_models

project = "ppl_models"
author = "the ppl_models authors"
release = version = ppl_models.__version__
extensions = [
    "myst_nb",  # Markdown pages (MyST) and the executed tour notebook
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "sphinxarg.ext",
]
exclude_patterns = ["_build"]
smartquotes = False  # --flags stay two hyphens, in the CLI reference above all
highlight_language = "text"  # a block without a language (usage lines, the layout) is not Python
autodoc_inherit_docstrings = False  # torch.autograd.Function.forward's own docstring is not ours
myst_heading_anchors = 3  # [text](page.md#a-heading) links, as on GitHub

# The API reference: members in source order, type hints in the description.
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented"  # no second list of a dataclass's fields
# Members are listed where api.rst asks (a default `members` here overrides the lists api.rst gives).
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True  # a dataclass's Attributes as fields of its description (autodoc lists the fields too)
default_role = "py:obj"  # `name` in a docstring links to what it names

# A reference that names nothing fails the build (-W): a renamed function or class is caught. What is
# not checked: a bare lower-case name (a parameter, `seed`) or constant (`LOCAL_RANK`), an expression
# (`compile=True`), a flag (`--out`), and the names of other libraries, whose inventories need the network.
nitpicky = True
nitpick_ignore_regex = [
    ("py:.*", r"[a-z_][a-z0-9_]*|[A-Z][A-Z0-9_]*"),
    ("py:.*", r".*[^A-Za-z0-9_.].*"),
    ("py:.*", r"(torch|pyro|poutine|nn|os|sys|pathlib|numpy|np)(\..*)?"),
]


# The tour is executed when its code changed (cached in docs/_build, whatever the output folder; `-D
# nb_execution_mode=force` runs it anyway, as the tests do); a failing cell fails the build.
nb_execution_mode = "cache"
nb_execution_cache_path = str(Path(__file__).resolve().parent / "_build" / ".jupyter_cache")
nb_execution_raise_on_error = True
nb_execution_timeout = 600
nb_merge_streams = True
# The notebook runs in docs/: a relative $PPL_MODELS_DATA is taken from the repository's root, as everywhere else.
if os.environ.get("PPL_MODELS_DATA"):
    os.environ["PPL_MODELS_DATA"] = str((Path(__file__).resolve().parents[1] / os.environ["PPL_MODELS_DATA"]).resolve())



def resolve_short_names(app, env, node, contnode):
    """`TrainedModel.fill_in` or `Posterior` written in a docstring of another module: the one documented
    object whose full name ends so (ppl_models.load is documented as ppl_models.trained.load). A bare
    lower-case name is a parameter or a local, never guessed at."""
    if node.get("refdomain") != "py" or not ("." in node["reftarget"] or node["reftarget"][:1].isupper()):
        return None
    target = node["reftarget"].removeprefix("ppl_models.")
    domain = env.get_domain("py")
    found = [name for name in domain.objects if name == f"ppl_models.{target}" or name.endswith(f".{target}")]
    if len(found) != 1:
        return None
    return domain.resolve_xref(env, node["refdoc"], app.builder, "obj", found[0], node, contnode)


class ParserEpilog(SphinxDirective):
    """``parser-epilog:: module:function``: the epilog of the argparse parser the function builds (its
    examples), as ``--help`` prints it; sphinx-argparse would reflow it into one paragraph."""

    required_arguments = 1

    def run(self):
        module, function = self.arguments[0].split(":")
        return [nodes.literal_block(text=getattr(importlib.import_module(module), function)().epilog.strip())]


def setup(app):
    app.connect("missing-reference", resolve_short_names)
    app.add_directive("parser-epilog", ParserEpilog)


html_theme = "alabaster"
html_title = f"ppl_models {version}"
html_theme_options = {"description": "Generative models of binary digits as Pyro programs",
                      "fixed_sidebar": True, "page_width": "auto", "body_max_width": "none",
                      "sidebar_width": "240px"}  # code lines of about 115 characters fit a laptop's window
html_static_path = ["_static"]
html_css_files = ["tables.css"]
html_sidebars = {"**": ["about.html", "navigation.html", "relations.html", "searchbox.html"]}
