"""Label maps -> boxes: per label, per connected component, real DICOM SEG, and NIfTI volumes in any orientation."""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image
from pydicom.data import get_testdata_file

from internvl.data.convert.masks import (
    LabelMapError,
    convert_masks,
    label_boxes,
    load_label_map,
    pair_by_stem,
    read_label_names,
)
from internvl.data.images import load_image
from internvl.data.records import RecordChecker
from internvl.regions import Box, Region, box_to_pixels, parse_regions, pixels_to_box


def answer(record: dict) -> list[Region]:
    return parse_regions(record["conversations"][1]["value"])


def two_organ_map() -> np.ndarray:
    labels = np.zeros((60, 80), dtype=np.uint8)
    labels[10:20, 5:15] = 1  # label 1: one blob
    labels[40:50, 10:30] = 2  # label 2: two separate blobs ...
    labels[5:8, 60:75] = 2
    labels[55, 79] = 2  # ... plus a single stray pixel
    return labels


def test_label_boxes_per_label_and_per_component():
    labels = two_organ_map()
    per_label, dropped = label_boxes(labels)
    assert dropped == 0
    assert per_label == {1: [(5, 10, 15, 20)], 2: [(10, 5, 80, 56)]}  # outer pixel edges
    comps, dropped = label_boxes(labels, mode="component", min_pixels=2)
    assert comps == {1: [(5, 10, 15, 20)], 2: [(60, 5, 75, 8), (10, 40, 30, 50)]} and dropped == 1
    diag = np.zeros((4, 4), dtype=np.uint8)
    diag[0, 0] = diag[1, 1] = 3  # diagonal neighbours are one component (8-connectivity)
    assert label_boxes(diag, mode="component")[0] == {3: [(0, 0, 2, 2)]}


def test_png_pairs_to_text_to_region_and_region_to_text(tmp_path):
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir(), masks.mkdir()
    Image.new("L", (80, 60), 50).save(images / "case1.png")
    Image.fromarray(two_organ_map()).save(masks / "case1_seg.png")
    Image.fromarray(np.full((10, 10), 1, np.uint8)).save(masks / "case2_seg.png")  # no image for case2
    Image.new("L", (10, 10)).save(images / "case3.png")
    Image.fromarray(np.full((20, 20), 1, np.uint8)).save(masks / "case3_seg.png")  # wrong size
    pairs, orphans = pair_by_stem(images, masks, mask_suffix="_seg")
    assert [p[0].name for p in pairs] == ["case1.png", "case3.png"] and [o.name for o in orphans] == ["case2_seg.png"]

    (tmp_path / "liver.json").write_text('{"1": "liver"}')
    records, report = convert_masks(masks, images, mask_suffix="_seg", names=tmp_path / "liver.json", modality="CT",
                                    mode="component", min_pixels=2)
    assert report.written == 1
    assert dict(report.skipped) == {"size-mismatch": 1, "component-too-small": 1, "unnamed-label": 1,
                                    "no-matching-image": 1}
    rec = records[0]
    assert rec["image"] == "case1.png" and (rec["width"], rec["height"]) == (80, 60)
    assert answer(rec) == [Region("liver", [pixels_to_box((5, 10, 15, 20), 80, 60)])]

    names = tmp_path / "names.csv"
    names.write_text("1,liver\n2,kidney\n")
    case1 = (masks / "case1_seg.png", images / "case1.png")
    records, _ = convert_masks(*case1, names=names, task="region_to_text", mode="component", min_pixels=2)
    assert [r["conversations"][1]["value"] for r in records] == ["liver", "kidney", "kidney"]
    records, _ = convert_masks(*case1, names=names, task="text_to_region", mode="component", min_pixels=2, lang="zh")
    assert [len(r.boxes) for r in answer(records[0])] == [1, 2]  # a multi-region object
    assert RecordChecker(image_root=images, image_check="decode").check(records[0], file="x", line=1) == []


def test_real_dicom_seg_liver_box(tmp_path):
    seg = get_testdata_file("liver_1frame.dcm", download=False)
    labels, names = load_label_map(seg)
    assert labels.shape == (512, 512) and names == {1: "Liver"}
    ys, xs = np.nonzero(labels)
    assert (xs.min(), ys.min(), xs.max(), ys.max()) == (79, 145, 350, 366)
    Image.new("L", (512, 512)).save(tmp_path / "ct.png")  # the SEG's CT is not shipped: any 512x512 image
    records, report = convert_masks(seg, tmp_path / "ct.png", modality="CT")
    assert report.written == 1
    assert answer(records[0]) == [Region("Liver", [Box(154, 283, 685, 716)])]  # round((79, 145, 351, 367) / 512 * 999)
    not_seg = get_testdata_file("CT_small.dcm", download=False)
    with pytest.raises(LabelMapError, match="not a segmentation"):
        load_label_map(not_seg)


