"""Converters on real annotation data from registry packages, checked against independent computations.

* VinDr-CXR radiologist table shipped in ``torchxrayvision`` (``pip install --no-deps torchxrayvision``).
* The AAL brain atlas on the Colin27 T1 MRI from Debian ``mricron-data`` (``apt-get install mricron-data``).

Each test is skipped (with the install hint) where its package is not installed.
"""
from __future__ import annotations

import csv
import gzip
import importlib.util
from collections import defaultdict
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from internvl.data.convert.masks import convert_masks, read_label_names
from internvl.data.convert.vindr import convert_vindr
from internvl.data.images import load_image
from internvl.regions import parse_regions, pixels_to_box

MRICRON = Path("/usr/share/mricron/templates")


def vindr_csv() -> Path:
    spec = importlib.util.find_spec("torchxrayvision")  # locate the data without importing the package
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("torchxrayvision not installed (pip install --no-deps torchxrayvision)")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "vinbigdata-train.csv.gz"
    if not path.exists():
        pytest.skip(f"{path} missing")
    return path


def test_real_vindr_table_to_multilabel_records(tmp_path):
    source = vindr_csv()
    subset = tmp_path / "vindr_subset.csv.gz"
    with gzip.open(source, "rt", newline="") as src, gzip.open(subset, "wt", newline="") as dst:
        for i, line in enumerate(src):
            if i > 6000:
                break
            dst.write(line)
    expected: dict[str, set[str]] = defaultdict(set)
    with gzip.open(subset, "rt", newline="") as fh:
        for row in csv.DictReader(fh):
            if row["class_name"] != "No finding":
                expected[row["image_id"]].add(row["class_name"])
            else:
                expected.setdefault(row["image_id"], set())
    records, report = convert_vindr(subset, task="classify_multi")
    assert report.written == len(expected) > 1000 and not report.skipped
    got = {r["id"]: r["conversations"][1]["value"] for r in records}
    for image_id, classes in expected.items():
        assert got[image_id] == (", ".join(sorted(classes)) if classes else "No finding")
    # with two votes required, single-reader findings disappear; nothing is dropped silently
    voted, report = convert_vindr(subset, task="classify_multi", min_votes=2)
    assert report.skipped["too-few-votes"] > 0 and report.written == len(expected)
    assert sum(r["conversations"][1]["value"] == "No finding" for r in voted) > sum(
        v == "No finding" for v in got.values())


def test_real_aal_atlas_boxes_on_colin27(tmp_path):
    if not (MRICRON / "aal.nii.gz").exists():
        pytest.skip("mricron-data not installed (apt-get install mricron-data)")
    names = read_label_names(MRICRON / "aal.nii.txt")
    assert len(names) == 116 and names[1] == "Precentral_L"
    records, report = convert_masks(MRICRON / "aal.nii.gz", MRICRON / "ch2.nii.gz", names=MRICRON / "aal.nii.txt",
                                    modality="MRI", out_images=tmp_path / "slices")
    assert report.written == 1
    record = records[0]
    regions = {r.name: r.boxes for r in parse_regions(record["conversations"][1]["value"])}

    # independent reference: the canonical (RAS) middle axial slice shown anterior-up, right-on-left
    atlas = nib.as_closest_canonical(nib.load(MRICRON / "aal.nii.gz"))
    data = np.asanyarray(atlas.dataobj)
    plane = data[:, :, data.shape[2] // 2].T[::-1, ::-1]
    h, w = plane.shape
    present = sorted(int(v) for v in np.unique(plane) if v != 0)
    assert sorted(regions) == sorted(names[v] for v in present)
    for value in present[:10]:
        ys, xs = np.nonzero(plane == value)
        want = pixels_to_box((xs.min(), ys.min(), xs.max() + 1, ys.max() + 1), w, h)
        assert regions[names[value]] == [want]
    image = load_image(tmp_path / "slices" / record["image"])
    assert image.size == (record["width"], record["height"]) == (w, h)
    # left-hemisphere regions (suffix _L) lie on the image's right half: radiological orientation
    left = [b.x1 for name, boxes in regions.items() if name.endswith("_L") for b in boxes]
    right = [b.x2 for name, boxes in regions.items() if name.endswith("_R") for b in boxes]
    assert np.median(left) > 499 > np.median(right)
