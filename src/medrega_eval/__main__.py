"""`python -m medrega_eval ...` (also what torchrun launches: `torchrun --nproc-per-node N -m medrega_eval run ...`)."""
import sys

from medrega_eval.cli import main

if __name__ == "__main__":
    sys.exit(main())
