"""Medical image reading: DICOM, NIfTI and PNG/JPEG/TIFF into an RGB ``PIL.Image`` for the model.

Every consumer (training, evaluation, the demo, ``medrega-data check``, the converters) reads images through
:func:`load_image`, so windowing, orientation and errors (:class:`ImageLoadError`, naming the file) are the same
everywhere. Grey levels: stored values -> physical units (DICOM modality LUT / rescale, NIfTI scaling) -> a window
to 0-255 (DICOM PS3.3 C.11.2.1.2, computed by pydicom) -> display (MONOCHROME1 inverted, colour to RGB). The steps
and the presets are described in docs/data-io.md.
"""
from __future__ import annotations

import gzip
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image

__all__ = ["AXES", "RAS_AXIS", "DEFAULT_MAX_PIXELS", "ImageInfo", "ImageLoadError", "WINDOW_PRESETS", "Window",
           "apply_window", "detect_format", "load_image", "probe_image", "slice_shape", "volume_slice"]

#: Named CT windows as (centre, width) in Hounsfield units (common radiology defaults).
WINDOW_PRESETS: dict[str, tuple[float, float]] = {"lung": (-600.0, 1500.0), "mediastinum": (50.0, 350.0),
                                                  "bone": (400.0, 1800.0), "brain": (40.0, 80.0),
                                                  "abdomen": (40.0, 400.0)}

#: Largest accepted image (pixels of the 2D result), a guard against decompression bombs and absurd headers.
DEFAULT_MAX_PIXELS = 2**27  # 134M pixels, e.g. 11585 x 11585

Window = Union[str, tuple[float, float], None]

_DICOM_SUFFIXES = {".dcm", ".dicom", ".dic", ".ima"}
_NIFTI_SUFFIXES = (".nii", ".nii.gz", ".hdr", ".img", ".img.gz")
#: NIfTI slice planes, the default first (CLI choices, demo, batch checks).
AXES = ("axial", "coronal", "sagittal")
RAS_AXIS = {"sagittal": 0, "coronal": 1, "axial": 2}  # RAS world axis fixed by the slice


class ImageLoadError(ValueError):
    """An image could not be read; ``str()`` gives ``"PATH: reason"``."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


def _readable_kind(path: Path) -> str:
    """The file's format (:func:`detect_format`) once it exists and is readable."""
    if path.is_dir():
        raise ImageLoadError(path, "is a directory, not an image file")
    if not path.exists():
        raise ImageLoadError(path, "file not found")
    if not os.access(path, os.R_OK):
        raise ImageLoadError(path, "unreadable: permission denied")
    return detect_format(path)


@dataclass(frozen=True)
class ImageInfo:
    """Header facts of an image file; ``width``/``height`` are those of :func:`load_image` with default arguments."""

    format: str  # "dicom" | "nifti" | "pil"
    width: int
    height: int
    frames: int = 1


def detect_format(path: str | Path) -> str:
    """Return ``"dicom"``, ``"nifti"`` or ``"pil"`` from the suffix, else from the file's magic bytes."""
    path = Path(path)
    name = path.name.lower()
    if name.endswith(_NIFTI_SUFFIXES):
        return "nifti"
    if path.suffix.lower() in _DICOM_SUFFIXES:
        return "dicom"
    try:
        with open(path, "rb") as fh:
            head = fh.read(544)
    except OSError:
        return "pil"  # the caller's open reports the real error
    if head[128:132] == b"DICM":
        return "dicom"
    if head[:2] == b"\x1f\x8b":  # gzip: only NIfTI is read compressed
        try:
            head = gzip.open(path).read(348)
        except OSError:
            return "pil"
    if head[:4] in (b"\x5c\x01\x00\x00", b"\x00\x00\x01\x5c", b"\x1c\x02\x00\x00", b"\x00\x00\x02\x1c"):
        return "nifti"  # sizeof_hdr 348 (NIfTI-1) or 540 (NIfTI-2), either endianness
    return "pil"


