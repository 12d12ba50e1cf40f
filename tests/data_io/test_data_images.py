"""load_image on real files from registry packages (pydicom, nibabel, scikit-image test data), checked numerically."""
from __future__ import annotations

import os
import shutil
import struct
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.pixels import apply_color_lut, pixel_array

from internvl.data.images import (
    WINDOW_PRESETS,
    ImageLoadError,
    apply_window,
    detect_format,
    load_image,
    probe_image,
    volume_slice,
)


def dcm(name: str) -> str:
    path = get_testdata_file(name, download=False)
    assert path is not None, f"pydicom test file {name} missing"
    return path


NIB_DATA = Path(nib.__file__).parent / "tests" / "data"


def skimage_file(name: str) -> Path:
    import skimage.data

    path = Path(skimage.data.__file__).parent / name
    assert path.exists(), path
    return path


def gray(image: Image.Image) -> np.ndarray:
    arr = np.asarray(image)
    assert image.mode == "RGB" and arr.ndim == 3
    assert (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all()
    return arr[..., 0].astype(int)


def linear_window(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2.1 LINEAR, written out independently of the code under test."""
    c, w = center - 0.5, width - 1
    out = ((values - c) / w + 0.5) * 255
    out = np.where(values <= c - w / 2, 0, np.where(values > c + w / 2, 255, out))
    return np.rint(out).astype(int)


# --------------------------------------------------------------------------------------------- windowing


def test_apply_window_maps_hu_to_expected_grey_levels():
    hu = np.array([-2000, -1350, -600, 0, 149, 150, 3000], dtype=float)
    out = apply_window(hu, *WINDOW_PRESETS["lung"])  # centre -600, width 1500
    assert out.dtype == np.uint8
    # -600 HU is the centre: ((0.5 / 1499) + 0.5) * 255 = 127.6 -> 128; edges saturate.
    assert out.tolist() == [0, 0, 128, int(np.rint(((600.5 / 1499) + 0.5) * 255)), 255, 255, 255]
    brain = apply_window(np.array([0.0, 40.0, 80.0]), *WINDOW_PRESETS["brain"])
    assert brain.tolist() == [0, 129, 255]  # (0.5 / 79 + 0.5) * 255 = 129.1


def test_ct_small_hu_windowing_matches_the_dicom_formula():
    ds = pydicom.dcmread(dcm("CT_small.dcm"))
    hu = ds.pixel_array.astype(float) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    for preset in ("lung", "mediastinum", "bone", "brain", "abdomen"):
        got = gray(load_image(dcm("CT_small.dcm"), window=preset))
        want = linear_window(hu, *WINDOW_PRESETS[preset])
        assert np.abs(got - want).max() <= 1, preset
    soft = gray(load_image(dcm("CT_small.dcm"), window=(40, 400)))
    assert np.abs(soft - linear_window(hu, 40, 400)).max() <= 1


def test_rescale_slope_and_intercept_are_applied(tmp_path):
    ds = pydicom.dcmread(dcm("CT_small.dcm"))
    raw = ds.pixel_array.astype(float)
    ds.RescaleSlope, ds.RescaleIntercept = 2, -3000
    path = tmp_path / "rescaled.dcm"
    ds.save_as(path)
    got = gray(load_image(path, window=(0, 1000)))
    assert np.abs(got - linear_window(raw * 2 - 3000, 0, 1000)).max() <= 1


def test_header_window_is_the_default_for_mr():
    ds = pydicom.dcmread(dcm("MR_small.dcm"))
    assert (float(ds.WindowCenter), float(ds.WindowWidth)) == (600.0, 1600.0)
    got = gray(load_image(dcm("MR_small.dcm")))
    assert np.abs(got - linear_window(ds.pixel_array.astype(float), 600, 1600)).max() <= 1
    full = gray(load_image(dcm("MR_small.dcm"), window="minmax"))
    assert full.min() == 0 and full.max() == 255
    assert not np.array_equal(got, full)


def test_multi_valued_header_window_uses_the_first(tmp_path):
    ds = pydicom.dcmread(dcm("J2K_pixelrep_mismatch.dcm"))
    assert list(ds.WindowCenter) == [40, 40, 40]
    values = pixel_array(ds).astype(float) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    got = gray(load_image(dcm("J2K_pixelrep_mismatch.dcm")))
    assert np.abs(got - linear_window(values, 40, 100)).max() <= 1


def test_voi_lut_sequence_is_preferred_over_window(tmp_path):
    ds = pydicom.dcmread(dcm("MR_small.dcm"))
    stored = ds.pixel_array.astype(int)
    n = int(stored.max()) + 1
    lut = (np.arange(n)[::-1] * 16).astype(np.uint16)  # an inverting ramp, 16-bit entries
    item = pydicom.Dataset()
    item.LUTDescriptor = [n, 0, 16]
    item.add_new(0x00283006, "US", lut.tolist())  # LUT Data
    ds.VOILUTSequence = pydicom.Sequence([item])
    path = tmp_path / "voilut.dcm"
    ds.save_as(path)
    got = gray(load_image(path))
    want = np.rint(lut[stored] / 65535 * 255).astype(int)
    assert np.abs(got - want).max() <= 1
    # an explicit window still overrides the header
    assert np.abs(gray(load_image(path, window=(600, 1600))) - linear_window(stored.astype(float), 600, 1600)).max() <= 1


def test_monochrome1_is_inverted(tmp_path):
    ds = pydicom.dcmread(dcm("CT_small.dcm"))
    ds.PhotometricInterpretation = "MONOCHROME1"
    path = tmp_path / "mono1.dcm"
    ds.save_as(path)
    normal = gray(load_image(dcm("CT_small.dcm"), window="abdomen"))
    inverted = gray(load_image(path, window="abdomen"))
    assert np.array_equal(inverted, 255 - normal)


def test_enhanced_multiframe_uses_per_frame_functional_groups(tmp_path):
    ds = pydicom.dcmread(dcm("CT_small.dcm"))
    hu = ds.pixel_array.astype(float) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    intercept = float(ds.RescaleIntercept)
    del ds.RescaleSlope, ds.RescaleIntercept  # enhanced objects keep these in functional groups
    transform = pydicom.Dataset()
    transform.RescaleSlope, transform.RescaleIntercept, transform.RescaleType = 1, intercept, "HU"
    shared = pydicom.Dataset()
    shared.PixelValueTransformationSequence = pydicom.Sequence([transform])
    frame_voi = pydicom.Dataset()
    frame_voi.WindowCenter, frame_voi.WindowWidth = 40, 400
    frame = pydicom.Dataset()
    frame.FrameVOILUTSequence = pydicom.Sequence([frame_voi])
    ds.SharedFunctionalGroupsSequence = pydicom.Sequence([shared])
    ds.PerFrameFunctionalGroupsSequence = pydicom.Sequence([frame])
    path = tmp_path / "enhanced.dcm"
    ds.save_as(path)
    assert np.abs(gray(load_image(path)) - linear_window(hu, 40, 400)).max() <= 1
    assert np.abs(gray(load_image(path, window="lung")) - linear_window(hu, -600, 1500)).max() <= 1


def test_unknown_window_is_a_caller_error():
    for path in (dcm("CT_small.dcm"), NIB_DATA / "anatomical.nii", skimage_file("ihc.png")):
        with pytest.raises(ValueError, match="unknown window") as err:
            load_image(path, window="liverish")
        assert not isinstance(err.value, ImageLoadError)  # not blamed on the file
    with pytest.raises(ValueError, match="centre, width"):
        load_image(dcm("CT_small.dcm"), window=(1, 2, 3))


# --------------------------------------------------------------------------------------------- DICOM decoding paths


def test_compressed_transfer_syntaxes_decode_to_the_same_image():
    base = np.asarray(load_image(dcm("MR_small.dcm")))
    for name in ("MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_bigendian.dcm", "MR_small_implicit.dcm"):
        assert np.array_equal(np.asarray(load_image(dcm(name))), base), name


def test_palette_colour_dicom():
    ds = pydicom.dcmread(dcm("examples_palette.dcm"))
    image = load_image(dcm("examples_palette.dcm"))
    assert image.size == (800, 350) and image.mode == "RGB"
    rgb = apply_color_lut(ds.pixel_array, ds)
    bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
    want = np.rint(rgb.astype(float) / (2**bits - 1) * 255).astype(int)
    assert np.abs(np.asarray(image).astype(int) - want).max() <= 1
    arr = np.asarray(image).astype(int)
    assert (arr[..., 0] != arr[..., 2]).any(), "palette image must not come out grey"


def test_ybr_multiframe_selects_frames():
    path = dcm("examples_ybr_color.dcm")
    info = probe_image(path)
    assert (info.width, info.height, info.frames) == (320, 240, 30)
    default = np.asarray(load_image(path))
    assert np.array_equal(default, pixel_array(path, index=15))  # middle frame, YBR converted to RGB
    first = np.asarray(load_image(path, frame=0))
    assert np.array_equal(first, pixel_array(path, index=0))
    assert not np.array_equal(first, default)
    with pytest.raises(ImageLoadError, match="frame 30 out of range"):
        load_image(path, frame=30)


def test_16bit_rgb_dicom_is_scaled_to_8bit():
    ds = pydicom.dcmread(dcm("SC_rgb_rle_16bit.dcm"))
    got = np.asarray(load_image(dcm("SC_rgb_rle_16bit.dcm"))).astype(int)
    want = np.rint(ds.pixel_array.astype(float) / 65535 * 255).astype(int)
    assert np.abs(got - want).max() <= 1


def test_seg_label_map_dicom_loads_as_binary_image():
    arr = gray(load_image(dcm("liver_1frame.dcm")))
    assert set(np.unique(arr)) == {0, 255}


def test_dicom_without_suffix_is_detected(tmp_path):
    target = tmp_path / "IM0001"
    shutil.copy(dcm("CT_small.dcm"), target)
    assert detect_format(target) == "dicom"
    assert np.array_equal(np.asarray(load_image(target)), np.asarray(load_image(dcm("CT_small.dcm"))))


def test_undecodable_and_truncated_dicom_raise_with_the_file_name():
    with pytest.raises(ImageLoadError, match="cannot decode") as err:
        load_image(dcm("JPEG-lossy.dcm"))  # 12-bit lossy JPEG: no installed decoder
    assert "JPEG-lossy.dcm" in str(err.value)
    with pytest.raises(ImageLoadError, match="MR_truncated.dcm: cannot decode"):
        load_image(dcm("MR_truncated.dcm"))


def test_dicom_header_bomb_is_refused_before_decoding(tmp_path):
    ds = pydicom.dcmread(dcm("CT_small.dcm"))
    ds.Rows = ds.Columns = 60000
    path = tmp_path / "bomb.dcm"
    ds.save_as(path)
    with pytest.raises(ImageLoadError, match="over the limit"):
        load_image(path)
    with pytest.raises(ImageLoadError, match="over the limit"):
        probe_image(path)  # the header check refuses it too


# --------------------------------------------------------------------------------------------- NIfTI


def _expected_axial(path: Path) -> np.ndarray:
    img = nib.as_closest_canonical(nib.load(path))
    data = img.get_fdata()
    k = data.shape[2] // 2
    sl = data[:, :, k].T[::-1, ::-1]  # rows: anterior at the top; columns: patient's right on the left
    lo, hi = sl.min(), sl.max()
    return np.rint((sl - lo) * 255 / (hi - lo)).astype(int)


def test_nifti_axial_middle_slice_matches_canonical_reference():
    path = NIB_DATA / "anatomical.nii"
    got = gray(load_image(path))
    assert np.abs(got - _expected_axial(path)).max() <= 1


def test_nifti_orientation_does_not_depend_on_storage_order(tmp_path):
    src = nib.load(NIB_DATA / "anatomical.nii")
    # Store the same anatomy as L-P-I with permuted axes: flipped and transposed array, matching affine.
    ornt = np.array([[1, -1], [2, -1], [0, 1]])
    moved = src.as_reoriented(ornt)
    path = tmp_path / "moved.nii.gz"
    nib.save(moved, path)
    assert moved.shape != src.shape
    for axis in ("axial", "coronal", "sagittal"):
        a = np.asarray(load_image(NIB_DATA / "anatomical.nii", axis=axis))
        b = np.asarray(load_image(path, axis=axis))
        assert np.array_equal(a, b), axis
        for index in (0, 3):
            va, _ = volume_slice(NIB_DATA / "anatomical.nii", axis=axis, slice_index=index)
            vb, _ = volume_slice(path, axis=axis, slice_index=index)
            assert np.array_equal(va, vb), (axis, index)


def test_nifti_slice_axes_frames_and_anisotropic_voxels():
    path = NIB_DATA / "example4d.nii.gz"  # 128 x 96 x 24 x 2, voxels 2 x 2 x 2.2 mm
    coronal = load_image(path, axis="coronal")
    assert coronal.size == (128, round(24 * 2.2 / 2.0))  # thick slices upsampled to square pixels
    info = probe_image(path)
    assert (info.width, info.height, info.frames) == (*load_image(path).size, 2)
    assert load_image(path, axis="sagittal").size == (96, 26)
    v0, _ = volume_slice(path, frame=0)
    v1, _ = volume_slice(path, frame=1)
    assert v0.shape == (96, 128) and not np.array_equal(v0, v1)
    with pytest.raises(ImageLoadError, match="frame 2 out of range"):
        load_image(path, frame=2)
    with pytest.raises(ImageLoadError, match="axial slice 24 out of range"):
        load_image(path, slice_index=24)
    with pytest.raises(ValueError, match="axis must be one of"):
        load_image(path, axis="oblique")


def test_nifti_windowing_in_physical_units(tmp_path):
    hu = np.zeros((8, 8, 3), dtype=np.int16)
    hu[..., 1] = np.arange(-1000, 1000, 2000 // 64)[:64].reshape(8, 8)
    path = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(hu, np.eye(4)), path)
    got = gray(load_image(path, window="bone"))
    values, _ = volume_slice(path)
    assert np.abs(got - linear_window(values, *WINDOW_PRESETS["bone"])).max() <= 1


# --------------------------------------------------------------------------------------------- PNG / JPEG / TIFF


def test_real_fundus_and_pathology_images_load_unchanged():
    for name in ("retina.jpg", "ihc.png"):
        path = skimage_file(name)
        with Image.open(path) as im:
            want = np.asarray(im.convert("RGB"))
        assert np.array_equal(np.asarray(load_image(path)), want), name


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16bit_greyscale_is_stretched_or_windowed(tmp_path, suffix):
    values = np.linspace(1000, 5000, 64 * 64).reshape(64, 64).astype(np.uint16)
    path = tmp_path / f"xray16{suffix}"
    Image.fromarray(values).save(path)
    with Image.open(path) as im:
        assert im.mode.startswith("I")
    full = gray(load_image(path))
    assert full.min() == 0 and full.max() == 255
    assert np.abs(full - np.rint((values - 1000.0) * 255 / 4000)).max() <= 1
    win = gray(load_image(path, window=(3000, 1000)))
    assert np.abs(win - linear_window(values.astype(float), 3000, 1000)).max() <= 1


def test_8bit_png_window_and_palette(tmp_path):
    arr = np.tile(np.arange(256, dtype=np.uint8), (4, 1))
    path = tmp_path / "ramp.png"
    Image.fromarray(arr, mode="L").save(path)
    assert np.array_equal(gray(load_image(path)), arr)
    assert np.abs(gray(load_image(path, window=(128, 64))) - linear_window(arr.astype(float), 128, 64)).max() <= 1
    pal = tmp_path / "pal.png"
    Image.fromarray(np.stack([arr] * 3, -1)).convert("P").save(pal)
    assert load_image(pal).mode == "RGB"


def test_multipage_tiff_frames(tmp_path):
    pages = [Image.fromarray(np.full((8, 8), v, np.uint8)) for v in (10, 200)]
    path = tmp_path / "stack.tif"
    pages[0].save(path, save_all=True, append_images=pages[1:])
    assert gray(load_image(path, frame=1)).max() == 200
    with pytest.raises(ImageLoadError, match="frame 5 out of range"):
        load_image(path, frame=5)


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def test_decompression_bomb_is_refused(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_header_only(40000, 40000))  # 1.6 G pixels declared in a 60-byte file
    with pytest.raises(ImageLoadError, match="bomb"):
        load_image(path)
    with pytest.raises(ImageLoadError, match="bomb"):
        probe_image(path)
    small = skimage_file("ihc.png")
    with pytest.raises(ImageLoadError, match="over the limit of 1000"):
        load_image(small, max_pixels=1000)


def test_corrupt_missing_and_directory_inputs(tmp_path):
    good = skimage_file("retina.jpg").read_bytes()
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good[: len(good) // 3])
    with pytest.raises(ImageLoadError, match="truncated.jpg: corrupt or truncated"):
        load_image(truncated)
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(os.urandom(2048))
    with pytest.raises(ImageLoadError, match="not a readable image"):
        load_image(garbage)
    with pytest.raises(ImageLoadError, match="file not found"):
        load_image(tmp_path / "nope.png")
    with pytest.raises(ImageLoadError, match="is a directory"):
        load_image(tmp_path)
    bad_nifti = tmp_path / "bad.nii.gz"
    bad_nifti.write_bytes(b"\x1f\x8b" + os.urandom(100))
    with pytest.raises(ImageLoadError, match="bad.nii.gz"):
        load_image(bad_nifti)


def test_load_and_probe_refuse_unreadable_files_alike(tmp_path):
    """load_image and probe_image open Pillow files through one helper: the same error for the same file."""
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(64))
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_header_only(40000, 40000))
    for path, reason in ((garbage, "not a readable image"), (bomb, "decompression bomb refused"),
                         (tmp_path / "nope.png", "file not found")):
        errors = []
        for read in (load_image, probe_image):
            with pytest.raises(ImageLoadError, match=reason) as caught:
                read(path)
            errors.append((caught.value.path, caught.value.reason))
        assert errors[0] == errors[1]
