"""Generative models of binary digits as Pyro probabilistic programs: a mixture of Bernoullis, a
sigmoid belief net and a VAE. Train with `ppl-models train` (or `python run.py`); use a trained
run with `load`, on your own digits read by `read_digits`:

    import ppl_models
    model = ppl_models.load("figures/vae")
    x, names = ppl_models.read_digits(["my_digit.png"], model)
    model.sample(64), model.log_prob(x), model.fill_in(x, ppl_models.observe("top")), model.posterior(x)
"""

from importlib.metadata import PackageNotFoundError, version

from .inputs import read_digits
from .masks import observe
from .trained import TrainedModel, load

try:
    __version__ = version("ppl_models")
except PackageNotFoundError:  # running from a checkout that was never installed
    __version__ = "unknown"

__all__ = ["load", "observe", "read_digits", "TrainedModel", "__version__"]
