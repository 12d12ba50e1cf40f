"""Metric implementations, one module per task family (`text` holds the tokenizers and overlap metrics the others
build on; the `medrega_*` modules and `meteor` are `--compat medrega` only); pure functions, tested by hand."""
