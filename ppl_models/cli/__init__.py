"""The `ppl-models` command (also `python -m ppl_models`): `train` a model (python run.py's flags,
ppl_models/cli/train.py), then `sample`, `score`, `fill-in` and `infer` with it (cli/use.py)."""

import sys
import warnings

from . import train, use


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    warnings.formatwarning = lambda message, category, *rest: f"warning: {message}\n"
    if argv[:1] == ["train"]:
        return train.main(argv[1:], prog="ppl-models train")
    return use.main(argv)
