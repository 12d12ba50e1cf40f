"""Upload and input validation of the demo: good files load, bad input gives a page message naming the problem."""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from internvl.demo.uploads import (
    UserInputError,
    box_from_drawing,
    check_fields,
    check_question,
    load_upload,
    parse_typed_box,
)
from internvl.regions import Box


def _png(path: Path, w: int = 64, h: int = 48) -> Path:
    Image.fromarray((np.arange(w * h) % 255).astype(np.uint8).reshape(h, w)).save(path)
    return path


def test_png_loads_as_rgb(tmp_path: Path) -> None:
    up = load_upload(_png(tmp_path / "a.png"))
    assert up.image.mode == "RGB" and up.image.size == (64, 48) and up.kind == "pil"


def test_real_dicom_and_nifti_load(tmp_path: Path) -> None:
    pydicom_data = pytest.importorskip("pydicom.data")
    ct = pydicom_data.get_testdata_file("CT_small.dcm", download=False)
    up = load_upload(ct)
    assert up.kind == "dicom" and up.image.size == (128, 128)
    no_ext = tmp_path / "IM0001"  # DICOM files often come without an extension: found by the DICM magic
    no_ext.write_bytes(Path(ct).read_bytes())
    assert load_upload(no_ext).kind == "dicom"
    nib = pytest.importorskip("nibabel")
    vol = np.random.default_rng(0).integers(0, 1000, size=(20, 24, 16)).astype(np.int16)
    path = tmp_path / "v.nii.gz"
    nib.save(nib.Nifti1Image(vol, np.eye(4)), path)
    up = load_upload(path, axis="axial")
    assert up.kind == "nifti" and "axial slice" in up.description


def test_non_image_upload_is_refused_with_name(tmp_path: Path) -> None:
    p = tmp_path / "notes.txt"
    p.write_text("hello")
    with pytest.raises(UserInputError, match="notes.txt: unsupported file type"):
        load_upload(p)
    q = tmp_path / "fake.png"
    q.write_bytes(b"this is not a png at all")
    with pytest.raises(UserInputError, match="fake.png"):
        load_upload(q)


def test_corrupt_dicom_is_refused(tmp_path: Path) -> None:
    p = tmp_path / "broken.dcm"
    p.write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00garbage" * 10)
    with pytest.raises(UserInputError, match="broken.dcm"):
        load_upload(p)


def test_decompression_bomb_and_size_limits(tmp_path: Path) -> None:
    p = tmp_path / "bomb.png"
    Image.new("L", (3000, 3000)).save(p)  # 9 Mpx of zeros compresses to a few KB
    assert p.stat().st_size < 100_000
    with pytest.raises(UserInputError, match="bomb.png: .*decompression bomb"):
        load_upload(p, max_pixels=4_000_000)
    with pytest.raises(UserInputError, match="over the upload limit"):
        load_upload(_png(tmp_path / "b.png"), max_bytes=10)
    e = tmp_path / "empty.png"
    e.write_bytes(b"")
    with pytest.raises(UserInputError, match="empty"):
        load_upload(e)
    g = tmp_path / "x.nii.gz"
    g.write_bytes(gzip.compress(b"not nifti"))
    with pytest.raises(UserInputError, match="x.nii.gz"):
        load_upload(g)


def test_question_checks() -> None:
    assert check_question("  Where is the liver? ") == "Where is the liver?"
    for bad in ("", "   ", None):
        with pytest.raises(UserInputError, match="empty"):
            check_question(bad)
    with pytest.raises(UserInputError, match="the limit is 2000"):
        check_fields(question="x" * 5000)


def test_typed_boxes() -> None:
    assert parse_typed_box("[[10, 20, 300, 400]]", 100, 100) == Box(10, 20, 300, 400)
    assert parse_typed_box("10,20,300,400", 100, 100) == Box(10, 20, 300, 400)
    assert parse_typed_box("0, 0, 50, 100", 100, 200, units="pixels") == Box(0, 0, 500, 500)
    for bad, msg in (("[[10, 20, 1200, 400]]", "outside"), ("-5, 0, 10, 10", "outside"), ("5, 5", "four numbers"),
                     ("30, 30, 10, 10", "x1 < x2"), ("1.5, 2, 3, 4", "whole numbers")):
        with pytest.raises(UserInputError, match=msg):
            parse_typed_box(bad, 100, 100)
    with pytest.raises(UserInputError, match="outside the 100x100 image"):
        parse_typed_box("0, 0, 150, 50", 100, 100, units="pixels")


def test_box_from_drawing() -> None:
    layer = np.zeros((200, 100, 4), dtype=np.uint8)
    layer[50:100, 20:60, 3] = 255
    assert box_from_drawing(layer) == Box(200, 250, 599, 500)
    with pytest.raises(UserInputError, match="No box"):
        box_from_drawing(np.zeros((10, 10, 4), dtype=np.uint8))
    with pytest.raises(UserInputError, match="No box"):
        box_from_drawing(None)
