"""``python -m sparsedict`` (and ``torchrun -m sparsedict``) entry point."""

import sys

from sparsedict.cli import main

sys.exit(main())
