"""Segmenting your own images: a trained run or a released STEGO checkpoint -> label maps and colour overlays.

``segment_images(paths, run=RUN_DIR | checkpoint=CKPT, out_dir=OUT)`` writes, for every image ``NAME.ext``:

- ``OUT/NAME_label.png``: uint8 class (or cluster) ids at the image's **original size** (after EXIF orientation);
- ``OUT/NAME_overlay.png``: the ids' colours blended over the image;
- once per call ``OUT/classes.json``: what each id means (name, colour), the probe, the model and the settings.

How one image is segmented (the evaluation's recipe, stego-spec §7.2, applied to one image of any size):

1. the image is read as RGB and resized so that its shorter side is ``res`` px (320, the evaluation size) and both
   sides are multiples of the backbone stride (the aspect ratio is kept up to one stride; nothing is cropped), with
   nearest-neighbour resampling under ``protocol="original"`` (quirk 10.3) and bilinear under ``"corrected"``;
2. code = code_map(backbone(x)), averaged with the flipped image's flipped code when ``flip`` (test-time
   augmentation on the code; ``Segmenter.image_code``): the STEGO head, a baseline's projection or the identity;
3. the code is upsampled bilinearly to the resized image, the probe gives log-probabilities (``"cluster"``: cosine
   to the centres, alpha 2; ``"linear"``: log-softmax of the linear probe; ``Segmenter.log_probs``), optionally
   refined by DenseCRF (``Segmenter.refine``);
4. the scores are upsampled bilinearly to the original size (row band by row band, so a 24-megapixel photo needs
   only a few hundred MB) and the argmax is the label map.

Ids: ``probe="linear"`` predicts the classes of the dataset the model was trained on (it was fitted with labels);
``probe="cluster"`` predicts cluster ids: STEGO's unsupervised output, whose numbering is arbitrary (the paper matches
clusters to classes with the Hungarian algorithm on labelled data, which your images do not have).

``main(argv)`` is the command line: ``python -m stego_core.segment --run DIR img1.jpg ... --out out/``
(``--checkpoint FILE`` instead of ``--run``; ``--help`` lists the options). Folders given as paths are expanded to
the images they hold.
"""
from __future__ import annotations

import argparse
import colorsys
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm.auto import tqdm

from .backbones import load_backbone
from .book.viz import overlay
from .config import (
    PROTOCOLS,
    StegoError,
    atomic_write,
    check_choice,
    check_int,
    ensure_writable,
    resolve_device,
    write_json_atomic,
)
from .data import IMAGE_EXTENSIONS, normalize
from .segmenter import PROBES, Segmenter

__all__ = ["PROBES", "IMAGE_EXTENSIONS", "Segmentation", "segment_images", "load_segmenter", "label_map", "id_names",
           "upsampled_argmax", "network_size", "main"]

_BAND_BYTES = 64 << 20  # memory for one band of upsampled scores in upsampled_argmax


@dataclass
class Segmentation:
    """What ``segment_images`` wrote for one image."""

    source: Path  # the input image
    label_path: Path  # NAME_label.png: uint8 ids [H, W]
    overlay_path: Path  # NAME_overlay.png: uint8 RGB [H, W, 3]
    size: tuple[int, int]  # (H, W) of the input (after EXIF orientation) = of both outputs
    network_size: tuple[int, int]  # (h, w) the backbone saw
    counts: dict[int, int]  # pixels per predicted id


# ---------------------------------------------------------------------------------------------------------------
# geometry
def network_size(height: int, width: int, res: int, stride: int) -> tuple[int, int]:
    """(h, w) the backbone sees for an HxW image: shorter side ``res`` rounded to the stride, the other side scaled
    by the same factor and rounded to the nearest multiple of the stride (at least one stride)."""
    short = max(stride, int(round(res / stride)) * stride)
    if height <= width:
        long = max(stride, int(round(width * short / height / stride)) * stride)
        return short, long
    long = max(stride, int(round(height * short / width / stride)) * stride)
    return long, short


