"""Miniature dataset trees in the real datasets' exact on-disk layouts (the tests' trees and ``preflight --synthetic``).

Each ``make_*`` writes a handful of images into ``root`` (the data root passed to ``load_dataset``) and returns a
dict with what a test needs to check the loader by hand: the raw label arrays as written, per file. Labels cover the
edge values of each format (COCO-Stuff 0/181/255, Cityscapes 0..33, Potsdam 0..5 and 255).
``write_synthetic_tree`` writes the tree ``stego-study preflight --synthetic`` runs a profile on: at least 12
training and 4 validation images at the datasets' real sizes (COCO 480x640, Cityscapes 1024x2048, Potsdam 200x200
tiles), in block-smooth random colours so the files stay small and decode fast. ``miniature_copy`` makes the
same kind of tree from a real one (links to its first images, lists cut to them) for preflight's end-to-end run.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.io import savemat

from . import data
from .config import StegoError


def _rgb(rng: np.random.Generator, height: int, width: int, block: int = 1) -> np.ndarray:
    """Random colours, constant over ``block`` x ``block`` squares (1: per pixel)."""
    small = rng.integers(0, 256, size=(-(-height // block), -(-width // block), 3), dtype=np.uint8)
    return np.ascontiguousarray(small.repeat(block, 0).repeat(block, 1)[:height, :width])


def _stripes(values: list[int], height: int, width: int) -> np.ndarray:
    """A label image of vertical stripes cycling through ``values`` (so every value is present)."""
    cols = np.arange(width) * len(values) // width
    return np.broadcast_to(np.asarray(values, dtype=np.uint8)[cols], (height, width)).copy()


def make_cocostuff(root: str | Path, *, n_train: int = 3, n_val: int = 2, size: tuple[int, int] = (48, 64),
                   seed: int = 0, block: int = 1) -> dict:
    """``root/cocostuff`` with curated lists; labels hold fine ids incl. 0, 181, 255 (unlabelled)."""
    root, rng = Path(root), np.random.default_rng(seed)
    height, width = size
    fine_values = [0, 1, 15, 100, 105, 181, 255, 91]
    out = {"labels": {}}
    for split, folder, list_name, n in (("train", "train2017", "Coco164kFull_Stuff_Coarse.txt", n_train),
                                        ("val", "val2017", "Coco164kFull_Stuff_Coarse_7.txt", n_val)):
        img_dir = root / "cocostuff" / "images" / folder
        lbl_dir = root / "cocostuff" / "annotations" / folder
        lst_dir = root / "cocostuff" / "curated" / folder
        for d in (img_dir, lbl_dir, lst_dir):
            d.mkdir(parents=True, exist_ok=True)
        ids = [f"{1000 * (split == 'val') + i:012d}" for i in range(n)]
        for k, image_id in enumerate(ids):
            Image.fromarray(_rgb(rng, height, width, block)).save(img_dir / f"{image_id}.jpg")
            label = _stripes(fine_values[k % 2:] + fine_values[: k % 2], height, width)
            Image.fromarray(label).save(lbl_dir / f"{image_id}.png")
            out["labels"][(split, k)] = label
        # an extra unlisted image proves that only the curated list is read
        Image.fromarray(_rgb(rng, height, width)).save(img_dir / "999999999999.jpg")
        (lst_dir / list_name).write_text("".join(f"{i}\n" for i in ids))
    return out


def make_cityscapes(root: str | Path, *, size: tuple[int, int] = (32, 64), seed: int = 0,
                    layout: dict[str, dict[str, int]] | None = None, block: int = 1) -> dict:
    """``root/cityscapes`` in torchvision's layout; ``layout`` = {split: {city: images}} (default: two cities in
    train, one in val, 3 + 2 images); label ids 0..33."""
    root, rng = Path(root), np.random.default_rng(seed)
    height, width = size
    out = {"labels": {}}
    layout = layout or {"train": {"aachen": 2, "bochum": 1}, "val": {"frankfurt": 2}}
    for split, cities in layout.items():
        k = 0
        for city, n in sorted(cities.items()):
            img_dir = root / "cityscapes" / "leftImg8bit" / split / city
            lbl_dir = root / "cityscapes" / "gtFine" / split / city
            img_dir.mkdir(parents=True, exist_ok=True)
            lbl_dir.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                base = f"{city}_{i:06d}_000019"
                Image.fromarray(_rgb(rng, height, width, block)).save(img_dir / f"{base}_leftImg8bit.png")
                label = _stripes(list(range(34)) if k % 2 == 0 else list(range(33, -1, -1)), height, width)
                Image.fromarray(label).save(lbl_dir / f"{base}_gtFine_labelIds.png")
                # the other target types of the real tree must be ignored
                Image.fromarray(label).save(lbl_dir / f"{base}_gtFine_instanceIds.png")
                out["labels"][(split, k)] = label
                k += 1
    return out


def make_potsdam(root: str | Path, *, size: tuple[int, int] = (20, 24), seed: int = 0,
                 float_images: bool = True, n_train: int | None = None, n_val: int | None = None) -> dict:
    """``root/potsdam`` (IIC layout): 4-channel .mat images, 6-class gt with 255; the second val image lacks its
    gt. ``n_train`` / ``n_val``: tiles per list (None: 3 and 2 with the tests' fixed ids)."""
    root, rng = Path(root), np.random.default_rng(seed)
    height, width = size
    (root / "potsdam" / "imgs").mkdir(parents=True, exist_ok=True)
    (root / "potsdam" / "gt").mkdir(parents=True, exist_ok=True)
    out = {"labels": {}, "images": {}}
    splits = {"train": ["0_0_0", "0_0_1", "1_2_3"], "val": ["5_5_5", "6_6_6"]}
    if n_train is not None:
        splits["train"] = [f"2_{i // 15}_{i % 15}" for i in range(n_train)]
    if n_val is not None:
        splits["val"] = [f"7_{i // 15}_{i % 15}" for i in range(n_val)]
    for split, ids in splits.items():
        for k, image_id in enumerate(ids):
            img = rng.random((height, width, 4)).astype(np.float32) if float_images else \
                rng.integers(0, 256, (height, width, 4), dtype=np.uint8)
            savemat(root / "potsdam" / "imgs" / f"{image_id}.mat", {"img": img})
            out["images"][(split, k)] = img
            if split == "val" and k == 1:
                out["labels"][(split, k)] = None  # missing gt -> all ignored
                continue
            gt = _stripes([0, 1, 2, 3, 4, 5, 255] if k % 2 == 0 else [255, 5, 4, 3, 2, 1, 0], height, width)
            savemat(root / "potsdam" / "gt" / f"{image_id}.mat", {"gt": gt})
            out["labels"][(split, k)] = gt
        list_name = "labelled_train.txt" if split == "train" else "labelled_test.txt"
        (root / "potsdam" / list_name).write_text("".join(f"{i}\n" for i in ids))
    return out


def make_directory(root: str | Path, *, n_classes: int = 4, n_train: int = 3, n_val: int = 2,
                   size: tuple[int, int] = (30, 40), labels: bool = True, seed: int = 0) -> dict:
    """``root/imgs/{train,val}`` (mixed .jpg/.png) with optional ``root/labels`` (0..n_classes-1 and 255)."""
    root, rng = Path(root), np.random.default_rng(seed)
    height, width = size
    out = {"labels": {}}
    for split, n in (("train", n_train), ("val", n_val)):
        img_dir, lbl_dir = root / "imgs" / split, root / "labels" / split
        img_dir.mkdir(parents=True, exist_ok=True)
        if labels:
            lbl_dir.mkdir(parents=True, exist_ok=True)
        for k in range(n):
            ext = ".jpg" if k % 2 == 0 else ".png"
            Image.fromarray(_rgb(rng, height, width)).save(img_dir / f"img_{k:03d}{ext}")
            if labels:
                label = _stripes(list(range(n_classes)) + [255], height, width)
                Image.fromarray(label).save(lbl_dir / f"img_{k:03d}.png")
                out["labels"][(split, k)] = label
    return out


# the datasets' real image sizes (H, W): COCO's typical 480x640 photos, Cityscapes' 1024x2048 frames, IIC's
# 200x200 Potsdam tiles
SYNTHETIC_SIZES = {"cocostuff27": (480, 640), "cityscapes": (1024, 2048), "potsdam": (200, 200)}


def write_synthetic_tree(dataset: str, root: str | Path, *, n_train: int = 12, n_val: int = 4,
                         seed: int = 0) -> dict[str, int]:
    """Write a miniature ``dataset`` tree (``cocostuff27``, ``cityscapes``, ``potsdam``) in its exact on-disk layout
    under the data root ``root``, with images of the real size; returns the images per split ({"train": n, ...}).

    Cityscapes spreads the training images over two cities; Potsdam's second validation tile has no gt file (as
    in IIC's tree, where some tiles are unlabelled)."""
    if dataset not in SYNTHETIC_SIZES:
        raise StegoError(f"dataset: no synthetic tree for {dataset!r}; expected one of {', '.join(SYNTHETIC_SIZES)}")
    if n_train < 1 or n_val < 1:
        raise StegoError(f"n_train, n_val: expected at least one image per split, got {n_train} and {n_val}")
    size = SYNTHETIC_SIZES[dataset]
    if dataset == "cocostuff27":
        make_cocostuff(root, n_train=n_train, n_val=n_val, size=size, seed=seed, block=8)
    elif dataset == "cityscapes":
        first = (n_train + 1) // 2
        layout = {"train": {"aachen": first, "bochum": n_train - first} if n_train > 1 else {"aachen": 1},
                  "val": {"frankfurt": n_val}}
        make_cityscapes(root, size=size, seed=seed, layout=layout, block=16)
    else:
        make_potsdam(root, size=size, seed=seed, float_images=True, n_train=n_train, n_val=n_val)
    return {"train": n_train, "val": n_val}


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if not dst.exists():
        os.symlink(src.resolve(), dst)


def miniature_copy(dataset: str, source: str | os.PathLike, dest: str | os.PathLike, *, n_train: int = 12,
                   n_val: int = 4) -> Path:
    """A copy of the first ``n_train`` / ``n_val`` images of each split of a real tree under ``dest`` (links to
    the files, lists cut to them), in the same layout; returns ``dest`` (a data root)."""
    source, dest = Path(source), Path(dest)
    counts = {"train": n_train, "val": n_val}
    if dataset == "cocostuff27":
        for split, n in counts.items():
            ds = data.load_dataset(dataset, split, root=source)
            ids, folder = ds.ids[:n], ds.img_dir.name
            for image_id in ids:
                _link(ds.img_dir / f"{image_id}.jpg", dest / "cocostuff" / "images" / folder / f"{image_id}.jpg")
                _link(ds.lbl_dir / f"{image_id}.png", dest / "cocostuff" / "annotations" / folder / f"{image_id}.png")
            lst = dest / ds.list_path.relative_to(source)
            lst.parent.mkdir(parents=True, exist_ok=True)
            lst.write_text("".join(f"{i}\n" for i in ids))
    elif dataset == "cityscapes":
        for split, n in counts.items():
            ds = data.load_dataset(dataset, split, root=source)
            for img, lbl in ds.pairs[:n]:
                _link(img, dest / "cityscapes" / "leftImg8bit" / split / img.parent.name / img.name)
                _link(lbl, dest / "cityscapes" / "gtFine" / split / lbl.parent.name / lbl.name)
    elif dataset == "potsdam":
        for split, n in counts.items():
            ds = data.load_dataset(dataset, split, root=source)
            ids = ds.ids[:n]
            for image_id in ids:
                _link(ds.img_dir / f"{image_id}.mat", dest / "potsdam" / "imgs" / f"{image_id}.mat")
                if (ds.gt_dir / f"{image_id}.mat").exists():
                    _link(ds.gt_dir / f"{image_id}.mat", dest / "potsdam" / "gt" / f"{image_id}.mat")
            (dest / ds.lists[0].relative_to(source)).write_text("".join(f"{i}\n" for i in ids))
    else:
        raise StegoError(f"dataset: no miniature copy for {dataset!r}; expected one of {', '.join(SYNTHETIC_SIZES)}")
    return dest
