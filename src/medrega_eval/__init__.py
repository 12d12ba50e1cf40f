"""MedRegA evaluation package: benchmarks, metrics, run and score CLIs (separate from the model package)."""

__version__ = "0.1.0"
