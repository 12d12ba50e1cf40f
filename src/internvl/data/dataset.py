"""Map-style training datasets over a ``meta_file.json`` registry (behaviour in docs/data.md "Datasets").

Construction scans the jsonl once (line offsets and the :mod:`internvl.data.records` checks, strict or lenient), so
bad records surface before training; items are read with one seek. A text-only record gets one white dummy tile with
``image_flags = 0`` so that the ViT runs on every rank in every step (ZeRO-3 gathering stays in step).
"""
from __future__ import annotations

import bisect
import contextlib
import dataclasses
import logging
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from torch.utils.data import Dataset

from internvl.data.collate import SAMPLE_INDEX_KEY, SKIPPED_KEY
from internvl.data.encode import EncodeError, encode_conversation
from internvl.data.images import ImageLoadError, load_image
from internvl.data.records import (BadRecordError, ProblemTally, RecordChecker, RecordProblem, image_paths,
                                   iter_records, parse_record_line, resolve_image)
from internvl.data.registry import DatasetSpec, load_meta
from internvl.data.transforms import box_aware_augment
from internvl.image_processing import ImageSettings, dummy_pixel_values, images_to_pixel_values, num_image_tokens
from internvl.regions import RegionError
from internvl.templates import ChatTemplate, get_template

__all__ = ["MedRegDataset", "MedRegConcatDataset", "build_training_dataset", "line_offsets", "SAMPLE_INDEX_KEY",
           "SKIPPED_KEY"]

logger = logging.getLogger(__name__)


def line_offsets(path: str | Path) -> np.ndarray:
    """Byte offset of the start of every line, plus the file size at the end (``len = n_lines + 1``)."""
    offsets = [0]
    with open(path, "rb") as fh:
        for raw in fh:
            offsets.append(offsets[-1] + len(raw))
    return np.asarray(offsets, dtype=np.int64)


