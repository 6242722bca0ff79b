"""Dataset registry: the `mosaic` demo, COCO-Stuff-27, Cityscapes, Potsdam and user folders, with their transforms.

Every dataset is a :class:`SegDataset` (a torch ``Dataset``) whose items are
``{"img": float32 [3,res,res] ImageNet-normalised, "label": int64 [res,res] (-1 = ignore), "index": int}``.
``load_dataset(name, split, res=..., crop=..., root=..., **options)`` builds one from ``DATASETS``.

Transforms (spec 1.4): the shorter side is resized to ``res`` with torchvision's arithmetic
(long side = floor(res * long / short)), then centre-cropped at offset round((L - res) / 2); ``crop="none"``
resizes straight to res x res. Labels always use nearest-neighbour. Images use nearest-neighbour too under
``protocol="original"`` (quirk 10.3) and PIL's antialiased bilinear under ``protocol="corrected"``.
``crop="five"`` reads the five-crop tree that :func:`stego_core.fivecrop.prepare_five_crops` writes (spec 6.4).

Data roots: the ``root`` argument, else ``$STEGO_DATA``, else ``<repo>/data``. A missing tree raises a
StegoError that shows the expected layout (``EXPECTED_TREES``).

The ``mosaic`` demo needs no files: each scene is generated from the CC0 images bundled in scikit-image
(a wavy Voronoi layout of 2-5 cells of one or two "stuff" textures, with at most one "thing" blob pasted on top;
every region is filled with a random crop of its class's histogram-equalised luminance and gets a random two-colour
tint, so neither colour nor brightness carries the class). Scenes are deterministic per (seed, split, index).
Ten classes (seven stuff, three things) and few classes per scene make the demo's kNN images mostly share classes
(STEGO's positive pairs rely on it): the share of same-class point pairs is about .70 for kNN partners against
about .13 for random partners (chapter 01), where six classes with 2-4 per scene gave only .33 against .21.
"""
from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import skimage.data
import torch
from PIL import Image
from scipy.io import loadmat
from skimage import color, exposure, transform

from .config import PROTOCOLS, StegoError, check_choice, check_int, repo_root

__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "IMAGE_EXTENSIONS", "normalize", "normalize_uint8", "unnormalize", "DATASETS",
    "SPLITS", "CROPS",
    "EXPECTED_TREES", "SegDataset", "MosaicDataset", "CocoStuff27", "Cityscapes", "Potsdam", "DirectoryDataset",
    "load_dataset", "data_root", "resized_size", "center_crop_offset", "transform_pair", "five_crop_dir",
    "MOSAIC_SOURCES", "COCOSTUFF27_CLASSES", "CITYSCAPES_CLASSES", "POTSDAM_CLASSES", "coco_fine_to_coarse",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CROPS = ("center", "none", "five")


# ----------------------------------------------------------------------------------------------------------------
# Normalisation and the resize / crop arithmetic


def normalize(img01: torch.Tensor) -> torch.Tensor:
    """ImageNet-normalise images in [0, 1] laid out [..., 3, H, W]."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=img01.dtype, device=img01.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=img01.dtype, device=img01.device).view(3, 1, 1)
    return (img01 - mean) / std


def normalize_uint8(images: Any) -> torch.Tensor:
    """ImageNet-normalise uint8 images ``[..., H, W, 3]`` (array or tensor) into float32 ``[..., 3, H, W]``."""
    u8 = torch.as_tensor(np.asarray(images, dtype=np.uint8))
    if u8.ndim < 3 or u8.shape[-1] != 3:
        raise StegoError(f"images: expected uint8 images [..., H, W, 3], got shape {tuple(u8.shape)}")
    return normalize(u8.movedim(-1, -3).float() / 255.0)  # [..., H, W, 3] -> [..., 3, H, W]


def unnormalize(img: torch.Tensor, *, clamp: bool = True) -> torch.Tensor:
    """Undo :func:`normalize`: [..., 3, H, W] back to [0, 1] (clamped unless ``clamp=False``)."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=img.dtype, device=img.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=img.dtype, device=img.device).view(3, 1, 1)
    out = img * std + mean
    return out.clamp(0.0, 1.0) if clamp else out


def resized_size(height: int, width: int, res: int) -> tuple[int, int]:
    """(H', W') after resizing the shorter side to ``res`` the way torchvision does (long side floored)."""
    if height <= width:
        return res, int(res * width / height)
    return int(res * height / width), res


def center_crop_offset(length: int, res: int) -> int:
    """Offset of a centre crop of size ``res`` along an axis of ``length`` (torchvision: round half to even)."""
    return int(round((length - res) / 2.0))


def _resize(arr: np.ndarray, size_hw: tuple[int, int], resample: int) -> np.ndarray:
    """Resize an HxW int label or HxWx3 uint8 image with PIL (the library torchvision delegates to)."""
    height, width = size_hw
    if arr.shape[:2] == (height, width):
        return arr
    if arr.ndim == 2:  # labels: 32-bit integer image, nearest only
        out = Image.fromarray(arr.astype(np.int32)).resize((width, height), Image.NEAREST)
        return np.asarray(out).astype(np.int64)
    return np.asarray(Image.fromarray(arr).resize((width, height), resample))


