"""`python -m ppl_models ...` is the `ppl-models` command."""

import sys

from .cli import main

sys.exit(main())
