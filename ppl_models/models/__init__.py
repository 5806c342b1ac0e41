"""The registry of model families. A model family is one module here: a class with `model`,
`guide_<name>` methods, `elbo`, and what its runs report (`exact`, `hyperparameters`,
`training_defaults`). Adding one takes its entry in MODELS, its figures in
`experiments.REPORTS` and its flags in run.py; adding a guide is one `guide_<name>` method plus
its name in the class's `guides`."""

from torch import nn

from .mixture import BernoulliMixture
from .sbn import SigmoidBeliefNet
from .vae import VAE

MODELS = {cls.name: cls for cls in (BernoulliMixture, SigmoidBeliefNet, VAE)}


def build_model(name, model_args, device="cpu"):
    """The model family `name` with its networks on `device` (moved once here, not every step)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}")
    model = MODELS[name](**model_args)
    for network in networks(model):
        network.to(device)
    return model


def networks(model):
    """The model's networks: its attributes that are torch modules."""
    return [value for value in vars(model).values() if isinstance(value, nn.Module)]


def check_guide(model, guide_name):
    if guide_name not in model.guides:
        raise ValueError(
            f"guide {guide_name!r} does not belong to model {model.name!r}; its guides are: {', '.join(model.guides)}"
        )


def check_elbo(model, elbo_name):
    if elbo_name is None:
        return
    if not model.elbos:
        raise ValueError(f"--elbo does not apply to model {model.name!r}: its guide decides its ELBO; drop --elbo")
    if elbo_name not in model.elbos:
        raise ValueError(f"unknown --elbo {elbo_name!r} for model {model.name!r}; choose one of: {', '.join(model.elbos)}")
