#!/usr/bin/env python3
"""GPU benchmark: ours vs transformers' native InternVL (training, packing, generation) + the real 40B shape.

Same as `python -m internvl.bench`; run `python scripts/bench.py --help`. Results: <out>/bench.json and
<out>/bench_table.txt. See docs/performance.md.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from internvl.bench.cli import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
