"""Entry point: `python -m internvl.bench` (see internvl.bench.cli)."""
from .cli import main

raise SystemExit(main())
