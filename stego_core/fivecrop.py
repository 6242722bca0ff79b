"""Five-crop preparation (spec 6.4): cut every full-resolution image of a split into torchvision's five crops.

Crop ``j`` of source image ``i`` becomes ``<root>/cropped/<dataset>_five_crop_<ratio>/img/<split>/<5i+j>.jpg``
(JPEG quality 75 under ``protocol="original"``, quirk 10.3; lossless PNG in a ``..._corrected`` folder under
``protocol="corrected"``) and ``label/<split>/<5i+j>.png`` storing label + 1 (0 = ignore). Sources are read at
full resolution (no resize). Images reach us as uint8, so the original's float round trip (x255 + 0.5, truncated)
is the identity and is not repeated here.

The stage is keyed by its folder and resumable: a source image whose ten files all exist is skipped, every file is
written under a temporary name and renamed, and ``done-<split>.json`` is written last; when it is present and
matches, a second call returns at once. ``load_dataset(name, split, crop="five")`` reads the result.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from .config import PROTOCOLS, StegoError, atomic_write, check_choice, write_json_atomic
from .costs import REFERENCE
from .data import SPLITS, five_crop_dir, load_dataset
from .guards import artifact_lock, disk_full_guard, note

__all__ = ["five_crop_boxes", "prepare_five_crops", "FIVE_CROP_DATASETS"]

FIVE_CROP_DATASETS = ("cocostuff27", "cityscapes", "potsdam")


def five_crop_boxes(height: int, width: int, ratio: float = 0.5) -> list[tuple[int, int, int, int]]:
    """The five crops of an HxW image as (top, left, h, w): top-left, top-right, bottom-left, bottom-right,
    centre (torchvision order; crop size floor(ratio*H) x floor(ratio*W), centre offset rounded half to even)."""
    if not 0 < ratio <= 1:
        raise StegoError(f"crop_ratio: expected a number in (0, 1], got {ratio!r}")
    h, w = int(ratio * height), int(ratio * width)
    if h < 1 or w < 1:
        raise StegoError(f"crop_ratio: {ratio} of a {width}x{height} image leaves an empty crop")
    centre = (int(round((height - h) / 2.0)), int(round((width - w) / 2.0)))
    return [(0, 0, h, w), (0, width - w, h, w), (height - h, 0, h, w), (height - h, width - w, h, w),
            (centre[0], centre[1], h, w)]


def _save_atomic(array: np.ndarray, path: Path, **save_args: Any) -> None:
    with atomic_write(path) as fh:
        Image.fromarray(array).save(fh, format="JPEG" if path.suffix == ".jpg" else "PNG", **save_args)


def prepare_five_crops(dataset: str, split: str, *, root: str | os.PathLike | None = None, crop_ratio: float = 0.5,
                       protocol: str = "original", progress: bool = True) -> Path:
    """Write the five-crop tree of ``dataset``/``split`` under ``<root>/cropped`` and return its folder.

    ``root`` is the data root (``$STEGO_DATA`` when None). Resumable and idempotent (see the module doc).
    """
    check_choice("dataset", dataset, FIVE_CROP_DATASETS)
    check_choice("split", split, SPLITS[dataset])
    check_choice("protocol", protocol, PROTOCOLS)
    if isinstance(crop_ratio, bool) or not isinstance(crop_ratio, (int, float)) or not 0 < crop_ratio <= 1:
        raise StegoError(f"crop_ratio: expected a number in (0, 1], got {crop_ratio!r}")
    source = load_dataset(dataset, split, root=root, crop="center", protocol=protocol)
    folder = five_crop_dir(dataset, root=root, crop_ratio=crop_ratio, protocol=protocol)
    marker = folder / f"done-{split}.json"
    meta = {"dataset": dataset, "split": split, "crop_ratio": crop_ratio, "protocol": protocol,
            "n_source": len(source), "n_crops": 5 * len(source)}
    if marker.exists():
        if json.loads(marker.read_text()) == meta:
            return folder
    with artifact_lock(folder, f"the five-crop tree of {dataset}/{split}", name=f"crops-{split}"):
        if marker.exists() and json.loads(marker.read_text()) == meta:
            return folder  # another process finished it while we waited
        _write_crops(source, folder, split, meta, crop_ratio, protocol, progress)
    return folder


def _write_crops(source: Any, folder: Path, split: str, meta: dict, crop_ratio: float, protocol: str,
                 progress: bool) -> None:
    """Write the missing crops and then the ``done-<split>.json`` marker (the caller holds the lock)."""
    dataset, marker = meta["dataset"], folder / f"done-{split}.json"
    img_dir, lbl_dir = folder / "img" / split, folder / "label" / split
    for sub in (img_dir, lbl_dir):
        try:
            sub.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StegoError(f"root: cannot write the five-crop tree to {sub} ({exc.strerror or exc})") from None
    marker.unlink(missing_ok=True)
    ext = ".jpg" if protocol == "original" else ".png"
    save_args = {"quality": 75} if protocol == "original" else {}
    if source.n_classes + 1 > 255:  # pragma: no cover - all wired datasets have <= 27 classes
        raise StegoError(f"dataset: {source.n_classes} classes do not fit a uint8 label+1 PNG")
    existing_img, existing_lbl = set(os.listdir(img_dir)), set(os.listdir(lbl_dir))
    for stale in [n for n in existing_img | existing_lbl if n.startswith(".") and n.endswith(".tmp")]:
        for sub in (img_dir, lbl_dir):  # temporary files of a killed writer
            (sub / stale).unlink(missing_ok=True)
    done = sum(all(f"{5 * i + j}{ext}" in existing_img for j in range(5)) for i in range(len(source)))
    if 0 < done < len(source):
        note(f"resuming the five-crop tree of {dataset}/{split} at image {done + 1} of {len(source)} in {folder}")
    bits = REFERENCE["jpeg_bits_per_pixel"] + REFERENCE["label_png_bits_per_pixel"]  # the cost model's sizes
    need = len(source) * 5 / 4 * int(np.prod(source.raw(0)[1].shape)) * bits / 8  # crops hold 5/4 of the pixels
    with disk_full_guard(folder, need, f"the five-crop tree of {dataset}/{split}"):
        _crop_all(source, img_dir, lbl_dir, existing_img, existing_lbl, ext, save_args, crop_ratio, dataset, split,
                  progress)
        write_json_atomic(marker, meta)


def _crop_all(source: Any, img_dir: Path, lbl_dir: Path, existing_img: set, existing_lbl: set, ext: str,
              save_args: dict, crop_ratio: float, dataset: str, split: str, progress: bool) -> None:
    for i in tqdm(range(len(source)), desc=f"five-crop {dataset}/{split}", disable=not progress):
        names = [str(5 * i + j) for j in range(5)]
        if all(n + ext in existing_img and n + ".png" in existing_lbl for n in names):
            continue
        image, label = source.raw(i)  # full resolution: uint8 [H,W,3], int64 [H,W] with -1 = ignore
        stored = (label + 1).astype(np.uint8)  # label + 1, so 0 = ignore
        for name, (top, left, h, w) in zip(names, five_crop_boxes(*label.shape, crop_ratio)):
            _save_atomic(np.ascontiguousarray(image[top:top + h, left:left + w]), img_dir / (name + ext),
                         **save_args)
            _save_atomic(np.ascontiguousarray(stored[top:top + h, left:left + w]), lbl_dir / (name + ".png"))
