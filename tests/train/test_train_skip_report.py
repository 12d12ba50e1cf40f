"""Lenient training reports what it left out: records bad at the scan and records whose image fails only when read
(each replaced by the next record, which is then served twice), by reason, in `skipped_records.json`, in
run_config.json and in TensorBoard; and the dataset tags every served item so the trainer can count it."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from internvl.data.collate import pad_collate

from internvl.testing.square_task import write_square_dataset
from .test_train_cli_resume import ROOT, cli_args, env

BAD_IMAGES = (2, 5)  # 0-based records whose PNG is garbage: they pass the scan (file exists) and fail when read


def lenient_dataset(root: Path) -> tuple[Path, Path]:
    meta = write_square_dataset(root, n=8, seed=0)
    annotation = root / "squares.jsonl"
    lines = annotation.read_text().splitlines()
    for i in BAD_IMAGES:
        (root / json.loads(lines[i])["image"]).write_bytes(b"\x89PNG not really" * 8)
    annotation.write_text("\n".join(lines + ['{"id": "broken", "conversations": ']) + "\n")
    return meta, annotation


def test_lenient_run_reports_skips_by_reason(tmp_path, tiny_tokenizer_dir):
    meta, annotation = lenient_dataset(tmp_path / "data")
    out = tmp_path / "run"
    argv = cli_args(out, tiny_tokenizer_dir, meta, 2, "--data_check", "lenient", "--report_to", "tensorboard",
                    "--save_strategy", "no")  # 2 steps x 2 x 2 = 8 samples: one epoch
    result = subprocess.run([sys.executable, "-m", "internvl.train", *argv], capture_output=True, text=True, env=env(),
                            cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "skipped_records.json").read_text())
    assert report["scan"]["skipped"] == 1 and report["scan"]["by_reason"] == {"invalid-json": 1}
    build = report["build"]
    assert build["skipped"] == 2 and build["by_reason"] == {"corrupt-image": 2} and build["served_twice"] == 2
    assert sorted(e["record"] for e in build["records"]) == [f"{annotation}:{i + 1}" for i in BAD_IMAGES]
    assert sorted(e["served_instead"] for e in build["records"]) == [f"{annotation}:{i + 2}" for i in BAD_IMAGES]
    config = json.loads((out / "run_config.json").read_text())
    assert config["resolved"]["skipped_records"] == {
        "scan": {"skipped": 1, "by_reason": {"invalid-json": 1}},
        "build": {"skipped": 2, "by_reason": {"corrupt-image": 2}}}
    log = result.stdout + result.stderr
    assert "served twice" in log and "2 at build time {'corrupt-image': 2}" in log
    events = EventAccumulator(str(next((out / "runs").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert events.Scalars("train/skipped_records/build/corrupt-image")[-1].value == 2, tags
    assert events.Scalars("train/skipped_records/scan/invalid-json")[-1].value == 1


def test_items_carry_their_index_and_skips_through_the_collator(tmp_path, tiny_tokenizer_dir):
    from internvl.data.dataset import build_training_dataset
    from internvl.tokenization import load_tokenizer

    meta, annotation = lenient_dataset(tmp_path / "data")
    dataset = build_training_dataset(meta, load_tokenizer(str(tiny_tokenizer_dir)), strict=False,
                                     max_seq_length=4096)
    items = [dataset[i] for i in range(len(dataset))]
    batch = pad_collate(items)
    assert batch["sample_index"].tolist() == [0, 1, 3, 3, 4, 6, 6, 7]  # records 2 and 5 replaced by the next one
    assert [e["record"] for e in batch["skipped_records"]] == [f"{annotation}:{i + 1}" for i in BAD_IMAGES]
    assert dataset.describe(3) == f"{annotation}:4 (id 'squares-3')"
