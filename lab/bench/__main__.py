"""Entry point: `python -m lab.bench` (see lab.bench.cli)."""
from .cli import main

raise SystemExit(main())