@pytest.mark.parametrize("axis", ["axial", "coronal", "sagittal"])
def test_nifti_volume_boxes_cover_the_same_pixels_in_the_written_slices(tmp_path, axis):
    shape = (40, 30, 12)
    labels = np.zeros(shape, dtype=np.int16)
    labels[5:15, 8:20, 4:9] = 1
    labels[25:35, 2:10, 6:8] = 2
    image = np.where(labels > 0, 1000.0, 0.0).astype(np.float32)  # bright exactly where the labels are
    affine = np.diag([1.0, 1.5, 3.0, 1.0])  # anisotropic voxels: coronal/sagittal slices get resampled
    img, lab = nib.Nifti1Image(image, affine), nib.Nifti1Image(labels, affine)
    ornt = np.array([[2, -1], [0, -1], [1, 1]])  # store both in another orientation: must not matter
    nib.save(img.as_reoriented(ornt), tmp_path / "vol.nii.gz")
    nib.save(lab.as_reoriented(ornt), tmp_path / "vol_seg.nii.gz")
    out_images = tmp_path / "slices"
    (tmp_path / "names.json").write_text('{"1": "liver", "2": "spleen"}')
    records, report = convert_masks(tmp_path / "vol_seg.nii.gz", tmp_path / "vol.nii.gz",
                                    names=tmp_path / "names.json", axis=axis, slices="labelled", slice_step=2,
                                    out_images=out_images, window="500,1000")
    assert report.written == len(records) > 0 and not report.skipped
    for rec in records:
        png = load_image(out_images / rec["image"])
        assert png.size == (rec["width"], rec["height"])
        bright = np.asarray(png)[..., 0] > 127
        for region in answer(rec):
            (box,) = region.boxes
            x1, y1, x2, y2 = box_to_pixels(box, *png.size)
            inside = np.zeros_like(bright)
            inside[int(np.floor(y1)):int(np.ceil(y2)), int(np.floor(x1)):int(np.ceil(x2))] = True
            # the bright pixels of this organ lie in its box (up to a 1-pixel rounding margin)
            ys, xs = np.nonzero(bright & inside)
            assert len(ys) > 0
            assert x1 - 1.5 <= xs.min() and xs.max() + 1 <= x2 + 1.5 and y1 - 1.5 <= ys.min() and ys.max() + 1 <= y2 + 1.5
        ys, xs = np.nonzero(bright)
        covered = np.zeros_like(bright)
        for region in answer(rec):
            x1, y1, x2, y2 = box_to_pixels(region.boxes[0], *png.size)
            covered[max(0, int(y1) - 1):int(np.ceil(y2)) + 1, max(0, int(x1) - 1):int(np.ceil(x2)) + 1] = True
        assert covered[ys, xs].all(), "every labelled pixel is inside some box"


def test_read_label_names_formats(tmp_path):
    (tmp_path / "n.json").write_text(json.dumps({"0": "background", "1": "liver", "2": "kidney"}))
    assert read_label_names(tmp_path / "n.json") == {1: "liver", 2: "kidney"}
    (tmp_path / "n.csv").write_text("value,name\n1,liver\n2,right kidney\n")
    assert read_label_names(tmp_path / "n.csv") == {1: "liver", 2: "right kidney"}
    (tmp_path / "aal.txt").write_text("1 Precentral_L 2001\n2 Precentral_R 2002\n")
    assert read_label_names(tmp_path / "aal.txt") == {1: "Precentral_L", 2: "Precentral_R"}
    (tmp_path / "itk.txt").write_text('# ITK-SNAP\n0 0 0 0 0 0 0 "Clear Label"\n1 255 0 0 1 1 1 "Left ventricle"\n')
    assert read_label_names(tmp_path / "itk.txt") == {1: "Left ventricle"}
    (tmp_path / "bad.txt").write_text("1 liver\nkidney\n")
    with pytest.raises(LabelMapError, match="bad.txt:2"):
        read_label_names(tmp_path / "bad.txt")
    (tmp_path / "scalar.json").write_text("5")
    with pytest.raises(LabelMapError, match=r"scalar.json: expected a JSON object \{value: name\}, got int"):
        read_label_names(tmp_path / "scalar.json")


