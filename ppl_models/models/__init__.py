"""The registry of model families: adding one is its own module(s) and one line here. What a
family provides is written down once, in `ppl_models.family.Family`. The first is the CLI's default."""

from ..config import SettingError
from .mixture import BernoulliMixture
from .sbn import SigmoidBeliefNet
from .vae import VAE

#: {name: Family subclass}: every registered family, by its ``--model`` name
FAMILIES = {family.name: family for family in (
    BernoulliMixture,
    SigmoidBeliefNet,
    VAE,
)}


def family_of(name):
    """The Family subclass registered as `name`."""
    if name not in FAMILIES:
        raise SettingError(f"unknown `model={name}`; choose one of: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def build_model(name, model_args, device="cpu"):
    """The model family `name` with these hyperparameters, its networks on `device` (moved once here,
    not every step)."""
    return family_of(name)(**model_args).to(device)
