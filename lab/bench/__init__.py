"""GPU benchmark of the toolkit against transformers' native InternVL: training, packing, generation, real shape.

Run `python -m internvl.bench --help` (or `python scripts/bench.py`); see docs/performance.md.
"""
