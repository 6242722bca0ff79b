"""The cost model of the paper-scale study: disk space and GPU time per dataset and stage, from stated assumptions.

Nothing here is measured on the user's machine: every number is computed from the assumptions below, so the
reproduction guide's table can be regenerated (and re-derived by hand) when an assumption changes.

Assumptions (``DATASET_FACTS``, ``REFERENCE``, and the function arguments):

- Images per split: COCO-Stuff-27 49,629 train / 2,175 val (the curated IIC/PiCIE lists, as PiCIE reports them);
  Cityscapes 2,975 / 500 (the fine train / val splits); Potsdam-3 4,545 / 855 (IIC's preprocessing: 38 orthophotos
  x 225 tiles of 200x200 px = 8,550 tiles; the 24 labelled photos give 5,400 tiles, 855 of them drawn for the test
  list, 4,545 left for ``labelled_train``). COCO and Cityscapes train on the five-crop tree (5 crops per image, each
  half the height and width), Potsdam uncropped (stego-spec §6.4, §9.1).
- Download size per image (image + label file): COCO ~152 KB JPEG (train2017: ~18 GB / 118,287 images) + ~5 KB
  PNG; Cityscapes ~2.2 MB PNG (leftImg8bit: ~11 GB / 5,000 images) + ~48 KB of gtFine files; Potsdam two
  uncompressed .mat files of 200x200x4 uint8 and 200x200 int32 (160 KB each).
- Five-crop tree: the crops hold 5/4 of the source pixels; JPEG quality 75 of a photo ~1.5 bits per pixel, a label
  PNG ~0.15 bits per pixel.
- Feature store (``stego_core.cache``): per image h*w tokens (h = w = res / patch: 28x28 = 784 at 224 px and patch
  8, 40x40 = 1,600 at 320 px) of C channels in float16 (2 bytes; C = 768 for ViT-B, 384 for ViT-S), plus the
  uint8 RGB image (3 bytes per pixel) and the int16 label (2 bytes per pixel) at res x res. Train at 224 px, val at
  320 px (the evaluation size). kNN table: k = 30 int64 indices per training image.
- GPU throughput (measured once on an H200, architecture notes): ViT-B/8 at 224 px extracts 255 images/s in the
  original style (fp32, unfused attention) and 2,112 images/s in bf16 with fused attention. Other backbones and
  sizes scale with the forward FLOPs of a 12-block ViT: per block 24*N*C^2 (qkv, projection, MLP) + 4*N^2*C
  (attention) for N tokens (+1 CLS) of width C; the patch embedding (<1 %) is ignored. This assumes ViT-S runs as
  efficiently as ViT-B, which flatters ViT-S on a large GPU.
- One STEGO training step with batch 32 on ViT-B/8 features: 270 ms with two live fp32 backbone passes, 48 ms live
  in bf16, 14 ms on cached features; other batch sizes scale linearly. For a live ViT-S the backbone share
  (live - cached) scales with the FLOPs ratio. Baseline runs (DINO/PCA/RP/h-NNE probes) are charged the cached STEGO
  step (an upper bound: they have no head). Fitting PCA/RP/h-NNE and the kNN search itself are not counted
  (minutes); without a store (live training) the kNN descriptors still need one backbone pass over the training
  split, which is charged to the caching stage.
- Precision: ``precision="fp32"`` (the default) is what ``01_features`` does (``cache_features`` without ``amp``, as
  the original); ``"bf16"`` is what extraction with ``amp=True`` would cost. The fp32 rate was measured with unfused
  attention (the original's style); ``01_features`` runs fp32 with timm's fused attention, which is no slower, so
  its fp32 times are upper bounds.
- Validation during training: every run validates over the whole validation split at 320 px as often as
  ``stego_core.training.validation_steps`` says for the protocol (original: PyTorch Lightning 1.x's every
  ``val_freq`` = 100 batches of each epoch; COCO-Stuff 70 times in 7,000 steps, Cityscapes 60, Potsdam 35). On
  cached features one validated image costs the GPU about what one image of a cached training step does (14 ms /
  32; an assumption, not measured); on live features add its backbone pass at 320 px.
- Disk reads: a training step on cached features reads its batch and one kNN partner per item, whole store items
  (features, image, label), and a validation reads the whole validation store; neither store fits the 2 GiB that
  training preloads into memory at paper scale, so they are read from disk every time (``REFERENCE
  ["disk_bytes_per_s"]``, 2 GB/s: a local NVMe SSD; network storage is slower, and a store that fits the page cache
  is read from RAM instead). Caching reads the images once (the five-crop tree for training, the downloaded
  validation images). Live training reads the image files of its batches and of every validation instead. The
  loops read and compute one after the other, so wall time = GPU time + read time.
- Evaluation: the val split at 320 px, two backbone passes per image (flip). DenseCRF runs on CPU cores and is not
  part of the GPU time (the reference ran it in 14 processes).
- Newer backbones (the extended study; ``backbone_table``): DINOv2 ViT-S/B with patch 14 and DINOv3 ViT-S/B/L with
  patch 16 are costed with the same formula and the same anchors. Nothing was measured on them: their images/s,
  step times and GPU minutes are the ViT-B/8 measurements scaled by the FLOPs ratio, so they are estimates (they
  assume the same efficiency per FLOP; a 1024-wide ViT-L probably runs its larger matrices somewhat more
  efficiently). Their token count N adds the register tokens (4) to the CLS token, and the 24 blocks of ViT-L count
  twice as many; DINOv3's rotary embedding and DINOv2's resized positional table cost well under 1 % and are ignored.
  A patch-14 backbone validates at 322 px (``eval_res``: the multiple of the patch nearest 320), 23 x 23 tokens.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import pandas as pd

from .config import check_choice, check_int

__all__ = [
    "BACKBONE_SHAPES",
    "DATASET_FACTS",
    "FEATURE_SOURCES",
    "PRECISIONS",
    "PREFIX_TOKENS",
    "REFERENCE",
    "DatasetFacts",
    "backbone_table",
    "block_gflops",
    "cost_table",
    "dataset_costs",
    "eval_res",
    "feature_bytes_per_image",
    "five_crop_bytes",
    "format_bytes",
    "knn_bytes",
    "n_validations",
    "step_seconds",
    "store_item_bytes",
    "study_hours",
    "throughput",
    "vit_flops",
]

PRECISIONS = ("fp32", "bf16")  # "fp32": the original's style (unfused attention); "bf16": fused attention
FEATURE_SOURCES = ("cache", "live")


@dataclass(frozen=True)
class DatasetFacts:
    """What the cost model assumes about one dataset (see the module docstring for the sources)."""

    name: str  # dataset name (stego_core.data)
    train_images: int  # source images in the training split
    val_images: int  # images in the validation split
    five_crop: bool  # training reads the five-crop tree (5 crops per source image)
    source_hw: tuple[int, int]  # typical source image size (H, W) in pixels
    download_bytes_per_image: int  # image + label file as downloaded
    backbone: str  # the paper's backbone for this dataset
    steps: int  # training steps of the paper's run
    batch_size: int  # images per step of the paper's run

    @property
    def train_items(self) -> int:
        """Items of the training feature store: 5 per source image on the five-crop tree."""
        return self.train_images * (5 if self.five_crop else 1)


DATASET_FACTS: dict[str, DatasetFacts] = {
    "cocostuff27": DatasetFacts("cocostuff27", 49_629, 2_175, True, (480, 640), 152_000 + 5_000, "dino_vitb8",
                                7000, 32),
    "cityscapes": DatasetFacts("cityscapes", 2_975, 500, True, (1024, 2048), 2_200_000 + 48_000, "dino_vitb8",
                               7000, 32),
    "potsdam": DatasetFacts("potsdam", 4_545, 855, False, (200, 200), 2 * 160_000, "dino_vits8", 5000, 16),
}

# (width C, patch size, blocks) of the DINO backbones
BACKBONE_SHAPES: dict[str, tuple[int, int, int]] = {
    "dino_vits8": (384, 8, 12), "dino_vits16": (384, 16, 12),
    "dino_vitb8": (768, 8, 12), "dino_vitb16": (768, 16, 12),
}
# the newer backbones of the extended study (stego_core.backbones.NEWER_VITS) and their tokens besides the patches
BACKBONE_SHAPES.update({
    "dinov2_vits14": (384, 14, 12), "dinov2_vitb14": (768, 14, 12),
    "dinov2_vits14_reg": (384, 14, 12), "dinov2_vitb14_reg": (768, 14, 12),
    "dinov3_vits16": (384, 16, 12), "dinov3_vitb16": (768, 16, 12),
    "dinov3_vitl16": (1024, 16, 24), "dinov3_vitl16_sat": (1024, 16, 24),
})
PREFIX_TOKENS: dict[str, int] = {  # CLS + register tokens; 1 (CLS alone) for every backbone not listed
    "dinov2_vits14_reg": 5, "dinov2_vitb14_reg": 5, "dinov3_vits16": 5, "dinov3_vitb16": 5, "dinov3_vitl16": 5,
    "dinov3_vitl16_sat": 5,
}

# The measurements every time estimate is scaled from (H200, ViT-B/8, 224 px; architecture notes "Scale").
REFERENCE: dict[str, Any] = {
    "gpu": "NVIDIA H200",
    "backbone": "dino_vitb8",
    "res": 224,
    "images_per_s": {"fp32": 255.0, "bf16": 2112.0},  # feature extraction
    "step_batch": 32,
    "step_ms": {("live", "fp32"): 270.0, ("live", "bf16"): 48.0, ("cache", "fp32"): 14.0, ("cache", "bf16"): 14.0},
    "knn_k": 30,
    "jpeg_bits_per_pixel": 1.5,  # five-crop JPEG (quality 75)
    "label_png_bits_per_pixel": 0.15,  # five-crop label PNG
    "val_freq": 100,  # validation interval of every paper run (spec §5.4)
    "val_image_ms": 14.0 / 32,  # GPU ms per validated image on cached features (assumed: one cached step image)
    "disk_bytes_per_s": 2e9,  # disk reads (local NVMe SSD; assumption)
}


def n_validations(dataset: str, protocol: str = "original") -> int:
    """How many validations one paper run of ``dataset`` does (``stego_core.training.validation_steps``)."""
    from .training import validation_steps

    check_choice("dataset", dataset, DATASET_FACTS)
    facts = DATASET_FACTS[dataset]
    return len(validation_steps(facts.steps, REFERENCE["val_freq"], facts.train_items, facts.batch_size, protocol))


def _shape(backbone: str) -> tuple[int, int, int]:
    check_choice("backbone", backbone, BACKBONE_SHAPES)
    return BACKBONE_SHAPES[backbone]


def _tokens(backbone: str, res: int) -> int:
    _, patch, _ = _shape(backbone)
    check_int("res", res, minimum=patch)
    return (res // patch) ** 2


def vit_flops(backbone: str, res: int) -> float:
    """Forward multiply-adds (x2 = FLOPs) of the ViT's blocks for one res x res image: blocks * (24 N C^2 + 4 N^2 C)
    with N = patch tokens + 1 (CLS) + registers (``PREFIX_TOKENS``). Only ratios of this number are used."""
    width, _, blocks = _shape(backbone)
    n = _tokens(backbone, res) + PREFIX_TOKENS.get(backbone, 1)
    return 2.0 * blocks * (24.0 * n * width ** 2 + 4.0 * n ** 2 * width)


def block_gflops(backbone: str, res: int) -> float:
    """Forward GFLOPs (2 FLOPs per multiply-add) of the ViT's blocks for one res x res image:
    blocks * (24 N C^2 + 4 N^2 C) / 1e9 (qkv, projection and MLP: 12 N C^2 multiply-adds; attention: 2 N^2 C).
    ``vit_flops`` is twice this number; only its ratios are used."""
    return vit_flops(backbone, res) / 2 / 1e9


def throughput(backbone: str, res: int, precision: str = "fp32") -> float:
    """Images per second of feature extraction, scaled from the reference measurement by the FLOPs ratio."""
    check_choice("precision", precision, PRECISIONS)
    ref = REFERENCE["images_per_s"][precision]
    return ref * vit_flops(REFERENCE["backbone"], REFERENCE["res"]) / vit_flops(backbone, res)


def feature_bytes_per_image(backbone: str, res: int) -> int:
    """Bytes one item takes in the feature store: float16 tokens + uint8 RGB image + int16 label + int64 index."""
    width, _, _ = _shape(backbone)
    return store_item_bytes(width, _tokens(backbone, res), res)


def store_item_bytes(dim: int, tokens: int, res: int) -> int:
    """Bytes of one feature-store item with ``tokens`` (h*w) feature vectors of ``dim`` channels at ``res`` px: the
    store's own need (``stego_core.cache`` quotes it when the disk is full)."""
    return tokens * dim * 2 + res * res * 3 + res * res * 2 + 8


