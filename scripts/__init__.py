"""Maintenance scripts of the repository (MedReg-mini build, bundled-model export, ...). Not installed: run them from
the repository root, e.g. `python3 -m scripts.build_medreg_mini --out data/built/medreg_mini`."""