def test_label_names_header_only_on_line_one(tmp_path):
    """CSV and text tables share the value parsing: a non-number is a header on line 1, an error elsewhere."""
    (tmp_path / "head.txt").write_text("value name\n3 spleen\n")
    assert read_label_names(tmp_path / "head.txt") == {3: "spleen"}
    (tmp_path / "bad.csv").write_text("1,liver\nkidney,2\n")
    with pytest.raises(LabelMapError, match=r"bad.csv:2: expected 'value,name', got \['kidney', '2'\]"):
        read_label_names(tmp_path / "bad.csv")
    with pytest.raises(LabelMapError, match=r"bad.txt:2: expected 'value name', got 'kidney'"):
        (tmp_path / "bad.txt").write_text("1 liver\nkidney\n")
        read_label_names(tmp_path / "bad.txt")


def test_colour_and_non_integer_label_maps_are_rejected(tmp_path):
    Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / "rgb.png")
    with pytest.raises(LabelMapError, match="single-channel"):
        load_label_map(tmp_path / "rgb.png")
    nib.save(nib.Nifti1Image(np.full((4, 4, 3), 0.5, np.float32), np.eye(4)), tmp_path / "float.nii")
    with pytest.raises(LabelMapError, match="non-integer"):
        load_label_map(tmp_path / "float.nii")


def test_unreadable_label_volumes_are_counted_not_raised(tmp_path):
    """A garbage .nii.gz is one bad-label-map skip for every slice choice (nibabel's ImageFileError included)."""
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 3), np.float32), np.eye(4)), tmp_path / "img.nii.gz")
    (tmp_path / "seg.nii.gz").write_bytes(b"garbage" * 10)
    for slices in ("middle", "labelled"):
        records, report = convert_masks(tmp_path / "seg.nii.gz", tmp_path / "img.nii.gz", slices=slices,
                                        out_images=tmp_path / "out")
        assert records == [] and dict(report.skipped) == {"bad-label-map": 1}, slices


@settings(max_examples=60, deadline=None)
@given(arrays(np.uint8, st.tuples(st.integers(1, 12), st.integers(1, 12)), elements=st.integers(0, 3)),
       st.sampled_from(["label", "component"]))
def test_label_boxes_are_tight_and_cover_every_labelled_pixel(labels, mode):
    boxes, dropped = label_boxes(labels, mode=mode)
    assert dropped == 0 and set(boxes) == {int(v) for v in np.unique(labels) if v}
    for value, value_boxes in boxes.items():
        mask = labels == value
        covered = np.zeros_like(mask)
        for x1, y1, x2, y2 in value_boxes:
            assert 0 <= x1 < x2 <= labels.shape[1] and 0 <= y1 < y2 <= labels.shape[0]
            inside = mask[y1:y2, x1:x2]
            # tight: every edge row/column of the box holds a pixel of the label
            assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()
            covered[y1:y2, x1:x2] = True
        assert covered[mask].all()
        if mode == "label":
            assert len(value_boxes) == 1


def test_a_window_that_is_not_centre_width_numbers_is_a_convert_error(tmp_path):
    from internvl.data.convert import ConvertError

    labels = np.zeros((4, 4, 2), dtype=np.int16)
    nib.save(nib.Nifti1Image(labels, np.eye(4)), tmp_path / "v_seg.nii.gz")
    nib.save(nib.Nifti1Image(labels.astype(np.float32), np.eye(4)), tmp_path / "v.nii.gz")
    with pytest.raises(ConvertError, match=r"--window '40,abc': expected a preset name or 'centre,width'"):
        convert_masks(tmp_path / "v_seg.nii.gz", tmp_path / "v.nii.gz", window="40,abc")


def test_a_volume_whose_slices_differ_from_the_label_slices_is_a_size_mismatch(tmp_path):
    """Found from the headers (``slice_shape``), before any image voxel is read."""
    labels = np.zeros((4, 4, 2), dtype=np.int16)
    labels[1:3, 1:3, :] = 1
    nib.save(nib.Nifti1Image(labels, np.eye(4)), tmp_path / "v_seg.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((5, 4, 2), dtype=np.float32), np.eye(4)), tmp_path / "v.nii.gz")
    records, report = convert_masks(tmp_path / "v_seg.nii.gz", tmp_path / "v.nii.gz", out_images=tmp_path / "png")
    assert records == [] and dict(report.skipped) == {"size-mismatch": 1}