class MedRegDataset(Dataset):
    """One registry entry as a map-style dataset of ``{"input_ids", "labels", "pixel_values", "image_flags",
    "sample_index"}`` items (see the module docstring). The entry's ``max_dynamic_patch`` overrides
    ``image_settings``; its ``data_augment`` turns on the box-aware crop; ``strict=False`` skips and reports bad
    records.
    """

    def __init__(self, spec: DatasetSpec, tokenizer: Any, *, template: str = "Hermes-2",
                 image_settings: ImageSettings | None = None, num_image_token: int = 256,
                 max_seq_length: int | None = 2048, system_message: str | None = None, strict: bool = True,
                 seed: int = 0) -> None:
        self.spec = spec
        self.tokenizer = tokenizer
        self.template = template
        settings = image_settings or ImageSettings()
        if spec.max_dynamic_patch is not None:
            settings = dataclasses.replace(settings, max_dynamic_patch=spec.max_dynamic_patch)
        self.image_settings = settings
        self.num_image_token = num_image_token
        self.max_seq_length = max_seq_length
        self.system_message = system_message
        self.strict = strict
        self.seed = seed
        self.epoch = 0
        self.file = str(spec.annotation)
        self.tally = ProblemTally()
        self._lengths: list[int] | None = None

        self._offsets = line_offsets(spec.annotation)
        wanted = spec.select_lines(len(self._offsets) - 1)
        checker = RecordChecker(image_root=spec.root, image_check="exists")
        good = {line - 1 for line, _ in iter_records(self.file, checker, strict=strict, tally=self.tally,
                                                      last_line=max(wanted, default=-1) + 1)}
        self._lines = np.asarray([i for i in wanted if i in good], dtype=np.int64)
        if self.tally.skipped:
            logger.warning("%s (%s): %s", spec.name, self.file, self.tally.summary())
        if len(self._lines) == 0:
            raise BadRecordError([RecordProblem(self.file, 0, "bad-field", f"dataset {spec.name!r} has no usable records")])

    def __len__(self) -> int:
        return int(len(self._lines))

    def set_epoch(self, epoch: int) -> None:
        """Change the augmentation randomness (same seed + epoch + index -> same sample)."""
        self.epoch = int(epoch)

    def line_number(self, index: int) -> int:
        """1-based jsonl line of item ``index``."""
        return int(self._lines[index]) + 1

    def read_record(self, index: int, handle: BinaryIO | None = None) -> dict:
        """The raw record of item ``index`` (one seek + one line read; pass an open ``handle`` to reuse it)."""
        row = int(self._lines[index])
        start, end = int(self._offsets[row]), int(self._offsets[row + 1])
        with open(self.spec.annotation, "rb") if handle is None else contextlib.nullcontext(handle) as fh:
            fh.seek(start)
            raw = fh.read(end - start)
        record = parse_record_line(raw, self.file, row + 1)
        if not isinstance(record, dict):
            reason, message = ((record.reason, record.message) if isinstance(record, RecordProblem)
                               else ("not-an-object", "not a JSON object"))
            raise BadRecordError([RecordProblem(self.file, row + 1, reason,
                                                f"line changed since the dataset scan: {message}")])
        return record

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        tries = 0
        skipped: list[dict[str, Any]] = []
        while True:
            try:
                item = self._build(index)
            except BadRecordError as exc:
                if self.strict:
                    raise
                tries += 1
                skipped.extend({"reason": p.reason, "record": f"{p.file}:{p.line}", "message": p.message}
                               for p in exc.problems)
                if tries >= min(len(self), 100):
                    raise BadRecordError(exc.problems + [RecordProblem(
                        self.file, 0, "encode-error", f"{tries} consecutive records failed; giving up")]) from None
                index = (index + 1) % len(self)
                continue
            item[SAMPLE_INDEX_KEY] = torch.tensor(index, dtype=torch.long)
            if skipped:
                # the served record now appears twice in this epoch: say so, and let the trainer count it
                served = f"{self.file}:{self.line_number(index)}"
                for entry in skipped:
                    entry["served_instead"] = served
                    logger.warning("%s: %s: %s (skipped; %s served in its place, so it is served twice this epoch)",
                                   entry["record"], entry["reason"], entry["message"], served)
                item[SKIPPED_KEY] = skipped
            return item

    def _build(self, index: int) -> dict[str, torch.Tensor]:
        record = self.read_record(index)
        line = self.line_number(index)
        where = f"{self.file}:{line}"

        def fail(reason: str, message: str) -> BadRecordError:
            return BadRecordError([RecordProblem(self.file, line, reason, message)])

        turns = record["conversations"]
        images = []
        for rel in image_paths(record):
            try:
                images.append(load_image(resolve_image(rel, self.spec.root)))
            except ImageLoadError as exc:
                raise fail("corrupt-image", f"image {rel!r}: {exc.reason}") from None
            except (ValueError, OSError) as exc:  # the file changed since the scan checked its path
                raise fail("unreadable-image", f"image {rel!r}: {type(exc).__name__}: {str(exc)[:200]}") from None
        if self.spec.data_augment and images:
            rng = np.random.default_rng([self.seed, self.epoch, int(self._lines[index]), index])
            try:
                images, turns = box_aware_augment(images, turns, rng)
            except RegionError as exc:
                raise fail("bad-box", str(exc)) from None
        if images:
            max_num = max(1, self.image_settings.max_dynamic_patch // len(images))
            pixel_values, num_patches = images_to_pixel_values(images, self.image_settings, max_num=max_num)
            image_flags = torch.ones(pixel_values.shape[0], dtype=torch.long)
        else:
            pixel_values, num_patches = dummy_pixel_values(self.image_settings.image_size), []
            image_flags = torch.zeros(1, dtype=torch.long)
        try:
            sample = encode_conversation(turns, self.tokenizer, template=self.template, num_patches_list=num_patches,
                                         num_image_token=self.num_image_token, base_prompt=self.spec.base_prompt,
                                         system_message=self.system_message, max_length=self.max_seq_length,
                                         where=where)
        except EncodeError as exc:
            problem = RecordProblem(self.file, line, exc.reason, str(exc).removeprefix(where + ": "))
            raise BadRecordError([problem]) from None
        return {"input_ids": sample.input_ids, "labels": sample.labels, "pixel_values": pixel_values,
                "image_flags": image_flags}

    @property
    def lengths(self) -> list[int]:
        """Approximate token length per item, for length-grouped sampling: the record's own ``length`` field, else
        text tokens plus ``num_image_token`` x the most tiles per image (computed once, on first use)."""
        if self._lengths is None:
            tiles = self.image_settings.max_tiles
            template = self.template if isinstance(self.template, ChatTemplate) else get_template(self.template)
            empty_turns = template.render([{"from": "human", "value": ""}, {"from": "gpt", "value": ""}],
                                          system_message=self.system_message)  # this run's template and system
            overhead = len(self.tokenizer.encode(empty_turns, add_special_tokens=False))
            lengths: list[int] = [0] * len(self)
            pending: list[tuple[int, str, int]] = []  # (item, text, non-text tokens), tokenised in chunks

            def flush() -> None:
                if pending:
                    encoded = self.tokenizer([t for _, t, _ in pending], add_special_tokens=False)["input_ids"]
                    for (i, _, extra), ids in zip(pending, encoded):
                        lengths[i] = len(ids) + extra
                    pending.clear()

            with open(self.spec.annotation, "rb") as fh:
                for i in range(len(self)):
                    record = self.read_record(i, fh)
                    given = record.get("length")
                    if isinstance(given, int) and not isinstance(given, bool):
                        lengths[i] = given
                        continue
                    n_images = len(image_paths(record))
                    text = self.spec.base_prompt + " " + " ".join(str(t["value"]) for t in record["conversations"])
                    pending.append((i, text, overhead + n_images * (self.num_image_token * tiles + 2)))
                    if len(pending) >= 4096:
                        flush()
            flush()
            self._lengths = lengths
        return self._lengths


class MedRegConcatDataset(torch.utils.data.ConcatDataset):
    """The registry's datasets one after another (the original ``ConcatDataset``), with concatenated
    :attr:`lengths`, a combined :meth:`set_epoch` and :meth:`describe` (the record of a global index)."""

    datasets: list[MedRegDataset]

    @property
    def lengths(self) -> list[int]:
        """Per-item length estimates of all member datasets, in order."""
        return [n for d in self.datasets for n in d.lengths]

    def set_epoch(self, epoch: int) -> None:
        for d in self.datasets:
            d.set_epoch(epoch)

    def _member(self, index: int) -> tuple[MedRegDataset, int, int]:
        """(member dataset, index inside it, offset of its first item) of a global index."""
        if index < 0:
            index += len(self)
        which = bisect.bisect_right(self.cumulative_sizes, index)
        offset = self.cumulative_sizes[which - 1] if which else 0
        return self.datasets[which], index - offset, offset

    def __getitem__(self, index: int) -> dict[str, Any]:
        """The member's item, with ``sample_index`` turned into a global index."""
        dataset, local, offset = self._member(index)
        item = dataset[local]
        if SAMPLE_INDEX_KEY in item:
            item[SAMPLE_INDEX_KEY] = item[SAMPLE_INDEX_KEY] + offset
        return item

    def describe(self, index: int) -> str:
        """``FILE:LINE`` of a global index, plus the record's ``id`` where it has one (for error messages)."""
        dataset, local, _ = self._member(index)
        try:
            record_id = dataset.read_record(local).get("id")
        except (OSError, BadRecordError, AttributeError):
            record_id = None
        where = f"{dataset.file}:{dataset.line_number(local)}"
        return where + (f" (id {str(record_id)[:80]!r})" if record_id is not None else "")


def build_training_dataset(meta_path: str | Path, tokenizer: Any, config: Any = None, *, template: str | None = None,
                           max_seq_length: int | None = 2048, strict: bool = True, seed: int = 0
                           ) -> MedRegConcatDataset:
    """All entries of a meta file as one dataset (``medrega-train``'s). ``config`` (an ``InternVLChatConfig``, or
    ``None`` for the V1.2 defaults) gives the tiling, ``num_image_token``, the template unless ``template`` is given,
    and ``system_message``."""
    specs = load_meta(meta_path)
    settings = ImageSettings.from_config(config) if config is not None else ImageSettings()
    n_tokens = int(getattr(config, "num_image_token", 0) or 0) or num_image_tokens(settings.image_size)
    template_name = template or getattr(config, "template", None) or "Hermes-2"
    system_message = getattr(config, "system_message", None)
    return MedRegConcatDataset([
        MedRegDataset(spec, tokenizer, template=template_name, image_settings=settings, num_image_token=n_tokens,
                      max_seq_length=max_seq_length, system_message=system_message, strict=strict, seed=seed)
        for spec in specs.values()])
