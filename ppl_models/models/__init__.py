"""The registry of model families. Adding a model is one entry here; adding a guide is one
`guide_<name>` method on its class plus its name in the class's `guides`."""

from .mixture import BernoulliMixture

MODELS = {cls.name: cls for cls in (BernoulliMixture,)}


def build_model(name, model_args):
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}")
    return MODELS[name](**model_args)


def check_guide(model, guide_name):
    if guide_name not in model.guides:
        raise ValueError(
            f"guide {guide_name!r} does not belong to model {model.name!r}; its guides are: {', '.join(model.guides)}"
        )
