#!/usr/bin/env python
"""Train a generative model of binarized MNIST with Pyro, then write its figures and metrics:
`python run.py ...` is `ppl-models train ...` (ppl_models/cli/train.py) without installing."""

import sys

from ppl_models.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
