"""MedReg-mini builder: box-true crops, split rules, name tables, orientation, and (when the Debian data is
installed) real slices with records that pass the toolkit's record checks."""
from __future__ import annotations

import json
import random
import re
from pathlib import Path

import numpy as np
import pytest

from internvl.data.images import volume_slice
from internvl.data.records import RecordChecker
from scripts import build_medreg_mini as builder
from scripts import medreg_mini_sources as src

HAVE_MRICRON = (src.MRICRON_DIR / "aal.nii.gz").is_file()
HAVE_CRANIUM = src.CRANIUM_INV3.is_file()


def _labelled_item() -> src.Item:
    labels = np.zeros((100, 80), dtype=np.int16)
    labels[10:30, 5:25] = 1
    labels[50:90, 40:70] = 2
    names = {1: ("left thing", "左侧物体"), 2: ("right thing", "右侧物体")}
    return src.Item(pixels=src.to_rgb((labels * 100).astype(np.uint8)), source="t", name="x", split_key="k",
                    split="train", modality="MRI", body_part=("brain", "脑"), labels=labels, label_names=names,
                    regions=src.regions_from_labels(labels, names, 10))


def test_regions_and_crops_are_box_true() -> None:
    item = _labelled_item()
    assert [(r.name_en, r.boxes) for r in item.regions] == [("left thing", ((5.0, 10.0, 25.0, 30.0),)),
                                                            ("right thing", ((40.0, 50.0, 70.0, 90.0),))]
    rng = np.random.default_rng(0)
    for k in range(20):
        crop = src.crop_item(item, rng, 0.6, 10, f"c{k}")
        for region in crop.regions:
            value = 1 if region.name_en == "left thing" else 2
            ys, xs = np.nonzero(crop.labels == value)
            assert region.boxes == ((xs.min(), ys.min(), xs.max() + 1.0, ys.max() + 1.0),)
            # the box encloses exactly the structure's pixels of the cropped image
            x1, y1, x2, y2 = (int(v) for v in region.boxes[0])
            assert (crop.pixels[y1:y2, x1:x2, 0] == value * 100).any()


def test_nested_labels_cover_their_members() -> None:
    labels = np.zeros((50, 50), dtype=np.int16)
    labels[5:45, 5:45] = 1
    labels[10:20, 10:40] = 2
    names = {1: ("head", "头部"), 2: ("bone", "骨骼")}
    regions = src.regions_from_labels(labels, names, 10, {1: (1, 2)})
    assert regions[0].boxes == ((5.0, 5.0, 45.0, 45.0),) and regions[1].boxes == ((10.0, 10.0, 40.0, 20.0),)


def test_block_split_keeps_blocks_together() -> None:
    splits = [src.block_split(i) for i in range(80)]
    assert splits[16:24] == ["test"] * 8 and splits[:16] == ["train"] * 16 and splits.count("test") == 16


def test_aal_name_table_errors_name_the_line(tmp_path: Path) -> None:
    good = tmp_path / "aal.txt"
    good.write_text("1 Precentral_L 2001\n2 Vermis_3 9030\n", encoding="utf-8")
    assert src.aal_label_names(good) == {1: ("left frontal lobe", "左侧额叶"), 2: ("cerebellar vermis", "小脑蚓部")}
    bad = tmp_path / "bad.txt"
    bad.write_text("1 Precentral_L 2001\n2 Mystery_L 1\n", encoding="utf-8")
    with pytest.raises(src.SourceError, match=r"bad.txt:2: .*Mystery_L"):
        src.aal_label_names(bad)


def test_head_masks_drop_the_head_holder() -> None:
    hu = np.full((120, 120), -1000.0)
    yy, xx = np.mgrid[:120, :120]
    r = np.hypot(yy - 55, xx - 60)
    hu[r < 40] = 30          # brain
    hu[(r >= 34) & (r < 40)] = 800  # skull ring
    hu[110:114, 10:110] = 300  # a separate bar under the head (scanner holder)
    head, bone, brain = src.head_masks(hu)
    assert not head[112, 60] and not bone[112, 60]
    assert bone[55, 97] and brain[55, 60] and not brain[55, 97]


