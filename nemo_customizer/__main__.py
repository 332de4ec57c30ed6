"""``python -m nemo_customizer``: dispatch to :mod:`nemo_customizer.cli`."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