def knn_bytes(n_items: int, k: int = 30) -> int:
    """Bytes of a kNN table: ``k`` int64 neighbours per item."""
    return n_items * k * 8


def five_crop_bytes(facts: DatasetFacts) -> int:
    """Bytes of the five-crop tree of the training split (0 when the dataset trains uncropped)."""
    if not facts.five_crop:
        return 0
    height, width = facts.source_hw
    crop_pixels = 5 * (height // 2) * (width // 2)  # five crops of half height and half width
    bits = REFERENCE["jpeg_bits_per_pixel"] + REFERENCE["label_png_bits_per_pixel"]
    return int(facts.train_images * crop_pixels * bits / 8)


def step_seconds(backbone: str, batch_size: int, source: str = "cache", precision: str = "fp32") -> float:
    """Seconds per training step: the reference step time scaled linearly in the batch size; for live features the
    backbone share (live - cached) scales with the backbone's FLOPs relative to ViT-B/8 at 224 px."""
    check_choice("source", source, FEATURE_SOURCES)
    check_choice("precision", precision, PRECISIONS)
    check_int("batch_size", batch_size, minimum=1)
    cached = REFERENCE["step_ms"][("cache", precision)]
    ms = cached
    if source == "live":
        ratio = vit_flops(backbone, 224) / vit_flops(REFERENCE["backbone"], REFERENCE["res"])
        ms = cached + (REFERENCE["step_ms"][("live", precision)] - cached) * ratio
    return ms / 1000.0 * batch_size / REFERENCE["step_batch"]


def eval_res(backbone: str, res: int = 320) -> int:
    """The evaluation size of a backbone: the multiple of its patch nearest ``res`` (ties upwards); 320 for the
    paper's patch 8 / 16, 322 for DINOv2's patch 14."""
    _, patch, _ = _shape(backbone)
    check_int("res", res, minimum=1)
    return max(patch, patch * int(math.floor(res / patch + 0.5)))


def dataset_costs(dataset: str, *, precision: str = "fp32", source: str = "cache", train_res: int = 224,
                  val_res: int | None = None, k: int | None = None, protocol: str = "original",
                  backbone: str | None = None) -> dict[str, Any]:
    """Disk bytes, GPU seconds and disk-read seconds of every stage of one dataset's paper run (one STEGO run).

    precision: of the backbone passes ("fp32" = ``01_features`` without amp, "bf16" = with amp); source: where
    training reads features ("cache" = the feature store, "live" = two backbone passes per step, no store needed);
    protocol: decides how often training validates (``n_validations``).
    val_res: None = ``eval_res(backbone)`` (320 px for the paper's backbones). backbone: None = the paper's for the
    dataset; another name of ``BACKBONE_SHAPES`` costs the same run on that backbone (an estimate, module doc).
    """
    check_choice("dataset", dataset, DATASET_FACTS)
    facts = DATASET_FACTS[dataset]
    k = REFERENCE["knn_k"] if k is None else check_int("k", k, minimum=1)
    bb = facts.backbone if backbone is None else backbone
    _shape(bb)
    val_res = eval_res(bb) if val_res is None else val_res
    n_train, n_val = facts.train_items, facts.val_images
    cache_train = n_train * feature_bytes_per_image(bb, train_res)
    cache_val = n_val * feature_bytes_per_image(bb, val_res)
    n_val_passes = n_validations(dataset, protocol)
    val_pass_s = n_val * REFERENCE["val_image_ms"] / 1000.0
    if source == "live":
        val_pass_s += n_val / throughput(bb, val_res, precision)
    cached = source == "cache"
    train_images = five_crop_bytes(facts) or facts.train_images * facts.download_bytes_per_image  # as read
    val_images = n_val * facts.download_bytes_per_image
    # per step: the batch and one kNN partner per item; whole store items, or (live) their image files
    item_read = feature_bytes_per_image(bb, train_res) if cached else train_images / n_train
    out = {
        "dataset": dataset,
        "backbone": bb,
        "train_items": n_train,
        "val_images": n_val,
        "download_bytes": (facts.train_images + facts.val_images) * facts.download_bytes_per_image,
        "five_crop_bytes": five_crop_bytes(facts),
        "feature_store_bytes": (cache_train + cache_val) if cached else 0,
        "knn_bytes": knn_bytes(n_train, k),
        "cache_gpu_s": (n_train / throughput(bb, train_res, precision) + n_val / throughput(bb, val_res, precision))
        if cached else n_train / throughput(bb, train_res, precision),  # live: the kNN pass only
        "train_gpu_s": facts.steps * step_seconds(bb, facts.batch_size, source, precision),
        "validations": n_val_passes,
        "val_gpu_s": n_val_passes * val_pass_s,
        "eval_gpu_s": 2 * n_val / throughput(bb, val_res, precision),
        # disk reads: the images once when caching (live: the kNN pass over the training images), the batches of
        # every step, the validation split at every validation (the store, or live its image files)
        "cache_read_bytes": train_images + (val_images if cached else 0),
        "train_read_bytes": int(facts.steps * 2 * facts.batch_size * item_read),
        "val_read_bytes": n_val_passes * (cache_val if cached else val_images),
    }
    reads = out["cache_read_bytes"] + out["train_read_bytes"] + out["val_read_bytes"]
    out["read_bytes"] = reads
    out["read_s"] = reads / REFERENCE["disk_bytes_per_s"]
    return out


def study_hours(dataset: str, *, precision: str = "fp32", seeds: int = 1, protocol: str = "original",
                fused: bool = False) -> dict[str, Any]:
    """GPU and disk-read hours of the paper's dimension sweep for one dataset (``stego_core.sweep.study_grid``) on
    cached features: the cache is built once, then every run pays its steps and validations at the cached times
    and reads its batches and validation passes from disk. ``fused`` (``run_sweep(fused=True)``,
    ``stego_core.fused``): the training batches are read once per fused group (``fused.group_specs``: per seed the
    STEGO heads, the probe-only runs, each h-NNE run alone) instead of once per run; validation still reads per
    run, and the GPU time per run-step is not changed (no GPU measurement of the fused step exists yet).

    dataset: a paper dataset, or a preset of the extended study (e.g. "potsdam_dinov3_sat": its dataset's sweep on
    its backbone, ``stego_core.training.NEWER_BACKBONE_PRESETS``).
    """
    from .sweep import STUDY_DIMS, study_grid
    from .training import PRESETS

    check_int("seeds", seeds, minimum=1)
    check_choice("dataset", dataset, [p for p in STUDY_DIMS if PRESETS[p]["dataset"] in DATASET_FACTS])
    runs = study_grid(dataset, seeds=tuple(range(seeds))).runs()
    name, bb = PRESETS[dataset]["dataset"], PRESETS[dataset]["backbone"]
    train_s = sum(int(r.config["steps"]) * step_seconds(bb, int(r.config["batch_size"]), "cache", precision)
                  for r in runs)
    once = dataset_costs(name, precision=precision, source="cache", protocol=protocol, backbone=bb)
    n_train_reads = len(runs)
    if fused:
        from .fused import group_specs

        n_train_reads = len(group_specs(runs))
    reads = (once["cache_read_bytes"] + n_train_reads * once["train_read_bytes"]
             + len(runs) * once["val_read_bytes"])
    read_s = reads / REFERENCE["disk_bytes_per_s"]
    val_s = len(runs) * once["val_gpu_s"]
    eval_s = len(runs) * once["eval_gpu_s"]
    return {"dataset": dataset, "runs": len(runs), "train_reads": n_train_reads,
            "cache_h": once["cache_gpu_s"] / 3600, "train_h": train_s / 3600,
            "validation_h": val_s / 3600, "eval_h": eval_s / 3600, "disk_read_h": read_s / 3600,
            "total_h": (once["cache_gpu_s"] + train_s + val_s + eval_s + read_s) / 3600}


def backbone_table(datasets: Iterable[str] = tuple(DATASET_FACTS), backbones: Iterable[str] | None = None, *,
                   precision: str = "fp32", source: str = "cache", protocol: str = "original") -> Any:
    """A pandas DataFrame, one row per dataset and backbone: the backbone's shape, its block GFLOPs per 224 px image
    (``block_gflops``) and their ratio to ViT-B/8's, images/s at 224 px, the feature store, one paper run's GPU
    minutes and, where the study has a preset for that dataset and backbone, the dimension sweep's GPU hours.
    ``basis`` says which numbers are measured (ViT-B/8 at 224 px) and which are scaled from them by FLOPs
    (estimates).

    backbones: names of ``BACKBONE_SHAPES``; None = per dataset, the paper's backbone and those of the study's
    presets for it (the extended study's DINOv2 / DINOv3).
    """
    from .sweep import STUDY_DIMS
    from .training import PRESETS

    chosen = None if backbones is None else list(backbones)
    anchor = vit_flops(REFERENCE["backbone"], REFERENCE["res"])
    rows = []
    for name in datasets:
        check_choice("datasets", name, DATASET_FACTS)
        of_presets = [PRESETS[p]["backbone"] for p in STUDY_DIMS if PRESETS[p]["dataset"] == name]
        for bb in chosen if chosen is not None else list(dict.fromkeys([DATASET_FACTS[name].backbone, *of_presets])):
            width, patch, blocks = _shape(bb)
            c = dataset_costs(name, precision=precision, source=source, protocol=protocol, backbone=bb)
            gpu = c["cache_gpu_s"] + c["train_gpu_s"] + c["val_gpu_s"] + c["eval_gpu_s"]
            presets = [p for p in STUDY_DIMS if PRESETS[p]["dataset"] == name and PRESETS[p]["backbone"] == bb]
            rows.append({
                "dataset": name, "backbone": bb, "C": width, "patch": patch, "blocks": blocks,
                "tokens at 224 px": _tokens(bb, 224), "eval px": eval_res(bb),
                "GFLOPs per image": block_gflops(bb, 224), "FLOPs vs ViT-B/8": vit_flops(bb, 224) / anchor,
                "images/s": throughput(bb, 224, precision), "feature store GB": c["feature_store_bytes"] / 1e9,
                "paper run GPU min": gpu / 60,
                "sweep GPU h": study_hours(presets[0], precision=precision, protocol=protocol)["total_h"]
                if presets else math.nan,
                "preset": presets[0] if presets else "",
                "basis": "anchor: measured on an H200 at 224 px" if bb == REFERENCE["backbone"]
                else "estimate: scaled by FLOPs",
            })
    return pd.DataFrame(rows)


def format_bytes(n: float) -> str:
    """1234567 -> '1.2 MB' (decimal units, as disks are sold)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000.0
    return f"{n:.1f} TB"  # pragma: no cover - loop always returns


def cost_table(datasets: Iterable[str] = tuple(DATASET_FACTS), *, precision: str = "fp32",
               source: str = "cache", protocol: str = "original") -> Any:
    """A pandas DataFrame, one row per dataset: disk per stage (GB), GPU minutes per stage (validation included),
    disk reads (GB and minutes at ``REFERENCE["disk_bytes_per_s"]``) and the totals; wall = GPU + reads."""
    rows = []
    for name in datasets:
        c = dataset_costs(name, precision=precision, source=source, protocol=protocol)
        disk = c["download_bytes"] + c["five_crop_bytes"] + c["feature_store_bytes"] + c["knn_bytes"]
        gpu = c["cache_gpu_s"] + c["train_gpu_s"] + c["val_gpu_s"] + c["eval_gpu_s"]
        rows.append({
            "dataset": name, "backbone": c["backbone"], "train items": c["train_items"],
            "val images": c["val_images"],
            "download GB": c["download_bytes"] / 1e9, "five-crop GB": c["five_crop_bytes"] / 1e9,
            "feature store GB": c["feature_store_bytes"] / 1e9, "kNN MB": c["knn_bytes"] / 1e6,
            "disk total GB": disk / 1e9,
            "caching GPU min": c["cache_gpu_s"] / 60, "training GPU min": c["train_gpu_s"] / 60,
            "validations": c["validations"], "validation GPU min": c["val_gpu_s"] / 60,
            "evaluation GPU min": c["eval_gpu_s"] / 60, "GPU total min": gpu / 60,
            "disk reads GB": c["read_bytes"] / 1e9, "disk read min": c["read_s"] / 60,
            "wall total min": (gpu + c["read_s"]) / 60,
        })
    return pd.DataFrame(rows)
