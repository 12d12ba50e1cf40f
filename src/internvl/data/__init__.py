"""MedRegInstruct data: registry, record checks, image reading, prompts, encoding, datasets, collation, converters.

Modules (imported on demand, so ``medrega-data`` and light tools do not pay for torch-heavy ones):

* :mod:`internvl.data.registry`   -- ``meta_file.json`` -> :class:`~internvl.data.registry.DatasetSpec`
* :mod:`internvl.data.records`    -- jsonl reading and record checks (strict / lenient)
* :mod:`internvl.data.images`     -- DICOM / NIfTI / PNG / JPEG / TIFF -> RGB ``PIL.Image``
* :mod:`internvl.data.prompts`    -- task prompts (YAML, EN + ZH) and record builders
* :mod:`internvl.data.encode`     -- one record -> ``input_ids`` + ``labels`` (template, image tokens, masks)
* :mod:`internvl.data.transforms` -- box-aware random resized crop / flip
* :mod:`internvl.data.dataset`    -- :class:`~internvl.data.dataset.MedRegDataset`, ``build_training_dataset``
* :mod:`internvl.data.collate`    -- ``pad_collate`` and ``PackedCollator`` (sequence packing, loss weights)
"""
