"""Tests for internvl.data.registry and internvl.data.dataset: meta files, strict/lenient, DataLoader + packing."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from internvl.constants import IGNORE_INDEX, IMG_CONTEXT_TOKEN
from internvl.data.collate import PackedCollator, pad_collate
from internvl.data.dataset import MedRegDataset, build_training_dataset
from internvl.data.records import BadRecordError
from internvl.data.registry import MetaFileError, load_meta
from internvl.image_processing import ImageSettings

N_TOK = 4
SETTINGS = ImageSettings(image_size=56)


def _write_meta(directory: Path, entries: dict) -> Path:
    path = directory / "meta.json"
    path.write_text(json.dumps(entries, indent=2), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------------ registry
def test_load_meta_reads_every_field(demo_dataset_dir: Path) -> None:
    specs = load_meta(demo_dataset_dir / "meta.json")
    assert list(specs) == ["demo", "text_only"]
    demo = specs["demo"]
    assert demo.data_augment and demo.length == 11 and demo.repeat_time == 1.0 and demo.base_prompt == ""
    assert specs["text_only"].repeat_time == 2.0 and specs["text_only"].base_prompt.startswith("You are")
    assert demo.select_lines(4) == [0, 1, 2, 3]
    assert specs["text_only"].select_lines(3) == [0, 1, 2, 0, 1, 2]


def test_relative_paths_resolve_against_base_dir(demo_dataset_dir: Path, tmp_path: Path) -> None:
    meta = _write_meta(tmp_path, {"d": {"root": "images", "annotation": "demo.jsonl"}})
    spec = load_meta(meta, base_dir=demo_dataset_dir)["d"]
    assert spec.root == demo_dataset_dir / "images" and spec.annotation.is_file()
    with pytest.raises(MetaFileError, match="annotation file not found"):
        load_meta(meta, base_dir=tmp_path)


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"annotation": "a.jsonl"}, "'root' must be a non-empty string"),
        ({"root": ".", "annotation": "a.json"}, "must be a .jsonl file"),
        ({"root": ".", "annotation": "a.jsonl", "repeat_time": 1.5}, "above 1 must be an integer"),
        ({"root": ".", "annotation": "a.jsonl", "repeat_time": 0}, "positive number"),
        ({"root": ".", "annotation": "a.jsonl", "repeat_times": 2}, "unknown key(s) ['repeat_times']"),
        ({"root": ".", "annotation": "a.jsonl", "data_augment": "yes"}, "'data_augment' must be true or false"),
        ({"root": ".", "annotation": "a.jsonl", "length": -1}, "'length' must be a non-negative integer"),
        ({"root": ".", "annotation": "a.jsonl", "max_dynamic_patch": 0}, "'max_dynamic_patch' must be a positive"),
    ],
)
def test_meta_errors_name_file_line_and_dataset(tmp_path: Path, entry: dict, message: str) -> None:
    meta = _write_meta(tmp_path, {"first": {"root": ".", "annotation": "x.jsonl"}, "broken": entry})
    (tmp_path / "x.jsonl").touch()
    with pytest.raises(MetaFileError) as info:
        load_meta(meta, base_dir=tmp_path)
    text = str(info.value)
    assert text.startswith(f"{meta}:") and "dataset 'broken'" in text and message in text
    line = int(text.split(":")[1])
    assert '"broken"' in meta.read_text().splitlines()[line - 1]


def test_meta_invalid_json(tmp_path: Path) -> None:
    meta = tmp_path / "meta.json"
    meta.write_text('{\n  "a": {"root": "."\n}\n')
    with pytest.raises(MetaFileError, match=rf"{meta}:4: invalid JSON"):
        load_meta(meta)


# ------------------------------------------------------------------------------------------------ dataset
def _dataset(tiny_tokenizer, spec, **kwargs) -> MedRegDataset:
    return MedRegDataset(spec, tiny_tokenizer, image_settings=SETTINGS, num_image_token=N_TOK, **kwargs)


def test_demo_records_become_samples(tiny_tokenizer, demo_dataset_dir: Path) -> None:
    spec = load_meta(demo_dataset_dir / "meta.json")["demo"]
    ds = _dataset(tiny_tokenizer, dataclasses.replace(spec, data_augment=False))
    assert len(ds) == 11
    ctx = tiny_tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
    for i in range(len(ds)):
        item = ds[i]
        assert item["pixel_values"].shape == (1, 3, 56, 56) and item["image_flags"].tolist() == [1]
        assert int((item["input_ids"] == ctx).sum()) == N_TOK
        answer = ds.read_record(i)["conversations"][1]["value"]
        supervised = item["input_ids"][item["labels"] != IGNORE_INDEX]
        assert tiny_tokenizer.decode(supervised) == answer + "<|im_end|>"


def test_text_only_gets_a_dummy_tile_and_base_prompt(tiny_tokenizer, demo_dataset_dir: Path) -> None:
    spec = load_meta(demo_dataset_dir / "meta.json")["text_only"]
    ds = _dataset(tiny_tokenizer, spec)
    assert len(ds) == 6  # repeat_time 2
    item = ds[1]
    assert item["image_flags"].tolist() == [0] and item["pixel_values"].shape == (1, 3, 56, 56)
    assert torch.allclose(item["pixel_values"], ds[0]["pixel_values"])  # the same white tile
    text = tiny_tokenizer.decode(item["input_ids"])
    assert "<img>" not in text and "You are a helpful medical assistant. 胸腔积液是什么？" in text
    assert tiny_tokenizer.decode(item["input_ids"][item["labels"] != IGNORE_INDEX]) == "胸膜腔内液体增多。<|im_end|>常见。<|im_end|>"
    assert ds.line_number(4) == 2


def test_repeat_time_fraction_keeps_a_prefix(tiny_tokenizer, demo_dataset_dir: Path, tmp_path: Path) -> None:
    meta = _write_meta(tmp_path, {"d": {"root": str(demo_dataset_dir / "images"),
                                        "annotation": str(demo_dataset_dir / "demo.jsonl"), "repeat_time": 0.5}})
    ds = _dataset(tiny_tokenizer, load_meta(meta)["d"])
    assert len(ds) == 5 and [ds.line_number(i) for i in range(5)] == [1, 2, 3, 4, 5]


def _bad_file(directory: Path) -> Path:
    good = {"id": 1, "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    lines = [
        json.dumps(good),
        "{not json",
        json.dumps({**good, "image": "missing.png"}),
        json.dumps({"id": 2, "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "<ref>a</ref><box>[[5, 5, 1, 1]]</box>"}]}),
        json.dumps(good),
    ]
    path = directory / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_strict_raises_on_the_first_bad_record(tiny_tokenizer, tmp_path: Path) -> None:
    path = _bad_file(tmp_path)
    spec = load_meta(_write_meta(tmp_path, {"bad": {"root": str(tmp_path), "annotation": str(path)}}))["bad"]
    with pytest.raises(BadRecordError, match=rf"{path}:2: invalid-json"):
        _dataset(tiny_tokenizer, spec, strict=True)


def test_lenient_skips_and_counts_by_reason(tiny_tokenizer, tmp_path: Path, caplog) -> None:
    path = _bad_file(tmp_path)
    spec = load_meta(_write_meta(tmp_path, {"bad": {"root": str(tmp_path), "annotation": str(path)}}))["bad"]
    with caplog.at_level("WARNING"):
        ds = _dataset(tiny_tokenizer, spec, strict=False)
    assert len(ds) == 2 and [ds.line_number(i) for i in range(2)] == [1, 5]
    assert ds.tally.seen == 5 and ds.tally.kept == 2
    assert dict(ds.tally.by_reason) == {"invalid-json": 1, "missing-image": 1, "bad-box": 1}
    assert "kept 2 of 5 records" in caplog.text and "missing-image 1" in caplog.text


def test_build_time_errors_strict_and_lenient(tiny_tokenizer, demo_dataset_dir: Path, tmp_path: Path, caplog) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    good = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    rows = [{**good, "image": "broken.jpg"}, good]
    path = tmp_path / "rt.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = load_meta(_write_meta(tmp_path, {"rt": {"root": str(tmp_path / "images"), "annotation": str(path)}}))["rt"]
    strict = _dataset(tiny_tokenizer, spec, strict=True)  # the scan only checks that images exist
    with pytest.raises(BadRecordError, match=rf"{path}:1: corrupt-image"):
        strict[0]
    lenient = _dataset(tiny_tokenizer, spec, strict=False)
    with caplog.at_level("WARNING"):
        item = lenient[0]
    assert item["image_flags"].tolist() == [0]  # served record 2 (text-only) instead
    assert [(e["reason"], e["record"]) for e in item["skipped_records"]] == [("corrupt-image", f"{path}:1")]
    assert f"{path}:1: corrupt-image" in caplog.text
    # too long: named, never cut inside the image tokens
    tight = _dataset(tiny_tokenizer, load_meta(demo_dataset_dir / "meta.json")["demo"], max_seq_length=30)
    with pytest.raises(BadRecordError, match=r"demo.jsonl:1: too-long: \d+ tokens > max_length 30"):
        tight[0]


def test_lengths_estimate_follows_the_runs_template_and_system_message(tiny_tokenizer, demo_dataset_dir: Path) -> None:
    """The per-record overhead is this run's rendered template, not a fixed Hermes-2 string: a long system message
    and the internvl2_5 template are in the estimate."""
    spec = dataclasses.replace(load_meta(demo_dataset_dir / "meta.json")["demo"], data_augment=False)
    ds = _dataset(tiny_tokenizer, spec, template="internvl2_5", system_message="Be careful and exact. " * 20)
    for i, est in enumerate(ds.lengths):
        actual = len(ds[i]["input_ids"])
        assert abs(est - actual) <= max(8, 0.1 * actual), (i, est, actual)


def test_lengths_estimate_and_length_field(tiny_tokenizer, demo_dataset_dir: Path, tmp_path: Path) -> None:
    spec = load_meta(demo_dataset_dir / "meta.json")["demo"]
    ds = _dataset(tiny_tokenizer, dataclasses.replace(spec, data_augment=False))
    for i, est in enumerate(ds.lengths):
        actual = len(ds[i]["input_ids"])
        assert abs(est - actual) <= max(8, 0.1 * actual), (i, est, actual)
    row = {"length": 777, "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    path = tmp_path / "len.jsonl"
    path.write_text(json.dumps(row) + "\n")
    spec2 = load_meta(_write_meta(tmp_path, {"l": {"root": str(tmp_path), "annotation": str(path)}}))["l"]
    assert _dataset(tiny_tokenizer, spec2).lengths == [777]


def test_augmentation_is_seeded(tiny_tokenizer, demo_dataset_dir: Path) -> None:
    spec = load_meta(demo_dataset_dir / "meta.json")["demo"]
    a = _dataset(tiny_tokenizer, spec, seed=3)
    b = _dataset(tiny_tokenizer, spec, seed=3)
    assert torch.equal(a[8]["pixel_values"], b[8]["pixel_values"]) and torch.equal(a[8]["input_ids"], b[8]["input_ids"])
    plain = _dataset(tiny_tokenizer, dataclasses.replace(spec, data_augment=False))
    assert not torch.equal(a[8]["pixel_values"], plain[8]["pixel_values"])
    a.set_epoch(1)
    assert not torch.equal(a[8]["pixel_values"], b[8]["pixel_values"])


@pytest.mark.parametrize("packing", [False, True])
def test_two_entry_meta_iterates_in_a_dataloader_with_workers(tiny_tokenizer, demo_dataset_dir: Path, packing) -> None:
    class Config:  # the fields build_training_dataset reads from an InternVLChatConfig
        force_image_size = 56
        num_image_token = N_TOK
        template = "Hermes-2"
        system_message = None
        dynamic_image_size = False

    ds = build_training_dataset(demo_dataset_dir / "meta.json", tiny_tokenizer, Config(), max_seq_length=1024, seed=1)
    assert len(ds) == 17 and len(ds.lengths) == 17
    assert ds.describe(12).startswith(f"{ds.datasets[1].file}:2 (id ")
    collate = PackedCollator(max_packed_tokens=1024, num_images_expected=8) if packing else pad_collate
    loader = DataLoader(ds, batch_size=5, num_workers=2, collate_fn=collate, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    ctx = tiny_tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
    samples = real_tiles = 0
    for batch in loader:
        assert batch["pixel_values"].shape[0] == batch["image_flags"].shape[0]
        n_real = int(batch["image_flags"].sum())
        real_tiles += n_real
        assert int((batch["input_ids"] == ctx).sum()) == n_real * N_TOK
        if packing:
            assert "attention_mask" not in batch
            starts = (batch["position_ids"] == 0) & (batch["input_ids"] != 0)
            samples += int(starts.sum())
            assert batch["position_ids"].shape[1] <= 1024
        else:
            samples += batch["input_ids"].shape[0]
            mask = batch["attention_mask"]
            assert (mask[:, 1:] <= mask[:, :-1]).all()  # right padding: ones, then zeros
            assert (batch["labels"][mask == 0] == IGNORE_INDEX).all()
    assert samples == 17 and real_tiles == 11