def transform_pair(image: np.ndarray, label: np.ndarray, res: int, *, crop: str = "center",
                   protocol: str = "original") -> tuple[np.ndarray, np.ndarray]:
    """Resize and crop an RGB uint8 [H,W,3] image and its int label [H,W] to res x res (spec 1.4)."""
    height, width = label.shape
    resample = Image.NEAREST if protocol == "original" else Image.BILINEAR
    if crop == "none":
        return _resize(image, (res, res), resample), _resize(label, (res, res), Image.NEAREST)
    new_h, new_w = resized_size(height, width, res)
    image = _resize(image, (new_h, new_w), resample)
    label = _resize(label, (new_h, new_w), Image.NEAREST)
    top, left = center_crop_offset(new_h, res), center_crop_offset(new_w, res)
    return image[top:top + res, left:left + res], label[top:top + res, left:left + res]


def _to_item(image: np.ndarray, label: np.ndarray, index: int) -> dict[str, Any]:
    # torchvision's ToTensor then Normalize, operation for operation in float32 (x / 255, then (x - mean) / std):
    # the CRF's un-normalise -> x255 -> truncate round trip (quirk 9) then yields the reference's bytes exactly.
    # (Folding it into (x - 255 mean) / (255 std) changes the last bit of many pixels and so ~29 % of those bytes.)
    img01 = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float().div(255)  # [H,W,3] -> [3,H,W]
    return {"img": normalize(img01), "label": torch.from_numpy(np.array(label, dtype=np.int64)), "index": int(index)}


def _pascal_palette(n: int) -> np.ndarray:
    """The usual bit-interleaved segmentation colour map: n distinct uint8 RGB colours (entry 0 is not black)."""
    out = np.zeros((n, 3), dtype=np.uint8)
    for k in range(n):
        code, rgb = k + 1, [0, 0, 0]
        for shift in range(7, -1, -1):
            for ch in range(3):
                rgb[ch] |= ((code >> ch) & 1) << shift
            code >>= 3
        out[k] = rgb
    return out


# ----------------------------------------------------------------------------------------------------------------
# Base class


