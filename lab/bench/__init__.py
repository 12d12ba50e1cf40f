"""GPU benchmark of the toolkit against transformers' native InternVL: training, packing, generation, real shape.

Run `python -m lab.bench --help`; see docs/performance.md.
"""
