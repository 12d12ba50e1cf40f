"""The performance lab: benchmarks, GPU probes, the whole-step CUDA graph and the decode variants that are not the
product's defaults. Not packaged and not installed: run it from the repository root (`python -m lab.bench --help`,
`python -m lab.scripts.gpu_check_model ...`, `python -m pytest lab/tests`); it imports the installed `internvl`.
See lab/README.md and docs/performance.md.
"""