class SegDataset(torch.utils.data.Dataset):
    """A segmentation dataset: ``raw(i)`` gives the full-resolution pair, ``sample(i)`` the transformed one.

    Attributes: name, split, n_classes, class_names, palette (uint8 [K,3]), res, crop, protocol, has_labels.
    Subclasses implement ``__len__`` and ``raw(i) -> (rgb uint8 [H,W,3], label int64 [H,W] with -1 = ignore)``.
    """

    name = "base"
    has_labels = True

    def __init__(self, split: str, *, res: int, crop: str, protocol: str, n_classes: int,
                 class_names: list[str], palette: np.ndarray):
        self.split = split
        self.res = res
        self.crop = crop
        self.protocol = protocol
        self.n_classes = n_classes
        self.class_names = list(class_names)
        self.palette = np.asarray(palette, dtype=np.uint8)

    def __len__(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def raw(self, index: int) -> tuple[np.ndarray, np.ndarray]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _check_index(self, index: int) -> int:
        n = len(self)
        index = int(index)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for {self.name}/{self.split} with {n} items")
        return index

    def sample(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The transformed pair: RGB uint8 [res,res,3] and int64 label [res,res]."""
        image, label = self.raw(self._check_index(index))
        return transform_pair(image, label, self.res, crop="none" if self.crop == "none" else "center",
                              protocol=self.protocol)

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = self._check_index(index)
        image, label = self.sample(index)
        return _to_item(image, label, index)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(split={self.split!r}, n={len(self)}, n_classes={self.n_classes}, "
                f"res={self.res}, crop={self.crop!r}, protocol={self.protocol!r})")


# ----------------------------------------------------------------------------------------------------------------
# The mosaic demo

# (class name, skimage.data loader, kind); the first n_classes entries are used. All ship inside the wheel.
MOSAIC_SOURCES = (
    ("brick", "brick", "stuff"),
    ("grass", "grass", "stuff"),
    ("gravel", "gravel", "stuff"),
    ("text", "text", "stuff"),
    ("cat", "chelsea", "thing"),
    ("coffee", "coffee", "thing"),
    ("moon", "moon", "stuff"),
    ("coins", "coins", "stuff"),
    ("stars", "hubble_deep_field", "stuff"),
    ("astronaut", "astronaut", "thing"),
)
_MOSAIC_SCALES = (0.5, 0.75, 1.0)


@functools.cache
def _mosaic_luminance(loader: str, scale: float) -> np.ndarray:
    """A bundled image as histogram-equalised float32 luminance in [0, 1], rescaled by ``scale``."""
    img = getattr(skimage.data, loader)()
    gray = color.rgb2gray(img[..., :3]) if img.ndim == 3 else img.astype(np.float64) / 255.0
    if scale != 1.0:
        gray = transform.rescale(gray, scale, anti_aliasing=True, order=1)
    return exposure.equalize_hist(gray, nbins=256).astype(np.float32)


@functools.cache
def _mosaic_texture(loader: str, scale: float, min_size: int) -> np.ndarray:
    """The luminance mirror-tiled so that every side is at least ``min_size`` (crop windows always fit)."""
    lum = _mosaic_luminance(loader, scale)
    pad_h, pad_w = max(0, min_size - lum.shape[0]), max(0, min_size - lum.shape[1])
    while pad_h or pad_w:  # symmetric padding can at most double a side per call
        ph, pw = min(pad_h, lum.shape[0]), min(pad_w, lum.shape[1])
        lum = np.pad(lum, ((0, ph), (0, pw)), mode="symmetric")
        pad_h, pad_w = pad_h - ph, pad_w - pw
    lum.setflags(write=False)
    return lum


@functools.lru_cache(maxsize=4)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    yy.setflags(write=False)
    xx.setflags(write=False)
    return yy, xx


def _mosaic_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), SPLITS["mosaic"].index(split), int(index)])


def mosaic_scene(seed: int, split: str, index: int, *, n_classes: int = 10,
                 scene_size: int = 320) -> tuple[np.ndarray, np.ndarray]:
    """One demo scene: (RGB uint8 [S,S,3], int64 label [S,S] with classes 0..n_classes-1, no ignore)."""
    rng = _mosaic_rng(seed, split, index)
    size = scene_size
    sources = MOSAIC_SOURCES[:n_classes]
    stuff = [k for k, s in enumerate(sources) if s[2] == "stuff"]
    things = [k for k, s in enumerate(sources) if s[2] == "thing"]
    yy, xx = _grid(size)  # [S,S] row and column coordinates

    # stuff layout: a Voronoi diagram on wavy coordinates, 2-5 cells of 1-2 stuff classes
    n_used = int(rng.integers(1, min(2, len(stuff)) + 1))
    used = rng.choice(stuff, size=n_used, replace=False)
    n_cells = int(rng.integers(max(2, n_used), 6))
    cell_class = np.concatenate([used, rng.choice(used, size=n_cells - n_used)])
    pts = rng.uniform(0, size, size=(n_cells, 2)).astype(np.float32)  # (y, x)
    amp, wavelength, phase = rng.uniform(0.02, 0.06) * size, rng.uniform(0.3, 0.7) * size, rng.uniform(0, 2 * np.pi, 2)
    wy = yy + amp * np.sin(2 * np.pi * xx / wavelength + phase[0])
    wx = xx + amp * np.sin(2 * np.pi * yy / wavelength + phase[1])
    region = np.zeros((size, size), dtype=np.uint8)  # [S,S] region id = nearest seed point
    best = (wy - pts[0, 0]) ** 2 + (wx - pts[0, 1]) ** 2
    for c in range(1, n_cells):
        dist = (wy - pts[c, 0]) ** 2 + (wx - pts[c, 1]) ** 2
        closer = dist < best
        region[closer] = c
        np.minimum(best, dist, out=best)
    region_class = list(cell_class)

    # things: 0-1 wobbly elliptical blob pasted on top
    n_things = int(rng.integers(0, 2)) if things else 0
    for _ in range(n_things):
        cy, cx = rng.uniform(0.15, 0.85, size=2) * size
        ay, ax = rng.uniform(0.1, 0.25, size=2) * size
        theta, wob_phase = rng.uniform(0, np.pi), rng.uniform(0, 2 * np.pi)
        wob_freq, wob_amp = int(rng.integers(2, 6)), rng.uniform(0.05, 0.2)
        reach = max(ax, ay) * (1.0 + wob_amp)  # the blob lies inside this box around its centre
        y0, y1 = max(0, int(cy - reach)), min(size, int(cy + reach) + 2)
        x0, x1 = max(0, int(cx - reach)), min(size, int(cx + reach) + 2)
        dy, dx = yy[y0:y1, x0:x1] - cy, xx[y0:y1, x0:x1] - cx
        u = (dx * np.cos(theta) + dy * np.sin(theta)) / ax
        v = (-dx * np.sin(theta) + dy * np.cos(theta)) / ay
        radius = 1.0 + wob_amp * np.sin(wob_freq * np.arctan2(v, u) + wob_phase)
        mask = u * u + v * v <= radius * radius
        thing = int(rng.choice(things))
        if mask.any():
            region[y0:y1, x0:x1][mask] = len(region_class)
            region_class.append(thing)

    # fill each region with a random window of its texture, then a random two-colour tint per region
    n_regions = len(region_class)
    windows = []
    dark = rng.uniform(0.0, 0.4, size=(n_regions, 3)).astype(np.float32)
    bright = rng.uniform(0.6, 1.0, size=(n_regions, 3)).astype(np.float32)
    for k in region_class:
        scale = float(_MOSAIC_SCALES[int(rng.integers(len(_MOSAIC_SCALES)))])
        tex = _mosaic_texture(sources[k][1], scale, size)
        oy = int(rng.integers(0, tex.shape[0] - size + 1))
        ox = int(rng.integers(0, tex.shape[1] - size + 1))
        window = tex[oy:oy + size, ox:ox + size]
        windows.append(window[:, ::-1] if rng.random() < 0.5 else window)
    lum = np.choose(region, windows)  # [S,S]: each pixel from its region's window
    rgb = dark[region] + lum[..., None] * (bright[region] - dark[region])  # [S,S,3]
    image = (rgb * 255.0 + 0.5).astype(np.uint8)
    label = np.asarray(region_class, dtype=np.int64)[region]
    return image, label


class MosaicDataset(SegDataset):
    """The offline demo: textured scenes generated from scikit-image's bundled CC0 images (see module doc)."""

    name = "mosaic"
    version = 2  # bumped whenever the scene generator changes (part of the feature store's key); 2: ten classes,
    # 1-2 stuff classes in 2-5 cells and 0-1 thing per scene, 480 training scenes

    def __init__(self, split: str, *, res: int = 224, crop: str = "center", protocol: str = "original",
                 n_images: int | None = None, seed: int = 0, n_classes: int = 10, scene_size: int = 320):
        if crop == "five":
            raise StegoError("crop: 'five' is not available for mosaic; expected 'center' or 'none'")
        check_int("n_classes", n_classes, minimum=2)
        if n_classes > len(MOSAIC_SOURCES):
            raise StegoError(f"n_classes: mosaic has {len(MOSAIC_SOURCES)} texture sources, got {n_classes}")
        self.n_images = check_int("n_images", {"train": 480, "val": 60}[split] if n_images is None else n_images,
                                  minimum=1)
        self.seed = check_int("seed", seed, minimum=0)
        self.scene_size = check_int("scene_size", scene_size, minimum=32)
        sources = MOSAIC_SOURCES[:n_classes]
        super().__init__(split, res=res, crop=crop, protocol=protocol, n_classes=n_classes,
                         class_names=[s[0] for s in sources], palette=_pascal_palette(n_classes))
        self.kinds = [s[2] for s in sources]

    def __len__(self) -> int:
        return self.n_images

    def raw(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        index = self._check_index(index)
        return mosaic_scene(self.seed, self.split, index, n_classes=self.n_classes, scene_size=self.scene_size)


# ----------------------------------------------------------------------------------------------------------------
# Roots, expected trees and file helpers

EXPECTED_TREES = {
    "cocostuff27": (
        "<root>/cocostuff/images/{train2017,val2017}/<ID>.jpg\n"
        "<root>/cocostuff/annotations/{train2017,val2017}/<ID>.png   (fine ids 0-181, 255 = unlabelled)\n"
        "<root>/cocostuff/curated/train2017/Coco164kFull_Stuff_Coarse.txt\n"
        "<root>/cocostuff/curated/val2017/Coco164kFull_Stuff_Coarse_7.txt\n"
        "source: COCO-Stuff 164k (cocodataset.org, github.com/nightrome/cocostuff); image lists from IIC/PiCIE"),
    "cityscapes": (
        "<root>/cityscapes/leftImg8bit/{train,val}/<city>/<name>_leftImg8bit.png\n"
        "<root>/cityscapes/gtFine/{train,val}/<city>/<name>_gtFine_labelIds.png\n"
        "source: cityscapes-dataset.com (leftImg8bit_trainvaltest.zip, gtFine_trainvaltest.zip)"),
    "potsdam": (
        "<root>/potsdam/imgs/<ID>.mat   (key 'img', HxWx>=3)\n"
        "<root>/potsdam/gt/<ID>.mat     (key 'gt', 6 classes, 255 = unlabelled; may be missing)\n"
        "<root>/potsdam/labelled_train.txt, labelled_test.txt (IDs)\n"
        "source: ISPRS Potsdam as preprocessed by IIC (github.com/xu-ji/IIC)"),
    "directory": (
        "<root>/imgs/{train,val}/<name>.{jpg,png,...}\n"
        "<root>/labels/{train,val}/<name>.png   (optional; same stems; values 0..n_classes-1, 255 = ignore)\n"
        "source: your own images"),
    "five": (
        "<root>/cropped/<dataset>_five_crop_<ratio>/img/<split>/<n>.jpg (.png for protocol 'corrected')\n"
        "<root>/cropped/<dataset>_five_crop_<ratio>/label/<split>/<n>.png (label + 1)\n"
        "source: stego_core.fivecrop.prepare_five_crops(dataset, split, root=...)"),
}

#: The image files a folder dataset and ``segment`` read.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def data_root(root: str | os.PathLike | None = None) -> Path:
    """Where datasets live: ``root``, else ``$STEGO_DATA``, else ``<repo>/data``."""
    if root is not None:
        return Path(root)
    env = os.environ.get("STEGO_DATA")
    return Path(env) if env else repo_root() / "data"


def _missing(name: str, what: Path, root: Path) -> StegoError:
    return StegoError(f"root: no {name} data under {root} (missing {what}); expected:\n{EXPECTED_TREES[name]}")


def _require(path: Path, name: str, root: Path) -> Path:
    if not path.exists():
        raise _missing(name, path, root)
    return path


def _read_rgb(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except FileNotFoundError:
        raise StegoError(f"image: file {path} is missing") from None
    except OSError as exc:
        raise StegoError(f"image: cannot read {path} ({exc})") from None


def _read_label_png(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as im:
            arr = np.asarray(im)
    except FileNotFoundError:
        raise StegoError(f"label: file {path} is missing") from None
    except OSError as exc:
        raise StegoError(f"label: cannot read {path} ({exc})") from None
    if arr.ndim != 2:
        raise StegoError(f"label: {path} has shape {arr.shape}; expected a single-channel label image")
    return arr.astype(np.int64)


def _apply_lut(values: np.ndarray, lut: np.ndarray, path: Path, valid: str) -> np.ndarray:
    """Map raw label values through ``lut`` (-2 marks values that are not allowed) or name the file."""
    bad = (values < 0) | (values >= len(lut))
    if not bad.any():
        out = lut[values]
        bad = out == -2
        if not bad.any():
            return out
    found = np.unique(values[bad])[:5].tolist()
    raise StegoError(f"label: {path} holds value(s) {found}; expected {valid}")


def _check_pair(image: np.ndarray, label: np.ndarray, img_path: Path, lbl_path: Path) -> None:
    if image.shape[:2] != label.shape:
        raise StegoError(f"label: {lbl_path} is {label.shape[1]}x{label.shape[0]} but its image {img_path} is "
                         f"{image.shape[1]}x{image.shape[0]}; expected equal sizes")


def _listdir(folder: Path) -> set[str]:
    with os.scandir(folder) as it:
        return {e.name for e in it}


def five_crop_dir(dataset: str, *, root: str | os.PathLike | None = None, crop_ratio: float = 0.5,
                  protocol: str = "original") -> Path:
    """``<root>/cropped/<dataset>_five_crop_<ratio>`` (``_corrected`` appended for the corrected protocol)."""
    suffix = "" if protocol == "original" else f"_{protocol}"
    return data_root(root) / "cropped" / f"{dataset}_five_crop_{crop_ratio:g}{suffix}"


class _FiveCropView:
    """Reads a five-crop tree: crop n is img/<split>/<n>.jpg|png with label/<split>/<n>.png storing label + 1."""

    def __init__(self, name: str, split: str, root: Path, protocol: str, crop_ratio: float, n_classes: int):
        self.folder = five_crop_dir(name, root=root, crop_ratio=crop_ratio, protocol=protocol)
        self.ext = ".jpg" if protocol == "original" else ".png"
        self.img_dir, self.lbl_dir = self.folder / "img" / split, self.folder / "label" / split
        self.n_classes = n_classes
        if not self.img_dir.is_dir() or not self.lbl_dir.is_dir():
            raise StegoError(f"root: no five-crop tree for {name}/{split} at {self.folder}; expected:\n"
                             f"{EXPECTED_TREES['five']}")
        marker = self.folder / f"done-{split}.json"
        if marker.exists():
            self.n = int(json.loads(marker.read_text())["n_crops"])
        else:  # a tree made elsewhere: count the images and insist they are numbered 0..n-1
            stems = sorted(int(p[: -len(self.ext)]) for p in _listdir(self.img_dir)
                           if p.endswith(self.ext) and p[: -len(self.ext)].isdigit())
            self.n = len(stems)
            if stems != list(range(self.n)):
                first_gap = next(i for i, s in enumerate(stems) if s != i)
                raise StegoError(f"root: five-crop image {self.img_dir / f'{first_gap}{self.ext}'} is missing; "
                                 f"expected crops numbered 0..{self.n - 1}")
        labels = _listdir(self.lbl_dir)
        for i in range(self.n):
            if f"{i}.png" not in labels:
                raise StegoError(f"label: {self.lbl_dir / f'{i}.png'} is missing; expected one label per crop")

    def raw(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        img_path, lbl_path = self.img_dir / f"{index}{self.ext}", self.lbl_dir / f"{index}.png"
        image, stored = _read_rgb(img_path), _read_label_png(lbl_path)
        _check_pair(image, stored, img_path, lbl_path)
        lut = np.full(256, -2, dtype=np.int64)
        lut[: self.n_classes + 1] = np.arange(-1, self.n_classes)
        return image, _apply_lut(stored, lut, lbl_path, f"stored label+1 in 0..{self.n_classes}")


class _FileDataset(SegDataset):
    """Shared plumbing of the on-disk datasets: uncropped items via ``_raw_full``, or a five-crop tree."""

    def _init_five(self, root: Path, crop_ratio: float) -> None:
        self._five = _FiveCropView(self.name, self.split, root, self.protocol, crop_ratio, self.n_classes) \
            if self.crop == "five" else None

    def __len__(self) -> int:
        return self._five.n if self._five is not None else self._n_full()

    def raw(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        index = self._check_index(index)
        return self._five.raw(index) if self._five is not None else self._raw_full(index)

    def _n_full(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def _raw_full(self, index: int) -> tuple[np.ndarray, np.ndarray]:  # pragma: no cover - abstract
        raise NotImplementedError


# ----------------------------------------------------------------------------------------------------------------
# COCO-Stuff-27

COCOSTUFF27_CLASSES = [
    "electronic", "appliance", "food", "furniture", "indoor", "kitchen", "accessory", "animal", "outdoor", "person",
    "sports", "vehicle", "ceiling", "floor", "food", "furniture", "rawmaterial", "textile", "wall", "window",
    "building", "ground", "plant", "sky", "solid", "structural", "water"]

# coarse id -> fine ids (spec 6.1); fine ids not listed map to 0
_COCO_COARSE = {
    0: range(71, 77), 1: range(77, 83), 2: range(51, 61), 3: range(61, 71), 4: range(83, 91), 5: range(43, 51),
    6: range(25, 33), 7: range(15, 25), 8: range(9, 15), 9: [0], 10: range(33, 43), 11: range(1, 9),
    12: [101, 102], 13: [100, 113, 114, 115, 116, 117], 14: [120, 121, 152, 169],
    15: [97, 106, 107, 109, 111, 122, 129, 132, 155, 160, 164], 16: [99, 131, 138, 142],
    17: [91, 92, 103, 104, 108, 130, 136, 140, 151, 166, 167], 18: range(170, 177), 19: [179, 180],
    20: [94, 95, 127, 150, 157, 165], 21: [110, 124, 125, 135, 139, 143, 144, 146, 148, 153, 158],
    22: [93, 96, 118, 123, 128, 133, 141, 162, 168], 23: [105, 156], 24: [126, 134, 149, 159, 161, 181],
    25: [98, 112, 137, 145, 163], 26: [119, 147, 154, 177, 178],
}


def coco_fine_to_coarse() -> np.ndarray:
    """Lookup table over 0..255: fine COCO-Stuff id -> coarse id (27 classes), 255 -> -1, 182..254 -> -2 (invalid)."""
    lut = np.full(256, -2, dtype=np.int64)
    lut[:182] = 0
    for coarse, fines in _COCO_COARSE.items():
        lut[list(fines)] = coarse
    lut[255] = -1
    return lut


class CocoStuff27(_FileDataset):
    """COCO-Stuff 164k with the 27 coarse classes and the curated IIC/PiCIE image lists (spec 6.1)."""

    name = "cocostuff27"
    _LISTS = {"train": ("train2017", "Coco164kFull_Stuff_Coarse.txt"),
              "val": ("val2017", "Coco164kFull_Stuff_Coarse_7.txt")}

    def __init__(self, split: str, *, res: int = 224, crop: str = "center", protocol: str = "original",
                 root: str | os.PathLike | None = None, crop_ratio: float = 0.5):
        super().__init__(split, res=res, crop=crop, protocol=protocol, n_classes=27,
                         class_names=COCOSTUFF27_CLASSES, palette=_pascal_palette(27))
        self.root = data_root(root)
        self._lut = coco_fine_to_coarse()
        if crop == "five":
            self._init_five(self.root, crop_ratio)
            return
        self._five = None
        base = self.root / "cocostuff"
        folder, list_name = self._LISTS[split]
        list_path = self.list_path = _require(base / "curated" / folder / list_name, self.name, self.root)
        self.img_dir = _require(base / "images" / folder, self.name, self.root)
        self.lbl_dir = _require(base / "annotations" / folder, self.name, self.root)
        self.ids = [line.strip() for line in list_path.read_text().splitlines() if line.strip()]
        images, labels = _listdir(self.img_dir), _listdir(self.lbl_dir)
        for image_id in self.ids:
            if f"{image_id}.jpg" not in images:
                raise StegoError(f"root: image {self.img_dir / (image_id + '.jpg')} listed in {list_path} is missing")
            if f"{image_id}.png" not in labels:
                raise StegoError(f"root: label {self.lbl_dir / (image_id + '.png')} for image "
                                 f"{self.img_dir / (image_id + '.jpg')} is missing")

    def _n_full(self) -> int:
        return len(self.ids)

    def _raw_full(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        img_path = self.img_dir / f"{self.ids[index]}.jpg"
        lbl_path = self.lbl_dir / f"{self.ids[index]}.png"
        image, fine = _read_rgb(img_path), _read_label_png(lbl_path)
        _check_pair(image, fine, img_path, lbl_path)
        return image, _apply_lut(fine, self._lut, lbl_path, "fine ids 0..181 or 255")


# ----------------------------------------------------------------------------------------------------------------
# Cityscapes

CITYSCAPES_CLASSES = [
    "road", "sidewalk", "parking", "rail track", "building", "wall", "fence", "guard rail", "bridge", "tunnel",
    "pole", "polegroup", "traffic light", "traffic sign", "vegetation", "terrain", "sky", "person", "rider", "car",
    "truck", "bus", "caravan", "trailer", "train", "motorcycle", "bicycle"]
_CITYSCAPES_PALETTE = [
    (128, 64, 128), (244, 35, 232), (250, 170, 160), (230, 150, 140), (70, 70, 70), (102, 102, 156),
    (190, 153, 153), (180, 165, 180), (150, 100, 100), (150, 120, 90), (153, 153, 153), (153, 153, 153),
    (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60), (255, 0, 0),
    (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 0, 90), (0, 0, 110), (0, 80, 100), (0, 0, 230), (119, 11, 32)]


class Cityscapes(_FileDataset):
    """Cityscapes fine annotations, label = labelId - 7 with negatives ignored: 27 classes (spec 6.2)."""

    name = "cityscapes"
    _IMG_SUFFIX, _LBL_SUFFIX = "_leftImg8bit.png", "_gtFine_labelIds.png"

    def __init__(self, split: str, *, res: int = 224, crop: str = "center", protocol: str = "original",
                 root: str | os.PathLike | None = None, crop_ratio: float = 0.5):
        super().__init__(split, res=res, crop=crop, protocol=protocol, n_classes=27,
                         class_names=CITYSCAPES_CLASSES, palette=np.array(_CITYSCAPES_PALETTE))
        self.root = data_root(root)
        self._lut = np.full(256, -2, dtype=np.int64)
        self._lut[:34] = np.maximum(np.arange(34) - 7, -1)
        if crop == "five":
            self._init_five(self.root, crop_ratio)
            return
        self._five = None
        base = self.root / "cityscapes"
        img_root = _require(base / "leftImg8bit" / split, self.name, self.root)
        lbl_root = _require(base / "gtFine" / split, self.name, self.root)
        self.pairs: list[tuple[Path, Path]] = []
        for city in sorted(p.name for p in img_root.iterdir() if p.is_dir()):
            labels = _listdir(lbl_root / city) if (lbl_root / city).is_dir() else set()
            for fname in sorted(_listdir(img_root / city)):
                if not fname.endswith(self._IMG_SUFFIX):
                    continue
                lbl_name = fname[: -len(self._IMG_SUFFIX)] + self._LBL_SUFFIX
                if lbl_name not in labels:
                    raise StegoError(f"root: label {lbl_root / city / lbl_name} for image {img_root / city / fname} "
                                     f"is missing")
                self.pairs.append((img_root / city / fname, lbl_root / city / lbl_name))
        if not self.pairs:
            raise _missing(self.name, img_root / "<city>" / f"*{self._IMG_SUFFIX}", self.root)

    def _n_full(self) -> int:
        return len(self.pairs)

    def _raw_full(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        img_path, lbl_path = self.pairs[index]
        image, ids = _read_rgb(img_path), _read_label_png(lbl_path)
        _check_pair(image, ids, img_path, lbl_path)
        return image, _apply_lut(ids, self._lut, lbl_path, "label ids 0..33")


# ----------------------------------------------------------------------------------------------------------------
# Potsdam

POTSDAM_CLASSES = ["roads and cars", "buildings and clutter", "trees and vegetation"]
_POTSDAM_PALETTE = [(160, 160, 160), (70, 90, 220), (40, 160, 60)]


def _loadmat(path: Path, key: str) -> np.ndarray:
    try:
        content = loadmat(str(path))
    except FileNotFoundError:
        raise StegoError(f"image: file {path} is missing") from None
    except Exception as exc:  # scipy raises several kinds for damaged files
        raise StegoError(f"image: cannot read {path} as a .mat file ({exc})") from None
    if key not in content:
        raise StegoError(f"image: {path} has no key {key!r}; expected keys 'img' (images) or 'gt' (labels)")
    return np.asarray(content[key])


class Potsdam(_FileDataset):
    """IIC's preprocessed ISPRS Potsdam, 3 coarse classes; the IR channel is dropped (spec 6.3, quirk 11)."""

    name = "potsdam"
    _LISTS = {"train": "labelled_train.txt", "val": "labelled_test.txt", "unlabelled_train": "unlabelled_train.txt",
              "train+val": "all.txt", "all": "all.txt"}

    def __init__(self, split: str, *, res: int = 224, crop: str = "center", protocol: str = "original",
                 root: str | os.PathLike | None = None, crop_ratio: float = 0.5):
        super().__init__(split, res=res, crop=crop, protocol=protocol, n_classes=3,
                         class_names=POTSDAM_CLASSES, palette=np.array(_POTSDAM_PALETTE))
        self.root = data_root(root)
        # fine -> coarse: {0,4}->0, {1,5}->1, {2,3}->2, 255->-1, anything else -> 0 (quirk 11)
        self._lut = np.zeros(256, dtype=np.int64)
        self._lut[[1, 5]], self._lut[[2, 3]], self._lut[255] = 1, 2, -1
        if crop == "five":
            self._init_five(self.root, crop_ratio)
            return
        self._five = None
        base = self.root / "potsdam"
        if split == "train+val":
            lists = [base / "labelled_train.txt", base / "labelled_test.txt"]
        else:
            lists = [base / self._LISTS[split]]
        self.lists = lists  # the list files read, in order
        self.ids = []
        for list_path in lists:
            _require(list_path, self.name, self.root)
            self.ids += [line.strip() for line in list_path.read_text().splitlines() if line.strip()]
        self.img_dir = _require(base / "imgs", self.name, self.root)
        self.gt_dir = base / "gt"
        images = _listdir(self.img_dir)
        for image_id in self.ids:
            if f"{image_id}.mat" not in images:
                raise StegoError(f"root: image {self.img_dir / (image_id + '.mat')} listed for split {split!r} "
                                 f"is missing")

    def _n_full(self) -> int:
        return len(self.ids)

    def _raw_full(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        img_path = self.img_dir / f"{self.ids[index]}.mat"
        gt_path = self.gt_dir / f"{self.ids[index]}.mat"
        img = _loadmat(img_path, "img")
        if img.ndim != 3 or img.shape[2] < 3:
            raise StegoError(f"image: {img_path} holds shape {img.shape}; expected HxWx(>=3)")
        img = img[..., :3]
        if img.dtype != np.uint8:  # float in [0, 1]: x255 then truncation, as torchvision's to_pil_image does
            img = np.asarray(img, dtype=np.float64)
            scaled = img * 255.0 if img.max() <= 1.0 else img
            img = np.clip(scaled, 0, 255).astype(np.uint8)
        if gt_path.exists():
            gt = _loadmat(gt_path, "gt")
            if gt.ndim == 3 and gt.shape[2] == 1:
                gt = gt[..., 0]
            gt = np.asarray(gt)
            if gt.dtype.kind == "f":
                if not np.all(np.isfinite(gt)) or np.any(gt != np.round(gt)):
                    raise StegoError(f"label: {gt_path} holds non-integer values; expected 0..5 or 255")
            gt = gt.astype(np.int64)
        else:  # missing gt: constant 255 -> all ignored
            gt = np.full(img.shape[:2], 255, dtype=np.int64)
        _check_pair(img, gt, img_path, gt_path)
        return np.ascontiguousarray(img), _apply_lut(gt, self._lut, gt_path, "values 0..255")


# ----------------------------------------------------------------------------------------------------------------
# User folders


class DirectoryDataset(SegDataset):
    """``<root>/imgs/<split>/*`` with optional ``<root>/labels/<split>/*.png`` paired by stem (spec 6.6)."""

    name = "directory"

    def __init__(self, split: str, *, res: int = 224, crop: str = "center", protocol: str = "original",
                 root: str | os.PathLike | None = None, n_classes: int | None = None,
                 class_names: list[str] | None = None):
        if crop == "five":
            raise StegoError("crop: 'five' is not available for directory; expected 'center' or 'none'")
        if n_classes is None:
            raise StegoError("n_classes: the directory dataset needs n_classes (the number of label classes)")
        check_int("n_classes", n_classes, minimum=1)
        if n_classes > 255:
            raise StegoError(f"n_classes: expected at most 255 classes, got {n_classes}")
        if class_names is None:
            class_names = [f"class {k}" for k in range(n_classes)]
        elif len(class_names) != n_classes:
            raise StegoError(f"class_names: got {len(class_names)} names; expected n_classes={n_classes}")
        super().__init__(split, res=res, crop=crop, protocol=protocol, n_classes=n_classes,
                         class_names=class_names, palette=_pascal_palette(n_classes))
        self.root = data_root(root)
        img_dir = _require(self.root / "imgs" / split, self.name, self.root)
        self.images = sorted(img_dir / f for f in _listdir(img_dir) if f.lower().endswith(IMAGE_EXTENSIONS))
        if not self.images:
            raise _missing(self.name, img_dir / "<name>.jpg", self.root)
        lbl_dir = self.root / "labels" / split
        self.has_labels = lbl_dir.is_dir()
        self.labels: list[Path] | None = None
        if self.has_labels:
            labels = sorted(lbl_dir / f for f in _listdir(lbl_dir) if f.lower().endswith(".png"))
            by_stem = {p.stem: p for p in labels}
            for image in self.images:
                if image.stem not in by_stem:
                    raise StegoError(f"label: no {lbl_dir / (image.stem + '.png')} for image {image}; "
                                     f"expected one label per image with the same stem")
            stems = {p.stem for p in self.images}
            for label in labels:
                if label.stem not in stems:
                    raise StegoError(f"label: {label} has no image {img_dir / label.stem}.*; "
                                     f"expected one image per label with the same stem")
            self.labels = [by_stem[p.stem] for p in self.images]
        self._lut = np.full(256, -2, dtype=np.int64)
        self._lut[:n_classes] = np.arange(n_classes)
        self._lut[255] = -1

    def __len__(self) -> int:
        return len(self.images)

    def raw(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        index = self._check_index(index)
        image = _read_rgb(self.images[index])
        if self.labels is None:
            return image, np.full(image.shape[:2], -1, dtype=np.int64)
        lbl_path = self.labels[index]
        values = _read_label_png(lbl_path)
        _check_pair(image, values, self.images[index], lbl_path)
        return image, _apply_lut(values, self._lut, lbl_path, f"0..{self.n_classes - 1} or 255 (ignore)")


# ----------------------------------------------------------------------------------------------------------------
# Registry

DATASETS = {
    "mosaic": MosaicDataset,
    "cocostuff27": CocoStuff27,
    "cityscapes": Cityscapes,
    "potsdam": Potsdam,
    "directory": DirectoryDataset,
}
SPLITS = {
    "mosaic": ("train", "val"),
    "cocostuff27": ("train", "val"),
    "cityscapes": ("train", "val"),
    "potsdam": ("train", "val", "unlabelled_train", "train+val", "all"),
    "directory": ("train", "val"),
}
_OPTIONS = {
    "mosaic": ("n_images", "seed", "n_classes", "scene_size", "protocol"),
    "cocostuff27": ("protocol", "crop_ratio"),
    "cityscapes": ("protocol", "crop_ratio"),
    "potsdam": ("protocol", "crop_ratio"),
    "directory": ("protocol", "n_classes", "class_names"),
}


def load_dataset(name: str, split: str, *, res: int = 224, crop: str = "center",
                 root: str | os.PathLike | None = None, **options: Any) -> SegDataset:
    """Build dataset ``name`` (one of ``DATASETS``) for ``split`` at ``res`` px with ``crop`` ("center", "none",
    "five" = the prepared five-crop tree). Options: ``protocol`` ("original"|"corrected") for all; mosaic:
    n_images, seed, n_classes, scene_size; file datasets: crop_ratio (five-crop tree); directory: n_classes
    (required), class_names. ``root`` defaults to ``$STEGO_DATA``, else ``<repo>/data``."""
    check_choice("name", name, DATASETS)
    check_choice("split", split, SPLITS[name])
    check_int("res", res, minimum=1)
    check_choice("crop", crop, CROPS)
    for key in options:
        if key not in _OPTIONS[name]:
            raise StegoError(f"{key}: not an option of dataset {name!r}; expected one of "
                             f"{', '.join(_OPTIONS[name])}")
    check_choice("protocol", options.get("protocol", "original"), PROTOCOLS)
    ratio = options.get("crop_ratio", 0.5)
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
        raise StegoError(f"crop_ratio: expected a number in (0, 1], got {ratio!r}")
    if name == "mosaic":
        return MosaicDataset(split, res=res, crop=crop, **options)
    return DATASETS[name](split, res=res, crop=crop, root=root, **options)
