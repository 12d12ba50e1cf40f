"""What lenient training (`--data_check lenient`) left out, counted by reason and reported at the end of the run.

Records are left out at the scan, before training (`MedRegDataset.tally`: bad JSON, boxes, missing images, ...), or
at build time when a record's image is read: the next record is served in its place (twice in the epoch), and the
item carries the skip (`skipped_records`) so the trainer counts it whichever data-loader worker built it.
`SkipReport` gathers both over ranks and writes `skipped_records.json` to the run directory.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

import torch.distributed as dist

from internvl.io_safety import atomic_write_text

SKIP_REPORT_NAME = "skipped_records.json"
MAX_LISTED = 1000  # build-time skips listed one by one in the report (all are counted)


class SkipReport:
    """Scan-time counts (from the dataset) plus build-time skips seen in training batches."""

    def __init__(self, dataset: Any = None) -> None:
        self.scan: dict[str, dict[str, Any]] = {}
        members = getattr(dataset, "datasets", [dataset] if dataset is not None else [])
        self.lenient = any(getattr(member, "strict", True) is False for member in members)
        for member in members:
            tally = getattr(member, "tally", None)
            if tally is None:
                continue
            name = getattr(getattr(member, "spec", None), "name", getattr(member, "file", "?"))
            self.scan[name] = {"file": str(getattr(member, "file", "")), "seen": tally.seen, "kept": tally.kept,
                               "by_reason": dict(sorted(tally.by_reason.items()))}
        self.build: list[dict[str, Any]] = []

    def add_batch(self, entries: list[dict[str, Any]] | None) -> None:
        """Record the build-time skips a batch carried (`skipped_records`)."""
        if entries:
            self.build.extend(entries)

    @property
    def build_count(self) -> int:
        """Build-time skips seen on this rank so far."""
        return len(self.build)

    def gathered(self) -> dict[str, Any]:
        """The whole report (collective under torch.distributed: every rank must call it)."""
        build = list(self.build)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            parts: list[list[dict[str, Any]] | None] = [None] * dist.get_world_size()
            dist.all_gather_object(parts, build)
            build = [entry for part in parts for entry in (part or [])]
        scan_by_reason: Counter = Counter()
        for entry in self.scan.values():
            scan_by_reason.update(entry["by_reason"])
        build_by_reason = Counter(entry["reason"] for entry in build)
        return {
            "scan": {"skipped": sum(e["seen"] - e["kept"] for e in self.scan.values()),
                     "by_reason": dict(sorted(scan_by_reason.items())), "datasets": self.scan},
            "build": {"skipped": len(build), "by_reason": dict(sorted(build_by_reason.items())),
                      "served_twice": len(build),
                      "records": build[:MAX_LISTED], "listed": min(len(build), MAX_LISTED)},
        }

    @staticmethod
    def summary_fields(report: dict[str, Any]) -> dict[str, float]:
        """Flat counts for the final log line (TensorBoard scalars) and run_config.json."""
        fields: dict[str, float] = {"skipped_records/scan": report["scan"]["skipped"],
                                    "skipped_records/build": report["build"]["skipped"]}
        for stage in ("scan", "build"):
            for reason, n in report[stage]["by_reason"].items():
                fields[f"skipped_records/{stage}/{reason}"] = n
        return fields

    @staticmethod
    def write(report: dict[str, Any], output_dir: str | os.PathLike) -> Path:
        """Write `skipped_records.json` into the run directory (atomically); returns its path."""
        return atomic_write_text(Path(output_dir) / SKIP_REPORT_NAME,
                                 json.dumps(report, indent=1, ensure_ascii=False) + "\n")
