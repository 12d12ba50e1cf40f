"""``python -m internvl.data`` runs the ``medrega-data`` command line (see :mod:`internvl.data.cli`)."""
import sys

from internvl.data.cli import main

sys.exit(main())