def _source_rows(rows: Any, in_size: int, out_size: int):
    """Bilinear (align_corners False) source rows and weights of output ``rows``, as torch computes them."""
    src = ((rows.double() + 0.5) * (in_size / out_size) - 0.5).clamp(min=0)
    r0 = src.floor().long().clamp(max=in_size - 1)
    r1 = (r0 + 1).clamp(max=in_size - 1)
    lam = (src - r0.double()).clamp(0, 1).float()
    return r0, r1, lam.view(1, -1, 1), (1 - lam).view(1, -1, 1)  # weights shaped [1,n,1] for [K,n,W]


def upsampled_argmax(scores: Any, size: tuple[int, int], *, band_bytes: int = _BAND_BYTES) -> np.ndarray:
    """argmax over K of ``scores`` [K, h, w] upsampled bilinearly (align_corners False) to ``size`` = (H, W).

    Same result as ``F.interpolate(scores[None], size, mode="bilinear").argmax(1)`` (up to float rounding), computed
    in bands of output rows: first along the width ([K, h, W]), then each band of rows along the height. Returns
    int64 [H, W].
    """
    scores = torch.as_tensor(scores).float()
    if scores.ndim != 3:
        raise StegoError(f"scores: expected [K, h, w], got shape {tuple(scores.shape)}")
    height, width = int(size[0]), int(size[1])
    k, h, _ = scores.shape
    wide = F.interpolate(scores[None], size=(h, width), mode="bilinear", align_corners=False)[0]  # [K,h,W]
    out = np.empty((height, width), dtype=np.int64)
    band = max(1, band_bytes // max(1, 4 * k * width))
    for top in range(0, height, band):
        rows = torch.arange(top, min(height, top + band))
        r0, r1, lam, keep = _source_rows(rows, h, height)
        mixed = wide[:, r0] * keep + wide[:, r1] * lam  # [K,n,W]
        out[top:top + len(rows)] = mixed.argmax(0).numpy()
    return out


# ---------------------------------------------------------------------------------------------------------------
# images and files
def _expand(paths: Sequence[str | os.PathLike]) -> list[Path]:
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                raise StegoError(f"paths: folder {p} holds no images; expected files ending in "
                                 f"{', '.join(IMAGE_EXTENSIONS)}")
            out += found
        elif not p.exists():
            raise StegoError(f"paths: image {p} does not exist; expected an image file or a folder of images")
        else:
            out.append(p)
    if not out:
        raise StegoError("paths: no images given; expected one or more image files or folders")
    stems: dict[str, Path] = {}
    for p in out:
        if p.stem in stems:
            raise StegoError(f"paths: {stems[p.stem]} and {p} share the name {p.stem!r}, so their outputs would "
                             "overwrite each other; expected distinct file names (segment them into separate "
                             "out_dirs)")
        stems[p.stem] = p
    return out


def _check_readable(path: Path) -> None:
    try:
        with Image.open(path) as im:
            im.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise StegoError(f"paths: cannot read {path} as an image ({type(exc).__name__}: {exc}); expected a "
                         f"JPEG/PNG/BMP/TIFF/WebP file") from None


def _read_rgb(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)  # phone photos: the orientation a viewer shows
            return np.asarray(im.convert("RGB"))
    except OSError as exc:
        raise StegoError(f"paths: cannot read {path} as an image ({exc})") from None


def _save_png_atomic(array: np.ndarray, path: Path) -> None:
    with atomic_write(path) as fh:
        Image.fromarray(array).save(fh, format="PNG")


def _palette(n: int, base: np.ndarray | None = None) -> np.ndarray:
    """n distinct uint8 colours: ``base`` first (the training dataset's palette), then golden-angle hues."""
    colours = [tuple(int(v) for v in c) for c in (base if base is not None else [])][:n]
    i = 0
    while len(colours) < n:
        hue = (i * 0.618033988749895) % 1.0
        light, sat = (0.45, 0.75) if i % 2 == 0 else (0.6, 0.6)
        colours.append(tuple(int(round(255 * v)) for v in colorsys.hls_to_rgb(hue, light, sat)))
        i += 1
    return np.array(colours, dtype=np.uint8).reshape(n, 3)


# ---------------------------------------------------------------------------------------------------------------
# the model
def load_segmenter(run: Any = None, checkpoint: Any = None, *, which: str = "best", weights: str | None = None,
                   device: Any = "cpu", protocol: str = "original", trusted: bool = False,
                   backbone: Any = None) -> tuple[Segmenter, dict[str, Any]]:
    """The segmenter of a run folder or a released checkpoint with its backbone on ``device``, and its description
    (for classes.json). ``backbone``: a loaded backbone to attach to a run's segmenter instead of loading one (the
    explorer shares one backbone between the runs of a store); ``weights`` None = those the run's features were
    computed with, or the ViT stored in the checkpoint."""
    dev = resolve_device(device)
    if run is not None:
        seg = run if isinstance(run, Segmenter) else Segmenter.from_run(run, which=which)
        if weights is None:
            weights = seg.info.get("weights")  # the weights the run's features were computed with
        if seg.backbone is None:
            seg = seg.with_backbone(backbone if backbone is not None
                                    else load_backbone(seg.info["backbone"], weights, protocol=protocol))
        return seg.to(dev), {**seg.description, "weights": weights}
    seg = checkpoint if isinstance(checkpoint, Segmenter) else Segmenter.from_checkpoint(
        checkpoint, trusted=trusted, weights=weights, protocol=protocol)
    return seg.to(dev), seg.description


def id_names(seg: Segmenter, probe: str, *, map_clusters: bool = True) -> tuple[np.ndarray, list[str]]:
    """(palette [n,3] uint8, name per id) of the ids ``probe`` predicts: the training dataset's classes for the
    linear probe (and for the cluster probe of a segmenter whose clusters are matched to classes), else
    "cluster k"."""
    matched = probe == "cluster" and seg.cluster_to_class is not None
    n_ids = seg.n_classes if probe == "linear" or matched else seg.n_clusters
    base = seg.info.get("palette")
    palette = _palette(n_ids, None if base is None else np.asarray(base, dtype=np.uint8))
    class_names = list(seg.info.get("class_names") or [])
    names = (class_names if (probe == "linear" or matched) and len(class_names) == n_ids
             else [f"cluster {k}" for k in range(n_ids)] if probe == "cluster"
             else [f"class {k}" for k in range(n_ids)])
    return palette, names


def label_map(seg: Segmenter, rgb: np.ndarray, *, res: int = 320, probe: str = "cluster", crf: bool = False,
              protocol: str = "original", flip: bool = True,
              map_clusters: bool = True) -> tuple[np.ndarray, tuple[int, int]]:
    """One RGB image uint8 [H,W,3] -> (int64 ids [H,W] at the image's size, the (h, w) the backbone saw): steps
    1-4 of the module docstring with ``seg`` (which needs a backbone). Cluster ids become classes when ``seg``
    carries a cluster -> class map and ``map_clusters`` (-1 = a cluster without a class)."""
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise StegoError(f"rgb: expected a uint8 image [H,W,3], got {rgb.dtype} of shape {rgb.shape}")
    if seg.backbone is None:
        raise StegoError("seg: expected a segmenter with a backbone (load_segmenter)")
    resample = Image.NEAREST if protocol == "original" else Image.BILINEAR
    height, width = rgb.shape[:2]
    net_h, net_w = network_size(height, width, res, int(seg.backbone.stride))
    small = np.asarray(Image.fromarray(rgb).resize((net_w, net_h), resample))
    x = normalize(torch.from_numpy(np.array(small)).permute(2, 0, 1).float() / 255.0)[None]  # [H,W,3] -> [1,3,h,w]
    code = seg.image_code(x, flip=flip)  # [1,D,h/s,w/s]
    scores = seg.log_probs(code, x.shape[-2:], probe)[0].cpu()  # [K,h,w]
    if crf:
        scores = torch.from_numpy(seg.refine(scores[None], x, protocol=protocol)[0])  # marginals [K,h,w]
    label = upsampled_argmax(scores, (height, width))  # [H,W]
    if probe == "cluster" and map_clusters and seg.cluster_to_class is not None:
        label = seg.cluster_to_class[label]
    return label, (net_h, net_w)


def segment_images(paths: Sequence[str | os.PathLike] | str | os.PathLike, *, run: Any = None,
                   checkpoint: Any = None, out_dir: str | os.PathLike, crf: bool = False, probe: str = "cluster",
                   res: int = 320, protocol: str = "original", flip: bool = True, which: str = "best",
                   weights: str | None = None, device: Any = "cpu", alpha: float = 0.5, trusted: bool = False,
                   progress: bool = True) -> list[Segmentation]:
    """Segment image files with a trained run or a released checkpoint; write label maps and overlays.

    paths: image files and/or folders of images (file names must be distinct: outputs are named after them).
    run: a run folder written by ``stego_core.training.train`` (or a ``Segmenter``); ``which`` picks its "best"
        (validation cluster mIoU, the default) or "last" checkpoint.
    checkpoint: a released STEGO ``.ckpt`` (or a ``Segmenter`` / ``LoadedCheckpoint``); ``trusted`` as in
        ``load_stego_checkpoint``. Pass exactly one of ``run`` and ``checkpoint``.
    out_dir: where NAME_label.png, NAME_overlay.png and classes.json go (created if needed).
    crf: refine the probe's scores with DenseCRF (``stego_core.crf``) before upsampling; ``protocol`` also picks its
        image bytes, the resize filter and the backbone's positional-embedding rule.
    probe: "cluster" (unsupervised cluster ids) or "linear" (the training dataset's class ids).
    res: shorter side in pixels the backbone sees (rounded to its stride); flip: flip test-time augmentation.
    weights: backbone weights; None = those the run's features were computed with (run) or the ViT stored in the
        checkpoint (checkpoint).
    device: where the backbone, the code map and the probes run. alpha: overlay opacity. progress: a progress bar
        over the images.
    Returns one ``Segmentation`` per image, in input order.
    """
    if (run is None) == (checkpoint is None):
        raise StegoError("run/checkpoint: pass exactly one: run=<run folder from training> or "
                         "checkpoint=<released STEGO .ckpt file>")
    check_choice("probe", probe, PROBES)
    check_choice("protocol", protocol, PROTOCOLS)
    check_choice("which", which, ("best", "last"))
    check_int("res", res, minimum=1)
    if not isinstance(crf, bool) or not isinstance(flip, bool):
        raise StegoError(f"crf/flip: expected True or False, got crf={crf!r}, flip={flip!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
        raise StegoError(f"alpha: expected a number in [0, 1], got {alpha!r}")
    if checkpoint is not None and isinstance(checkpoint, (str, os.PathLike)) and not Path(checkpoint).is_file():
        raise StegoError(f"checkpoint: file {checkpoint} not found; expected a released STEGO .ckpt file")
    if run is not None and isinstance(run, (str, os.PathLike)) and not (Path(run) / "meta.json").is_file():
        raise StegoError(f"run: {run} is not a run folder (no meta.json); expected the run_dir of "
                         f"stego_core.training.train (artifacts/runs/NAME-HASH)")
    files = _expand(paths)
    for f in files:
        _check_readable(f)
    out = ensure_writable(Path(out_dir), "out_dir")

    seg, description = load_segmenter(run, checkpoint, which=which, weights=weights, device=device,
                                      protocol=protocol, trusted=trusted)
    palette, names = id_names(seg, probe, map_clusters=False)  # cluster ids, as documented
    n_ids = len(names)
    if n_ids > 256:
        raise StegoError(f"probe: {n_ids} ids do not fit a uint8 label PNG; expected at most 256")
    write_json_atomic(out / "classes.json", {
        "probe": probe, "ids": [{"id": k, "name": names[k], "color": palette[k].tolist()} for k in range(n_ids)],
        "note": ("cluster ids are STEGO's unsupervised clusters (arbitrary numbering)" if probe == "cluster"
                 else "class ids of the dataset the linear probe was trained on"),
        "model": description, "res": res, "crf": crf, "flip": flip, "protocol": protocol})

    results = []
    for path in tqdm(files, desc="segment", unit="img", disable=not progress):
        rgb = _read_rgb(path)  # [H,W,3]
        height, width = rgb.shape[:2]
        ids, (net_h, net_w) = label_map(seg, rgb, res=res, probe=probe, crf=crf, protocol=protocol, flip=flip,
                                        map_clusters=False)
        label = ids.astype(np.uint8)
        label_path, overlay_path = out / f"{path.stem}_label.png", out / f"{path.stem}_overlay.png"
        _save_png_atomic(label, label_path)
        _save_png_atomic(overlay(rgb, label, palette, alpha), overlay_path)
        ids, counts = np.unique(label, return_counts=True)
        results.append(Segmentation(source=path, label_path=label_path, overlay_path=overlay_path,
                                    size=(height, width), network_size=(net_h, net_w),
                                    counts={int(i): int(c) for i, c in zip(ids, counts)}))
    return results


# ---------------------------------------------------------------------------------------------------------------
# command line
def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m stego_core.segment",
        description="Segment your own images with a trained run or a released STEGO checkpoint: writes "
                    "NAME_label.png (uint8 ids at the original size), NAME_overlay.png and classes.json.")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="run folder written by training (artifacts/runs/NAME-HASH)")
    src.add_argument("--checkpoint", help="released STEGO checkpoint (.ckpt)")
    ap.add_argument("images", nargs="+", help="image files or folders of images")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--probe", choices=PROBES, default="cluster",
                    help="cluster: unsupervised cluster ids (default); linear: the training dataset's classes")
    ap.add_argument("--crf", action="store_true", help="refine with DenseCRF (slower, sharper edges)")
    ap.add_argument("--res", type=int, default=320, help="shorter side the backbone sees, in pixels (320)")
    ap.add_argument("--protocol", choices=PROTOCOLS, default="original",
                    help="original (the paper's resize and CRF bytes) or corrected")
    ap.add_argument("--no-flip", action="store_true", help="skip the flip test-time augmentation (2x faster)")
    ap.add_argument("--which", choices=("best", "last"), default="best", help="which checkpoint of a run")
    ap.add_argument("--weights", help="backbone weights file (default: those of the run / the checkpoint's ViT)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--alpha", type=float, default=0.5, help="overlay opacity in [0, 1]")
    ap.add_argument("--trusted", action="store_true",
                    help="allow a full (code-executing) unpickle of a checkpoint from a source you trust")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    return ap


def main(argv: list[str] | None = None) -> int:
    """``python -m stego_core.segment``: exit status 0 on success, 2 with a one-line error otherwise."""
    args = _parser().parse_args(argv)
    try:
        results = segment_images(
            args.images, run=args.run, checkpoint=args.checkpoint, out_dir=args.out, crf=args.crf, probe=args.probe,
            res=args.res, protocol=args.protocol, flip=not args.no_flip, which=args.which, weights=args.weights,
            device=args.device, alpha=args.alpha, trusted=args.trusted, progress=not args.quiet)
    except StegoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for r in results:
        print(f"{r.source} -> {r.label_path.name}, {r.overlay_path.name} ({r.size[1]}x{r.size[0]})")
    print(f"ids explained in {Path(args.out) / 'classes.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