def apply_window(values: np.ndarray, center: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """Map ``values`` (e.g. HU) to uint8 0-255 with a DICOM VOI window (pydicom's PS3.3 C.11.2.1.2 ``LINEAR``,
    ``LINEAR_EXACT`` or ``SIGMOID`` with an 8-bit output), so header windows and presets use one formula."""
    from pydicom.dataset import Dataset
    from pydicom.pixels import apply_windowing

    if not width > 0:
        raise ValueError(f"window width must be > 0, got {width}")
    ds = Dataset()
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsStored = 8
    ds.PixelRepresentation = 0
    ds.WindowCenter = float(center)
    ds.WindowWidth = max(float(width), 1.0) if function.upper() == "LINEAR" else float(width)
    ds.VOILUTFunction = function.upper()
    out = apply_windowing(np.asarray(values, dtype=np.float64), ds)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _stretch(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Linearly map [low, high] to 0-255 (constant images become 0)."""
    values = np.asarray(values, dtype=np.float64)
    if not np.isfinite(low) or not np.isfinite(high):
        raise ValueError("image has no finite values")
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    out = (values - low) * (255.0 / (high - low))
    return np.clip(np.rint(np.nan_to_num(out, nan=0.0)), 0, 255).astype(np.uint8)


def _window_values(values: np.ndarray, window: Window) -> np.ndarray:
    """Window physical values to uint8 for an explicit ``window`` (not ``None``)."""
    if isinstance(window, str):
        key = window.lower()
        if key in WINDOW_PRESETS:
            return apply_window(values, *WINDOW_PRESETS[key])
        finite = values[np.isfinite(values)] if np.issubdtype(values.dtype, np.floating) else values
        if finite.size == 0:
            raise ValueError("image has no finite values")
        if key == "minmax":
            return _stretch(values, float(finite.min()), float(finite.max()))
        if key == "percentile":
            low, high = np.percentile(finite, [0.5, 99.5])
            return _stretch(values, float(low), float(high))
        names = ", ".join([*WINDOW_PRESETS, "minmax", "percentile"])
        raise ValueError(f"unknown window {window!r}; use one of {names} or (centre, width)")
    try:
        center, width = (float(v) for v in window)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise ValueError(f"window must be a preset name or (centre, width), got {window!r}") from None
    return apply_window(values, center, width)


def _windowed(path: Path, values: np.ndarray, window: Window) -> np.ndarray:
    """:func:`_window_values` (``None``: the full value range) with a value problem as :class:`ImageLoadError`."""
    try:
        return _window_values(values, "minmax" if window is None else window)
    except ValueError as exc:
        raise ImageLoadError(path, str(exc)) from exc


def _check_size(path: Path, width: int, height: int, max_pixels: int) -> None:
    if width <= 0 or height <= 0:
        raise ImageLoadError(path, f"invalid image size {width}x{height}")
    if width * height > max_pixels:
        raise ImageLoadError(path, f"image is {width}x{height} = {width * height} pixels, over the limit of "
                                   f"{max_pixels} (possible decompression bomb; raise max_pixels if the file is "
                                   "trusted)")


def _to_rgb(gray_or_rgb: np.ndarray) -> Image.Image:
    arr = np.ascontiguousarray(gray_or_rgb)
    if arr.ndim == 2:
        return Image.fromarray(arr, mode="L").convert("RGB")
    return Image.fromarray(arr[..., :3], mode="RGB")


def _read_dicom(path: Path, *, stop_before_pixels: bool = False):
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(path, stop_before_pixels=stop_before_pixels)
    except InvalidDicomError:
        # No 128-byte preamble: legal for old files; accept only if it then parses as an image dataset.
        try:
            ds = pydicom.dcmread(path, force=True, stop_before_pixels=stop_before_pixels)
        except Exception as exc:  # noqa: BLE001 - pydicom raises many types for garbage input
            raise ImageLoadError(path, f"not a readable DICOM file ({exc})") from exc
        if "Rows" not in ds or "Columns" not in ds:
            raise ImageLoadError(path, "not a DICOM image (no DICM marker and no Rows/Columns)") from None
        return ds
    except Exception as exc:  # noqa: BLE001
        raise ImageLoadError(path, f"corrupt DICOM header ({type(exc).__name__}: {exc})") from exc


def _dicom_frames(ds) -> int:
    try:
        return int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        return 1


# Enhanced multi-frame objects keep rescale and window per frame, in functional groups.
_FRAME_GROUPS = ("PixelValueTransformationSequence", "FrameVOILUTSequence")


def _frame_view(ds, index: int):
    """The dataset with one frame's rescale and window (enhanced multi-frame: the per-frame functional group over
    the shared one over the top level); plain datasets are returned unchanged."""
    from pydicom.dataset import Dataset

    shared, per_frame = ds.get("SharedFunctionalGroupsSequence"), ds.get("PerFrameFunctionalGroupsSequence")
    groups = ([shared[0]] if shared else []) + ([per_frame[index]] if per_frame and index < len(per_frame) else [])
    items = [group[seq][0] for group in groups for seq in _FRAME_GROUPS if seq in group and len(group[seq].value)]
    if not items:
        return ds
    view = Dataset({element.tag: element for element in ds})  # a new element map: ds itself is left as it is
    if hasattr(ds, "file_meta"):
        view.file_meta = ds.file_meta
    for item in items:  # shared first, then the frame's own group overrides it
        for element in item:
            view[element.tag] = element
    return view


def _load_dicom(path: Path, window: Window, frame: int | None, max_pixels: int) -> Image.Image:
    from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, pixel_array

    ds = _read_dicom(path)
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise ImageLoadError(path, "DICOM file has no pixel data")
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
    except (AttributeError, TypeError, ValueError) as exc:
        raise ImageLoadError(path, f"DICOM header lacks valid Rows/Columns ({exc})") from exc
    _check_size(path, cols, rows, max_pixels)
    n_frames = _dicom_frames(ds)
    index = n_frames // 2 if frame is None else frame
    if not 0 <= index < n_frames:
        raise ImageLoadError(path, f"frame {index} out of range: the file has {n_frames} frame(s)")
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    try:
        arr = pixel_array(ds, index=index) if n_frames > 1 else pixel_array(ds)
    except Exception as exc:  # noqa: BLE001 - decoders raise RuntimeError/ValueError/NotImplementedError...
        raise ImageLoadError(path, f"cannot decode DICOM pixel data ({type(exc).__name__}: {exc})") from exc

    try:
        if photometric == "PALETTE COLOR":
            rgb = apply_color_lut(arr, ds)
            bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
            return _to_rgb(_stretch(rgb, 0, 2**bits - 1) if rgb.dtype != np.uint8 else rgb)
        if arr.ndim == 3:  # RGB, or YBR already converted to RGB by pydicom
            if arr.dtype != np.uint8:
                arr = _stretch(arr, 0, 2 ** int(ds.get("BitsStored", 16)) - 1)
            return _to_rgb(arr)
        ds = _frame_view(ds, index)
        values = apply_modality_lut(arr, ds)
        if window is not None:
            gray = _window_values(values, window)
        elif "VOILUTSequence" in ds:
            lut = ds.VOILUTSequence[0]
            bits = int(lut.LUTDescriptor[2])
            gray = _stretch(apply_voi_lut(values, ds, prefer_lut=True), 0, 2**bits - 1)
        elif "WindowCenter" in ds and "WindowWidth" in ds:
            center = ds.WindowCenter[0] if ds["WindowCenter"].VM > 1 else ds.WindowCenter
            width = ds.WindowWidth[0] if ds["WindowWidth"].VM > 1 else ds.WindowWidth
            gray = apply_window(values, float(center), float(width), str(ds.get("VOILUTFunction", "LINEAR")))
        else:
            gray = _window_values(values, "minmax")
    except ImageLoadError:
        raise
    except (ValueError, TypeError, AttributeError, IndexError, KeyError) as exc:
        raise ImageLoadError(path, f"cannot convert DICOM pixels to grey levels ({exc})") from exc
    if photometric == "MONOCHROME1":
        gray = 255 - gray
    return _to_rgb(gray)


def _nifti_image(path: Path):
    import nibabel as nib

    try:
        return nib.load(path)
    except Exception as exc:  # noqa: BLE001 - nibabel raises ImageFileError, ValueError, EOFError...
        raise ImageLoadError(path, f"corrupt or unsupported NIfTI file ({type(exc).__name__}: {exc})") from exc


def _slice_geometry(img, axis: str, path: Path):
    """For an anatomical ``axis``: the orientation (``nib.io_orientation``), the array axis to index and the rows,
    columns and (row, column) spacing of the slice :func:`volume_slice` returns. Other than 2D/3D/4D shapes fail."""
    import nibabel as nib

    shape = img.shape
    if not 2 <= len(shape) <= 4 or (len(shape) == 4 and shape[3] < 1):
        raise ImageLoadError(path, f"unsupported NIfTI shape {shape}: expected 2D, 3D or 4D")
    if axis not in RAS_AXIS:
        raise ValueError(f"axis must be one of {', '.join(RAS_AXIS)}, got {axis!r}")
    ornt = nib.io_orientation(img.affine)  # row i: (RAS world axis of array axis i, +1/-1)
    array_axis = {int(world): i for i, world in enumerate(ornt[:, 0])}
    sizes, zooms = (*shape[:3], 1)[:3], [float(z) for z in (*img.header.get_zooms()[:3], 1.0)[:3]]
    first, second = (array_axis[w] for w in range(3) if w != RAS_AXIS[axis])
    # display rows <- the second in-plane world axis, columns <- the first
    return ornt, array_axis[RAS_AXIS[axis]], int(sizes[second]), int(sizes[first]), (zooms[second], zooms[first])


def slice_shape(path: str | Path, axis: str = "axial") -> tuple[int, int]:
    """``(rows, cols)`` of the slices :func:`volume_slice` returns for ``axis``, from the header alone."""
    path = Path(path)
    _, _, rows, cols, _ = _slice_geometry(_nifti_image(path), axis, path)
    return rows, cols


def volume_slice(path: str | Path, *, axis: str = "axial", slice_index: int | None = None, frame: int | None = None,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[np.ndarray, tuple[float, float]]:
    """One 2D slice of a NIfTI volume in radiological display orientation, read without loading the volume.

    ``slice_index`` counts in RAS order whatever the storage order (default: the middle slice); ``frame`` picks the
    volume of a 4D file. Returns ``(values[H, W] float64 in scaled units, (row_spacing, col_spacing) in mm)``.
    Label-map converters use it too, so their boxes match :func:`load_image`'s pixels.
    """
    import nibabel as nib

    path = Path(path)
    img = _nifti_image(path)
    shape = img.shape
    ornt, fixed, rows, cols, spacing = _slice_geometry(img, axis, path)
    _check_size(path, cols, rows, max_pixels)
    n = shape[fixed] if fixed < len(shape) else 1
    canon = n // 2 if slice_index is None else slice_index
    if not 0 <= canon < n:
        raise ImageLoadError(path, f"{axis} slice {canon} out of range: the volume has {n}")
    stored = canon if ornt[fixed, 1] > 0 else n - 1 - canon

    key: list[object] = [slice(None)] * len(shape)
    if fixed < len(shape):  # a 2D image is one axial slice already
        key[fixed] = slice(stored, stored + 1)
    if len(shape) == 4:
        vol = 0 if frame is None else frame
        if not 0 <= vol < shape[3]:
            raise ImageLoadError(path, f"frame {vol} out of range: the file has {shape[3]} volumes")
        key[3] = vol
    elif frame not in (None, 0):
        raise ImageLoadError(path, f"frame {frame} out of range: the file has 1 volume")
    try:
        slab = np.asarray(img.dataobj[tuple(key)], dtype=np.float64)
    except Exception as exc:  # noqa: BLE001 - truncated/corrupt data
        raise ImageLoadError(path, f"cannot read NIfTI voxel data ({type(exc).__name__}: {exc})") from exc
    ras = nib.orientations.apply_orientation(slab.reshape(*slab.shape[:2], -1), ornt)  # RAS axis order and direction
    # Rows <- second in-plane world axis (reversed: A/S up), columns <- the first (reversed: R on the left).
    display = np.ascontiguousarray(ras.squeeze(RAS_AXIS[axis]).T[::-1, ::-1])
    assert display.shape == (rows, cols)
    return display, spacing


def _aspect_size(shape: tuple[int, int], spacing: tuple[float, float]) -> tuple[int, int]:
    """(width, height) after making pixels square by upsampling the coarser axis."""
    h, w = shape
    row_sp, col_sp = (abs(s) if s and np.isfinite(s) and s > 0 else 1.0 for s in spacing)
    if abs(row_sp - col_sp) <= 0.01 * max(row_sp, col_sp):
        return w, h
    finest = min(row_sp, col_sp)
    return max(1, round(w * col_sp / finest)), max(1, round(h * row_sp / finest))


def _load_nifti(path: Path, window: Window, slice_index: int | None, axis: str, frame: int | None, max_pixels: int
                ) -> Image.Image:
    values, spacing = volume_slice(path, axis=axis, slice_index=slice_index, frame=frame, max_pixels=max_pixels)
    image = Image.fromarray(_windowed(path, values, window), mode="L")
    size = _aspect_size(values.shape, spacing)
    _check_size(path, *size, max_pixels)
    if size != image.size:  # anisotropic voxels (e.g. thick slices in coronal/sagittal views)
        image = image.resize(size, Image.Resampling.BILINEAR)
    return image.convert("RGB")


@contextmanager
def _pil_errors(path: Path) -> Iterator[None]:
    """Pillow's errors while opening a file or reading its header, as an `ImageLoadError` naming the file."""
    try:
        yield
    except Image.DecompressionBombError as exc:
        raise ImageLoadError(path, f"decompression bomb refused ({exc})") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageLoadError(path, f"not a readable image ({type(exc).__name__}: {exc})") from exc


def _open_pil(path: Path) -> Image.Image:
    """`Image.open` (lazy: header only) with its errors as `ImageLoadError`."""
    with _pil_errors(path), warnings.catch_warnings():
        # the callers' max_pixels is the limit; Pillow's own hard limit (DecompressionBombError) still applies.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return Image.open(path)


def _load_pil(path: Path, window: Window, frame: int | None, max_pixels: int) -> Image.Image:
    im = _open_pil(path)
    with im:
        _check_size(path, im.width, im.height, max_pixels)
        if frame is not None:
            n = getattr(im, "n_frames", 1)
            if not 0 <= frame < n:
                raise ImageLoadError(path, f"frame {frame} out of range: the file has {n} frame(s)")
            im.seek(frame)
        try:
            im.load()
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise ImageLoadError(path, f"corrupt or truncated image data ({type(exc).__name__}: {exc})") from exc
        mode = im.mode
        if mode in ("I", "F") or mode.startswith("I;16"):  # 16-bit/32-bit greyscale: window to 8 bits
            return _to_rgb(_windowed(path, np.asarray(im, dtype=np.float64), window))
        if window is not None and mode in ("L", "LA", "1"):
            return _to_rgb(_windowed(path, np.asarray(im.convert("L"), dtype=np.float64), window))
        return im.convert("RGB")


def load_image(path: str | Path, *, window: Window = None, slice_index: int | None = None, axis: str = "axial",
               frame: int | None = None, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Read a DICOM, NIfTI or Pillow-readable file as an RGB ``PIL.Image`` ready for the model's transform.

    ``window``: ``None`` (DICOM header VOI LUT/window, else the full range), a :data:`WINDOW_PRESETS` name,
    ``"minmax"``, ``"percentile"`` or ``(centre, width)`` in physical units. ``slice_index``/``axis``: NIfTI slice
    (RAS order, default the middle). ``frame``: DICOM frame (default the middle), NIfTI volume or TIFF/GIF page
    (default the first). ``max_pixels`` refuses bigger 2D images before decoding. Raises :class:`ImageLoadError`
    for a bad file and ``ValueError`` for a bad ``window`` or ``axis``.
    """
    path = Path(path)
    if window is not None:
        _window_values(np.zeros(2), window)  # validate early: a bad window is the caller's error, not the file's
    kind = _readable_kind(path)
    if kind == "dicom":
        return _load_dicom(path, window, frame, max_pixels)
    if kind == "nifti":
        return _load_nifti(path, window, slice_index, axis, frame, max_pixels)
    return _load_pil(path, window, frame, max_pixels)


def probe_image(path: str | Path) -> ImageInfo:
    """Header only: the format and the size :func:`load_image` would return by default (cheap enough for
    ``medrega-data check --images header`` and converters). Raises :class:`ImageLoadError` like :func:`load_image`.
    """
    path = Path(path)
    kind = _readable_kind(path)
    if kind == "dicom":
        ds = _read_dicom(path, stop_before_pixels=True)
        try:
            info = ImageInfo("dicom", int(ds.Columns), int(ds.Rows), _dicom_frames(ds))
        except (AttributeError, TypeError, ValueError) as exc:
            raise ImageLoadError(path, f"DICOM header lacks valid Rows/Columns ({exc})") from exc
    elif kind == "nifti":
        img = _nifti_image(path)
        _, _, rows, cols, spacing = _slice_geometry(img, "axial", path)
        info = ImageInfo("nifti", *_aspect_size((rows, cols), spacing), img.shape[3] if len(img.shape) == 4 else 1)
    else:
        im = _open_pil(path)
        with _pil_errors(path), im:  # n_frames may read further into the file
            info = ImageInfo("pil", im.width, im.height, getattr(im, "n_frames", 1))
    _check_size(path, info.width, info.height, DEFAULT_MAX_PIXELS)
    return info
