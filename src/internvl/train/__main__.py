"""`python -m internvl.train` = `medrega-train`."""
import sys

from internvl.train.cli import main

sys.exit(main())