@pytest.mark.skipif(not HAVE_MRICRON, reason="Debian mricron-data not installed (scripts/ci_setup_browser.sh)")
def test_brain_slices_match_the_toolkit_orientation_and_build_valid_records(tmp_path: Path) -> None:
    items = list(src.brain_items(step=45))
    assert {it.plane for it in items} == {"axial", "coronal", "sagittal"}
    for it in items:
        index = int(it.name.rsplit("_", 1)[1])
        values, _ = volume_slice(src.MRICRON_DIR / "aal.nii.gz", axis=it.plane, slice_index=index)
        assert values.shape == it.labels.shape  # same display geometry as load_image / converters
        assert ((values > 0) == (it.labels > 0)).all(), it.name
    # radiological convention: in an axial slice the left hemisphere is on the image's right
    axial = next(it for it in items if it.plane == "axial" and it.regions)
    left = [r for r in axial.regions if r.name_en.startswith("left ")]
    right = [r for r in axial.regions if r.name_en.startswith("right ")]
    assert left and right and np.mean([r.boxes[0][0] for r in left]) > np.mean([r.boxes[0][0] for r in right])
    # records from a real slice pass the toolkit's record checks (boxes parse, images exist)
    args = builder.parse_args(["--out", str(tmp_path)])
    rel, w, h, scale = builder.save_image(axial, tmp_path, args.max_side, args.quality)
    rng = random.Random(0)
    checker = RecordChecker(image_root=tmp_path, image_check="decode")
    recs = list(builder.records_for(axial, rel, w, h, scale, rng, 0.5, {"MRI": 1.0}))
    assert {t for t, _, _ in recs} >= {"text_to_region", "region_to_text", "vqa"}
    for n, (_, _, rec) in enumerate(recs, 1):
        assert checker.check(rec, file="mem.jsonl", line=n) == [], json.dumps(rec, ensure_ascii=False)[:300]


@pytest.mark.skipif(not HAVE_CRANIUM, reason="Debian invesalius-examples not installed (scripts/ci_setup_browser.sh)")
def test_cranium_volume_reads_with_spacing() -> None:
    vol, spacing = src.load_cranium()
    assert vol.shape == (108, 256, 256) and vol.dtype == np.int16
    assert spacing[2] == pytest.approx(1.5) and spacing[0] == pytest.approx(0.957, abs=1e-3)


# --------------------------------------------------------------------------------- user-style records (issue #17)
def _template_regex(template: str) -> "re.Pattern[str]":
    """A held-out template as a regex over filled questions: each {field} matches any text."""
    import re

    parts = re.split(r"\{[a-z_]+\}", template)
    return re.compile(".+".join(re.escape(p) for p in parts), re.DOTALL)


@pytest.mark.skipif(not (HAVE_MRICRON and HAVE_CRANIUM), reason="Debian mricron-data / invesalius-examples missing")
def test_small_build_has_user_kinds_in_the_question_language(tmp_path: Path) -> None:
    from scripts import build_medreg_mini as builder
    from scripts import medreg_mini_userturns as user

    from internvl.data.records import RecordChecker
    from internvl.regions import has_regions
    from medrega_eval.metrics.text import text_language
    from medrega_eval.metrics.vqa import says_not_visible

    assert builder.main(["--out", str(tmp_path / "a"), "--quick", "--max-items", "10"]) == 0
    out = tmp_path / "a"
    for split, files in (("train", ("user_text_to_region", "absent", "user_vqa", "diagnosis", "multi_turn")),
                         ("test", (*builder.HELDOUT_FILES, "user_text_to_region", "absent", "diagnosis"))):
        for f in files:
            assert (out / split / f"{f}.jsonl").is_file(), f"{split}/{f}"
    meta = json.loads((out / "meta_file.json").read_text())
    assert "medreg_mini_train_multi_turn" in meta and not any("paraphrase" in k for k in meta)
    checker = RecordChecker(image_root=out, image_check="exists")
    heldout = [_template_regex(t) for t in user.load_phrasings(user.HELDOUT_PHRASINGS)[0].all_templates()]
    plain = 0
    for path in sorted(out.glob("*/*.jsonl")):
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            rec = json.loads(line)
            assert checker.check(rec, file=str(path), line=n) == [], f"{path}:{n}"
            conv = rec["conversations"]
            assert conv[0]["value"].startswith("<image>\n") and all("<image>" not in t["value"] for t in conv[1:])
            for q, a in zip(conv[::2], conv[1::2]):
                ql, al = text_language(q["value"]), text_language(a["value"])
                assert al == ql or a["value"] == "CT", f"{path}:{n}: {q['value'][-60:]!r} -> {a['value']!r}"
                if says_not_visible(a["value"]):
                    assert "absent" in path.name or "multi_turn" in path.name
                    assert not has_regions(a["value"])
                if path.parent.name == "train":
                    asked = q["value"].removeprefix("<image>\n")
                    assert not any(rx.fullmatch(asked) for rx in heldout), f"{path}:{n}: held-out phrasing in training"
            plain += path.parent.name == "train" and "You are" not in conv[0]["value"] and "你是" not in conv[0]["value"]
    assert plain > 0
    # deterministic for a seed
    assert builder.main(["--out", str(tmp_path / "b"), "--quick", "--max-items", "10"]) == 0
    for f in ("train/multi_turn.jsonl", "test/paraphrase_absent.jsonl", "train/text_to_region.jsonl"):
        assert (out / f).read_text() == (tmp_path / "b" / f).read_text().replace(str(tmp_path / "b"), str(out))
