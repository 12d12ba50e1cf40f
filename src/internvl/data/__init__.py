"""MedRegInstruct data: the meta-file registry, record checks, image reading, prompts, encoding, datasets, collation
and converters (docs/data.md, docs/data-io.md). Submodules are imported on demand, so ``medrega-data`` and light
tools do not pay for the torch-heavy ones.
"""
