"""``python -m lycoris_core``: the command-line entry point."""

import sys

from .tools.cli import main

sys.exit(main())
