"""The training loop: STEGO head + probes (or probes alone on a fixed projection), validation, checkpoints, resume.

What one run does (stego-spec.md §2-§5, §7.1, §8.4):

- ``TrainConfig`` is the typed, validated configuration of one run; ``PRESETS`` hold the per-dataset values of
  §9.1 (``cocostuff27``, ``cityscapes``, ``potsdam``) and the embedded ``demo`` (mosaic scenes + EfficientNet-Lite0);
  ``make_config(preset, **overrides)`` builds one.
- ``train(cfg, train_store=..., val_store=...)`` trains on cached backbone features (``feature_source="cache"``, the
  default) or on features computed live from the stored images each step (``"live"``, for comparison with the
  original, which never cached). One step (§5.3): sample a batch (seeded epoch permutation, last batch kept as in
  the reference's ``drop_last=False``), draw one kNN partner per item at rank r ~ U{1..n_neighbors} (a fresh draw
  per access, §4), head forward in train mode (two independent channel dropouts inside the head), the
  correspondence loss, the probe losses on the detached code (hard cluster loss at token resolution, linear
  cross-entropy with logits upsampled to the label size), one backward, Adam steps for head (``lr``), cluster probe
  and linear probe (``probe_lr``).
- Methods other than ``"stego"`` (the study's baselines, §8.1/§8.4) build no head and no correspondence loss: the
  code is a fixed projection of the features (identity for ``"dino"``, PCA / Gaussian RP / h-NNE fitted on a seeded
  random sample of ``n_fit_images`` training items) and only the probes learn, with the identical probe schedule,
  so the comparison is fair. h-NNE, too slow per batch, is applied once to both stores (``projections.project_store``,
  as the study precomputed its h-NNE caches; training batches of random items, validation in order) and training
  reads the projected copies.
- Validation over the whole validation store (§7.1) at the steps ``validation_steps`` gives (below), through the
  same prediction path as every other consumer (a ``stego_core.segmenter.Segmenter`` over the run's modules, scored
  by ``stego_core.evaluation.evaluate_batches``): code upsampled bilinearly to the label resolution, cluster and
  linear predictions, pooled confusion matrices with Hungarian (cluster) and identity (linear) assignment. The best
  checkpoint by validation cluster mIoU and the last one (the final weights, saved after the last step whether or
  not it validated) are kept in the run folder ``<root>/runs/<dataset>-<method>-d<code_dim>-s<seed>-<hash>/``
  beside ``meta.json``.
- Checkpoints hold the optimiser and RNG states, so a run interrupted (crash, kill, ``max_steps_this_call``) and
  resumed ends with the same weights as an uninterrupted one (bit-identical on CPU). ``results.csv`` (tidy rows,
  ``stego_core.results``) and a ``DONE`` marker are written at the end; a finished run is loaded, not retrained.
- ``train(..., device="cuda")`` runs the head, the probes, the projections and every batch on that device (the
  modules are initialised on the CPU first, so the initial weights do not depend on the device, though later
  random draws and float sums do); the device is not part of the run's key. Checkpoints always hold CPU tensors,
  so a run trained on a GPU loads anywhere (``Segmenter.from_run(run_dir, device=...)``).
- The kNN table of the training store is built by the feature stage (``01_features``, ``knn.build_knn``); a missing
  one stops training with the command that builds it (``knn.require_knn``).

When validation runs (``validation_steps``). ``"original"`` reproduces PyTorch Lightning 1.x, which ran the
reference's loop (``Trainer(max_steps=..., val_check_interval=val_freq)``): the interval is counted in batches
*within each epoch* (``_should_check_val_fx``: validate after batch ``i`` of an epoch, 0-based, when
``(i + 1) % val_freq == 0``; the counter restarts with every epoch), and reaching ``max_steps`` adds no validation
of its own. With E = ceil(items / batch_size) batches per epoch that is global steps e·E + j·val_freq (j ≥ 1,
j·val_freq ≤ E). Where PL 1.x would refuse to start (val_freq > E raises a ValueError), we validate once per epoch
at its last batch, which is what STEGO's own ``train_segmentation.py`` falls back to (it drops
``val_check_interval`` already when it exceeds a quarter epoch; stego-studies dropped that rule). Not reproduced:
PL's two-batch sanity check before training (its metrics were never logged). Should a run end before any of those
steps (fewer steps than one interval or epoch), it validates once after its last step, so that every run has a
best checkpoint and results rows; the study never ran that short. ``"corrected"`` validates every ``val_freq``
global steps and after the last step (the final weights are always scored).

Protocols. ``"original"`` copies the reference: the kNN table built from channel-dropped descriptors (§4, quirk 1),
a third channel dropout on the features that make the correspondence tensor F (§1.3, quirk 2), per-batch
standardisation inside PCA/RP/h-NNE (quirk 15), dropped extra-cluster predictions in the metrics. ``"corrected"``
uses the kNN table built without dropout, builds F from the clean features (the head's own two dropouts stay: they
are regularisation, not a quirk), standardises projections with the training statistics, and lets the metrics
count every prediction.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import pickle
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .backbones import BACKBONES, extract_features, load_backbone
from .cache import open_store
from .config import (
    METHODS,
    PROTOCOLS,
    StegoError,
    artifact_dir,
    artifacts_root,
    atomic_write,
    check_choice,
    check_float,
    check_int,
    ensure_writable,
    resolve_device,
    write_json_atomic,
)
from .data import normalize
from .evaluation import evaluate_batches
from .heads import STEGOHead
from .knn import require_knn
from .losses import CorrespondenceLoss
from .probes import ClusterProbe, LinearProbe, linear_probe_loss
from .projections import fit_projection, project_store
from .results import write_rows
from .segmenter import ProjectionCode, Segmenter

__all__ = [
    "METHODS",
    "FEATURE_SOURCES",
    "TrainConfig",
    "PRESETS",
    "preset_for",
    "preset_shifts",
    "NEWER_BACKBONE_PRESETS",
    "scaled_code_dim",
    "make_config",
    "TrainResult",
    "train",
    "run_dir_for",
    "resolve_device",
    "validation_steps",
]

FEATURE_SOURCES = ("cache", "live")
_CKPT_VERSION = 1
_LOG_EVERY = 10  # steps between host syncs for the progress bar and the logged training losses
_CORR_SAMPLES = 20000  # code-correlation values kept per term for the histograms


# ---------------------------------------------------------------------------------------------------------------
# configuration


@dataclass(frozen=True)
class TrainConfig:
    """One training run. Defaults are the reference's shared defaults (spec §9.2); presets set the rest."""

    dataset: str  # dataset name of the feature stores (e.g. "mosaic", "cocostuff27"); part of the run name
    backbone: str  # backbone name of the feature stores (e.g. "efficientnet_lite0", "dino_vitb8")
    method: str = "stego"  # "stego" trains a head; "dino" (raw features), "pca", "rp", "hnne" train probes only
    code_dim: int = 70  # D of the code; for "dino" it is replaced by the feature dimension C of the store
    steps: int = 5000  # optimiser steps (one step = one batch); reference 7000 Coco/Cityscapes, 5000 Potsdam
    batch_size: int = 16  # images per step (each with one kNN partner); reference 32 Coco/Cityscapes, 16 Potsdam
    pos_intra_weight: float = 0.67  # weight of the image-with-itself term
    pos_inter_weight: float = 0.25  # weight of the image-with-kNN-partner term
    neg_inter_weight: float = 0.63  # weight of the image-with-random-image term
    pos_intra_shift: float = 0.18  # shift b of the self term (higher = fewer pairs pulled together)
    pos_inter_shift: float = 0.12  # shift b of the kNN term
    neg_inter_shift: float = 0.46  # shift b of the negative term (higher = more pairs pushed apart)
    pointwise: bool = True  # centre each anchor's feature-correlation row (spec §3.3)
    correspondence_weight: float = 1.0  # weight of the correspondence loss; 0 leaves the head at its random init
    seed: int = 0  # seeds initialisation, batch order, kNN partner ranks, dropout and point sampling
    protocol: str = "original"  # "original" copies the reference's quirks; "corrected" fixes them (module doc)
    feature_source: str = "cache"  # "cache": stored features; "live": backbone on the stored images every step
    val_freq: int = 100  # validate (and checkpoint) every this many steps (original: counted within each epoch)
    lr: float = 5e-4  # Adam learning rate of the head
    probe_lr: float = 5e-3  # Adam learning rate of both probes (hard-coded in the reference)
    n_neighbors: int = 7  # partners are drawn from kNN ranks 1..n_neighbors (rank 0 is the image itself)
    feature_samples: int = 11  # S: S x S sampled points per image in the correspondence loss
    neg_samples: int = 5  # negative partners per image and step
    zero_clamp: bool = True  # clamp code correlations at 0 from below (reference default)
    stabilize: bool = False  # also clamp them at 0.8 from above (reference "stabalize", off)
    extra_clusters: int = 0  # E: cluster-probe centres beyond the K classes (0 in every published run)
    val_batch_size: int = 8  # validation batch (matters for per-batch standardised projections; studies: 8)
    n_fit_images: int = 5000  # training images whose tokens fit PCA / RP / h-NNE (studies: 5000 of a shuffled cache)
    hnne_tokens: int = 1_000_000  # h-NNE is fitted on a uniform sample of this many of those tokens (study: 1e6)

    def __post_init__(self) -> None:
        for name in ("dataset", "backbone"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise StegoError(f"{name}: expected a non-empty name, got {value!r}")
        check_choice("method", self.method, METHODS)
        check_choice("protocol", self.protocol, PROTOCOLS)
        check_choice("feature_source", self.feature_source, FEATURE_SOURCES)
        for name in ("code_dim", "steps", "batch_size", "val_freq", "n_neighbors", "feature_samples",
                     "val_batch_size", "n_fit_images"):
            check_int(name, getattr(self, name), minimum=1)
        check_int("hnne_tokens", self.hnne_tokens, minimum=2)
        for name in ("neg_samples", "extra_clusters"):
            check_int(name, getattr(self, name), minimum=0)
        check_int("seed", self.seed, minimum=0)
        for name in ("pos_intra_weight", "pos_inter_weight", "neg_inter_weight", "pos_intra_shift",
                     "pos_inter_shift", "neg_inter_shift", "correspondence_weight"):
            check_float(name, getattr(self, name))
        for name in ("lr", "probe_lr"):
            if check_float(name, getattr(self, name)) <= 0:
                raise StegoError(f"{name}: expected a positive learning rate, got {getattr(self, name)}")
        for name in ("pointwise", "zero_clamp", "stabilize"):
            if not isinstance(getattr(self, name), bool):
                raise StegoError(f"{name}: expected True or False, got {getattr(self, name)!r}")
        if self.method != "stego" and self.correspondence_weight != 0:
            # the reference errors out for only_dino with a non-zero weight; here it is simply unused (set to 0)
            object.__setattr__(self, "correspondence_weight", 0.0)

    @property
    def run_name(self) -> str:
        """Readable part of the run folder name."""
        return f"{self.dataset}-{self.method}-d{self.code_dim}-s{self.seed}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# The README commands of the released checkpoints (spec §9.1). Coco and Cityscapes train on five-crops
# (crop ratio .5) of the training images at 224 px, Potsdam uncropped at 224 px, and all three validate on the
# uncropped val split at 320 px (§1.4, §6.4, §8.2): those choices belong to the feature caches (the train and val
# stores may differ in resolution; validation upsamples the code to each label's size).
PRESETS: dict[str, dict[str, Any]] = {
    "cocostuff27": dict(
        dataset="cocostuff27", backbone="dino_vitb8", code_dim=90, steps=7000, batch_size=32, pointwise=True,
        pos_intra_weight=0.1, pos_inter_weight=1.0, neg_inter_weight=0.1538476246415498,
        pos_intra_shift=0.12, pos_inter_shift=0.2, neg_inter_shift=1.0, correspondence_weight=1.0,
    ),
    "cityscapes": dict(
        dataset="cityscapes", backbone="dino_vitb8", code_dim=100, steps=7000, batch_size=32, pointwise=False,
        pos_intra_weight=1.0, pos_inter_weight=0.577453483136995, neg_inter_weight=0.9058762625226623,
        pos_intra_shift=0.45828472207, pos_inter_shift=0.1754346515479633, neg_inter_shift=0.31361241889448443,
        correspondence_weight=1.0,
    ),
    "potsdam": dict(
        dataset="potsdam", backbone="dino_vits8", code_dim=70, steps=5000, batch_size=16, pointwise=True,
        pos_intra_weight=0.67, pos_inter_weight=0.25, neg_inter_weight=0.63,
        pos_intra_shift=0.08, pos_inter_shift=0.02, neg_inter_shift=0.76, correspondence_weight=1.0,
    ),
    # Embedded demo (mosaic scenes, EfficientNet-Lite0 stride-16 features, 10 classes; see data.py): tuned the
    # way STEGO's maintainers advise (mhamilton723/STEGO issue 23): shifts such that the kNN pairs' code
    # correlations end mostly positive and the random pairs' mostly at or below zero. From the CocoStuff preset,
    # pos_inter_shift 0.2 -> 0.1 (the demo backbone's kNN pairs have F around 0.17, so 0.2 pushed most of them
    # apart) and neg_inter_weight 0.15 -> 0.63 (Potsdam's weight: a stronger push on random pairs, whose F sits
    # below every kNN pair's shift); the head's lr 5e-4 -> 2e-3 and the probes' 5e-3 -> 2e-2, so that 800 steps
    # reach the validation plateau (at 400 steps with the old rates the probes still gained up to 7 mIoU). Batch 8:
    # the same validation mIoU within about a point as 16 at half the time on 2 cores. With 480 training scenes
    # an epoch is 60 steps, so the original protocol (PyTorch Lightning 1.x) validates 13 times in 800 steps.
    # h-NNE fits on 12000 tokens of the 240 fitting scenes (240 x 14 x 14 = 47040): about the quarter the study's
    # 1e6 of 5000 x 28 x 28 tokens was; on all tokens one fit took about a minute here.
    "demo": dict(
        dataset="mosaic", backbone="efficientnet_lite0", code_dim=24, steps=800, batch_size=8, pointwise=True,
        pos_intra_weight=0.1, pos_inter_weight=1.0, neg_inter_weight=0.63,
        pos_intra_shift=0.12, pos_inter_shift=0.1, neg_inter_shift=1.0, correspondence_weight=1.0,
        val_freq=100, lr=2e-3, probe_lr=2e-2, n_fit_images=240, hnne_tokens=12_000,
    ),
}


# Beyond the paper (the extended study, book page "Beyond the paper: newer backbones"): each paper preset on a DINOv2
# and a DINOv3 backbone of the paper's size for that dataset (ViT-B for COCO-Stuff and Cityscapes, ViT-S for Potsdam)
# and, for Potsdam's aerial tiles, the DINOv3 ViT-L trained on satellite images (SAT-493M). DINOv2 is the variant
# with registers: the plain DINOv2 grows high-norm artefact tokens in background patches ("Vision Transformers Need
# Registers"), and STEGO distils exactly those patch-to-patch feature correlations. Everything but the backbone and
# the code dimension is the paper preset's; the code dimension scales with the backbone's width C,
# round(D_paper * C / C_paper): the paper's 90 / 100 / 70 at equal width, 187 on the 1024-wide ViT-L.
NEWER_BACKBONE_PRESETS: dict[str, tuple[str, str]] = {  # preset -> (paper preset, backbone)
    "cocostuff27_dinov2": ("cocostuff27", "dinov2_vitb14_reg"),
    "cocostuff27_dinov3": ("cocostuff27", "dinov3_vitb16"),
    "cityscapes_dinov2": ("cityscapes", "dinov2_vitb14_reg"),
    "cityscapes_dinov3": ("cityscapes", "dinov3_vitb16"),
    "potsdam_dinov2": ("potsdam", "dinov2_vits14_reg"),
    "potsdam_dinov3": ("potsdam", "dinov3_vits16"),
    "potsdam_dinov3_sat": ("potsdam", "dinov3_vitl16_sat"),
}


def scaled_code_dim(paper_preset: str, backbone: str) -> int:
    """The paper preset's code dimension scaled to ``backbone``'s width: round(D * C_backbone / C_paper)."""
    check_choice("paper_preset", paper_preset, PRESETS)
    check_choice("backbone", backbone, BACKBONES)
    paper = PRESETS[paper_preset]
    return int(round(paper["code_dim"] * BACKBONES[backbone].dim / BACKBONES[paper["backbone"]].dim))


PRESETS.update({name: {**PRESETS[paper], "backbone": backbone, "code_dim": scaled_code_dim(paper, backbone)}
                for name, (paper, backbone) in NEWER_BACKBONE_PRESETS.items()})


def preset_for(dataset: str, backbone: str) -> str | None:
    """The name of the first preset (``PRESETS``) made for this dataset and backbone, or None."""
    return next((name for name, p in PRESETS.items() if p["dataset"] == dataset and p["backbone"] == backbone), None)


def preset_shifts(preset: str) -> dict[str, float]:
    """The three shifts of a preset by pair type: ``{"self": pos_intra_shift, "knn": pos_inter_shift,
    "random": neg_inter_shift}`` (the pair types of ``knn.pair_statistics``)."""
    check_choice("preset", preset, PRESETS)
    cfg = make_config(preset)
    return {"self": cfg.pos_intra_shift, "knn": cfg.pos_inter_shift, "random": cfg.neg_inter_shift}


def make_config(preset: str, **overrides: Any) -> TrainConfig:
    """``TrainConfig`` from a preset name (``PRESETS``) with field overrides, validated."""
    check_choice("preset", preset, PRESETS)
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        hint = "; device is an argument of train(), not a config field" if "device" in unknown else ""
        raise StegoError(f"overrides: unknown TrainConfig field(s) {', '.join(unknown)}; "
                         f"expected some of {', '.join(sorted(fields))}{hint}")
    return TrainConfig(**{**PRESETS[preset], **overrides})


# ---------------------------------------------------------------------------------------------------------------
# results


@dataclass
class TrainResult:
    """The record of one training run that ``train`` returns (also for a finished run that was only loaded)."""

    run_dir: Path  # the run folder (meta.json, best.pt, last.pt, results.csv, DONE)
    config: TrainConfig  # the resolved configuration (code_dim = C for "dino")
    history: Any  # pandas DataFrame: step, split ("train"|"val"), metric (e.g. "loss/total", "cluster/mIoU"), value
    best: dict[str, float]  # step and the four validation metrics at the best cluster-mIoU validation
    last: dict[str, float]  # step and the four validation metrics at the last validation
    segmenter: Segmenter  # the final modules (eval mode): head, fitted projection or identity, and both probes
    code_corr: dict[str, np.ndarray] | None  # "intra"/"inter"/"neg" code-correlation samples of the last step
    checkpoints: dict[str, Path] = field(default_factory=dict)  # "best", "last"
    completed: bool = True  # False when stopped early by max_steps_this_call


# ---------------------------------------------------------------------------------------------------------------
# small helpers


def _open_store(store: Any, param: str) -> Any:
    """Accept a FeatureStore or a path to one; a missing/incomplete cache gives a StegoError with a hint."""
    if hasattr(store, "read") and hasattr(store, "meta"):
        return store
    if isinstance(store, (str, os.PathLike)):
        try:
            return open_store(store)
        except StegoError as exc:
            raise StegoError(f"{param}: no usable feature cache at {store} ({exc}); build it first with "
                             f"stego_core.cache.cache_features(dataset, split, backbone)") from None
    raise StegoError(f"{param}: expected a FeatureStore or the path of one, got {type(store).__name__}")


def _store_key(store: Any) -> str:
    """What identifies a store in the run hash: its folder name (which carries the feature config hash)."""
    path = getattr(store, "path", None)
    return Path(path).name if path is not None else repr(sorted(getattr(store, "meta", {}).items()))


def run_dir_for(cfg: TrainConfig, train_store: Any, val_store: Any, root=None) -> Path:
    """The keyed run folder of ``cfg`` trained on these stores."""
    key = {"config": cfg.to_dict(), "train_features": _store_key(train_store),
           "val_features": _store_key(val_store)}
    return artifact_dir("runs", cfg.run_name, key, root)


def _cpu(obj: Any) -> Any:
    """``obj`` with every tensor inside (dicts, lists, tuples) moved to the CPU: device-independent checkpoints."""
    if isinstance(obj, Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        out = copy.copy(obj)  # keeps the type and a state dict's _metadata
        for k, v in obj.items():
            out[k] = _cpu(v)
        return out
    if isinstance(obj, list):
        return [_cpu(v) for v in obj]
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(_cpu(v) for v in obj)
    return obj


def _save_atomic(obj: Any, path: Path) -> None:
    """torch.save to a temporary file in the same folder, then rename over ``path``."""
    with atomic_write(path) as fh:
        torch.save(_cpu(obj), fh)


def _pickle_atomic(obj: Any, path: Path) -> None:
    with atomic_write(path) as fh:
        pickle.dump(obj, fh)


def validation_steps(steps: int, val_freq: int, n_items: int, batch_size: int,
                     protocol: str = "original") -> list[int]:
    """The global steps (1-based, ascending) after which a run of ``steps`` steps validates (module docstring).

    "original": PyTorch Lightning 1.x's ``val_check_interval`` counted within each epoch of E = ceil(n_items /
    batch_size) batches (once per epoch, at its last batch, when val_freq > E), nothing extra at the last step.
    "corrected": every ``val_freq`` steps and after the last one. Never empty: a run too short for the rule
    validates after its last step.
    """
    for name, value in (("steps", steps), ("val_freq", val_freq), ("n_items", n_items), ("batch_size", batch_size)):
        check_int(name, value, minimum=1)
    check_choice("protocol", protocol, PROTOCOLS)
    if protocol == "corrected":
        return sorted(set(range(val_freq, steps + 1, val_freq)) | {steps})
    per_epoch = -(-n_items // batch_size)  # batches per epoch (the loader keeps the last, short batch)
    interval = val_freq if val_freq <= per_epoch else per_epoch
    out = [s for s in range(1, steps + 1) if ((s - 1) % per_epoch + 1) % interval == 0]
    return out or [steps]


def _batch_indices(n: int, batch_size: int, step: int, seed: int) -> Tensor:
    """Item indices of training step ``step`` (0-based): epochs of a seeded permutation, last batch kept short
    (``drop_last=False``). Stateless in ``step``, so resuming needs no sampler state."""
    per_epoch = -(-n // batch_size)
    epoch, pos = divmod(step, per_epoch)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=gen)
    return perm[pos * batch_size:(pos + 1) * batch_size]


class _Features:
    """Feature / label access for one store: preloaded when small, else read per batch; live mode runs the
    backbone on the stored (un-normalised uint8) images."""

    def __init__(self, store: Any, *, live_backbone: nn.Module | None, preload_bytes: int,
                 device: torch.device | str | None = None):
        self.store = store
        self.n = len(store)
        self.backbone = live_backbone
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self._cache: dict[str, Tensor] | None = None
        meta = store.meta
        res = int(meta.get("res", 0)) or None
        grid = meta.get("grid")
        c = int(meta.get("dim", getattr(store, "dim", 0)))
        per_item = 4 * c * (int(grid[0]) * int(grid[1]) if grid else 0) + 8 * (res or 0) ** 2
        if live_backbone is not None:
            per_item += 3 * (res or 0) ** 2
        if per_item * self.n <= preload_bytes:  # preloaded onto the device: no host->device copy per step
            self._cache = {k: v.to(self.device) for k, v in self._read(torch.arange(self.n)).items()}

    def _read(self, idx: Tensor) -> dict[str, Tensor]:
        rec = self.store.read(idx.numpy() if isinstance(idx, Tensor) else idx)
        out = {"label": torch.as_tensor(rec["label"]).long()}
        if self.backbone is None:
            out["feats"] = torch.as_tensor(rec["feats"]).float()
        else:
            out["image"] = torch.as_tensor(np.asarray(rec["image"]))
        return out

    def get(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        """(feats [n,C,h,w] float32, label [n,H,W] int64) of items ``idx``, on the device."""
        idx = torch.as_tensor(idx)
        if self._cache is not None:
            rec = {k: v[idx.to(v.device)] for k, v in self._cache.items()}
        else:
            rec = {k: v.to(self.device) for k, v in self._read(idx).items()}
        if self.backbone is None:
            return rec["feats"], rec["label"]
        img = normalize(rec["image"].permute(0, 3, 1, 2).float() / 255.0)  # [n,H,W,3] uint8 -> [n,3,H,W]
        return extract_features(self.backbone, img).float().to(self.device), rec["label"]


def _load_live_backbone(store: Any, backbone: nn.Module | None, device: torch.device) -> nn.Module:
    if backbone is not None:
        return backbone.to(device)
    meta = store.meta
    return load_backbone(meta["backbone"], weights=meta.get("weights")).to(device)


def _make_projection(cfg: TrainConfig, store: Any, in_dim: int, root, progress: bool) -> Any:
    """Fit the baseline's projection on the tokens of ``n_fit_images`` random training items (spec §8.3;
    h-NNE on a sample of ``hnne_tokens`` of those tokens, the study's 1e6 by default). PCA fits are cached under
    ``<root>/projections`` and shared by all dims."""
    standardize = "per_batch" if cfg.protocol == "original" else "train"
    if cfg.method != "rp" and cfg.code_dim > in_dim:
        raise StegoError(f"code_dim: {cfg.method} gives at most the feature dimension {in_dim} components, "
                         f"got {cfg.code_dim}")
    n_tokens = cfg.hnne_tokens if cfg.method == "hnne" else None
    return fit_projection(cfg.method, cfg.code_dim, store, n_images=cfg.n_fit_images, n_tokens=n_tokens,
                          random_state=cfg.seed, root=artifacts_root(root), progress=progress,
                          standardize=standardize)


# ---------------------------------------------------------------------------------------------------------------
# validation


def _validate(segmenter: Segmenter, val: _Features, cfg: TrainConfig) -> dict[str, float]:
    """Cluster and linear mIoU / accuracy over the whole validation store (spec §7.1), in batches of
    ``val_batch_size`` (per-batch standardised projections depend on it), through the common prediction path."""

    def batches():
        for start in range(0, val.n, cfg.val_batch_size):
            feats, label = val.get(torch.arange(start, min(start + cfg.val_batch_size, val.n)))
            yield {"feats": feats, "label": label}

    res = evaluate_batches(segmenter, batches(), protocol=cfg.protocol, progress=False, require_labels=False)
    return {key: float(res[key]) for key in ("cluster/mIoU", "cluster/Accuracy", "linear/mIoU", "linear/Accuracy")}


# ---------------------------------------------------------------------------------------------------------------
# training


def _build_modules(cfg: TrainConfig, in_dim: int, n_classes: int):
    torch.manual_seed(cfg.seed)  # the reference seeds everything once before building the model
    head = None
    if cfg.method == "stego":
        head = STEGOHead(in_dim, cfg.code_dim)
    cluster_probe = ClusterProbe(cfg.code_dim, n_classes + cfg.extra_clusters)
    linear_probe = LinearProbe(cfg.code_dim, n_classes)
    return head, cluster_probe, linear_probe


def _rows_for_results(cfg: TrainConfig, run_id: str, history_rows: list[dict], best: dict) -> list[dict]:
    base = dict(run_id=run_id, dataset=cfg.dataset, backbone=cfg.backbone, method=cfg.method,
                code_dim=cfg.code_dim, seed=cfg.seed, protocol=cfg.protocol, crf=False, split="val")
    rows = []
    for r in history_rows:
        if r["split"] != "val":
            continue
        probe, metric = r["metric"].split("/", 1)
        rows.append({**base, "probe": probe, "metric": metric, "step": r["step"], "value": r["value"],
                     "stage": "train"})
    for key, value in best.items():
        if key == "step":
            continue
        probe, metric = key.split("/", 1)
        rows.append({**base, "probe": probe, "metric": metric, "step": best["step"], "value": value,
                     "stage": "best"})
    return rows


def _history_frame(rows: list[dict]):
    return pd.DataFrame(rows, columns=["step", "split", "metric", "value"])


def _check_stores(cfg: TrainConfig, train_store, val_store) -> tuple[int, int]:
    for param, store in (("train_store", train_store), ("val_store", val_store)):
        if len(store) < 1:
            raise StegoError(f"{param}: the feature store at {getattr(store, 'path', '?')} is empty")
        meta = store.meta
        for key, want in (("dataset", cfg.dataset), ("backbone", cfg.backbone)):
            have = meta.get(key)
            if have is not None and have != want:
                raise StegoError(f"{param}: the store holds {key} {have!r} but the config asks for {want!r}")
    in_dim, val_dim = int(train_store.meta.get("dim", train_store.dim)), int(val_store.meta.get("dim",
                                                                                               val_store.dim))
    if in_dim != val_dim:
        raise StegoError(f"val_store: feature dimension {val_dim} differs from the training store's {in_dim}")
    k, kv = int(train_store.meta.get("n_classes", train_store.n_classes)), int(
        val_store.meta.get("n_classes", val_store.n_classes))
    if k != kv:
        raise StegoError(f"val_store: {kv} classes, but the training store has {k}")
    return in_dim, k


def train(
    cfg: TrainConfig,
    *,
    train_store: Any,
    val_store: Any,
    root: str | os.PathLike | None = None,
    progress: bool = True,
    resume: bool = True,
    backbone: nn.Module | None = None,
    callback: Callable[[int, dict[str, float]], None] | None = None,
    max_steps_this_call: int | None = None,
    preload_mb: int = 2048,
    device: str | torch.device = "cpu",
) -> TrainResult:
    """Train one run (see the module docstring) and return its ``TrainResult``.

    train_store / val_store: FeatureStores (or paths) of the training and validation split; the training store
      needs its kNN table (built and saved if missing).
    root: artifacts root (default ``$STEGO_ARTIFACTS`` or ``<repo>/artifacts``).
    resume: continue from ``last.pt`` if the run folder has one; a run with ``DONE`` is loaded without training.
      ``resume=False`` starts over.
    backbone: the backbone for ``feature_source="live"`` (default: loaded from the store's meta); moved to
      ``device``.
    callback: called as ``callback(step, logs)`` after every step (``logs`` holds the synced training losses on
      logging steps, else is empty); an exception raised there stops the run (resume continues from the last
      checkpoint).
    max_steps_this_call: stop (with a checkpoint) after this many steps of this call; the run stays resumable.
    preload_mb: load a store into memory when its features fit in this many MiB (else read per batch); on a GPU
      a preloaded store lives in GPU memory.
    device: where the head, the probes, the projections and the batches live ("cpu", "cuda", "cuda:1", "mps");
      not part of the run's key (checkpoints hold CPU tensors). A device this machine lacks is a StegoError.
    """
    if not isinstance(cfg, TrainConfig):
        raise StegoError(f"cfg: expected a TrainConfig (see make_config), got {type(cfg).__name__}")
    if max_steps_this_call is not None:
        check_int("max_steps_this_call", max_steps_this_call, minimum=1)
    dev = resolve_device(device)
    train_store = _open_store(train_store, "train_store")
    val_store = _open_store(val_store, "val_store")
    in_dim, n_classes = _check_stores(cfg, train_store, val_store)
    if cfg.method == "dino" and cfg.code_dim != in_dim:
        cfg = dataclasses.replace(cfg, code_dim=in_dim)  # the raw features are the code

    run_dir = run_dir_for(cfg, train_store, val_store, root)
    ensure_writable(run_dir, "root")
    last_path, best_path, done_path = run_dir / "last.pt", run_dir / "best.pt", run_dir / "DONE"
    if resume and done_path.exists() and last_path.exists():
        return _finished_result(run_dir, cfg, dev)
    if not resume:
        for p in (done_path, last_path, best_path, run_dir / "results.csv", run_dir / "code_corr.npz"):
            p.unlink(missing_ok=True)

    write_json_atomic(run_dir / "meta.json", {
        "stage": "runs", "run_id": run_dir.name, "config": cfg.to_dict(), "in_dim": in_dim,
        "n_classes": n_classes, "train_store": str(getattr(train_store, "path", "")),
        "val_store": str(getattr(val_store, "path", "")), "train_store_meta": dict(train_store.meta),
        "class_names": list(train_store.meta.get("class_names", [])), "status": "running",
    })

    live = cfg.feature_source == "live"
    if live and cfg.method == "hnne":
        raise StegoError("feature_source: 'live' is not available for method 'hnne' (its projection is "
                         "precomputed over the cached features, as in the study); use feature_source='cache'")
    knn_table = require_knn(train_store, cfg.protocol, n_neighbors=cfg.n_neighbors) if cfg.method == "stego" else None

    # ---- projection (baselines) ------------------------------------------------------------------------------
    projection = None
    proj_path = run_dir / "projection.pkl"
    if cfg.method in ("pca", "rp", "hnne"):
        if resume and proj_path.exists():
            with open(proj_path, "rb") as fh:
                projection = pickle.load(fh)
        else:
            projection = _make_projection(cfg, train_store, in_dim, root, progress)
            _pickle_atomic(projection, proj_path)
    train_src, val_src = train_store, val_store
    if cfg.method == "hnne":
        # h-NNE is too slow to apply per batch: like the study, precompute projected copies of both stores
        # (batches of 512, per-batch standardisation under the original protocol) and train on those. The study's
        # training cache was shuffled, so its batches were random mixes; its validation cache was in order.
        train_src = project_store(projection, train_store, artifacts_root(root), shuffle=True, progress=progress)
        val_src = project_store(projection, val_store, artifacts_root(root), shuffle=False, progress=progress)

    bb = _load_live_backbone(train_store, backbone, dev) if live else None
    limit = int(preload_mb) << 20
    train_feats = _Features(train_src, live_backbone=bb, preload_bytes=limit, device=dev)
    val_feats = _Features(val_src, live_backbone=bb, preload_bytes=limit, device=dev)

    # ---- model, optimisers, loss ---------------------------------------------------------------------------
    head, cluster_probe, linear_probe = _build_modules(cfg, in_dim, n_classes)  # initialised on the CPU
    for m in (head, cluster_probe, linear_probe):
        if m is not None:
            m.to(dev)
    # the code map of the run on raw features (the returned segmenter), and the one each step applies (h-NNE
    # trains and validates on its projected stores, where the code is the stored features)
    code_map = head if head is not None else ProjectionCode(projection) if projection is not None else nn.Identity()
    step_map = nn.Identity() if cfg.method == "hnne" else code_map
    step_segmenter = Segmenter(step_map, cluster_probe, linear_probe)
    opt_head = torch.optim.Adam(head.parameters(), lr=cfg.lr) if head is not None else None
    opt_cluster = torch.optim.Adam(cluster_probe.parameters(), lr=cfg.probe_lr)
    opt_linear = torch.optim.Adam(linear_probe.parameters(), lr=cfg.probe_lr)
    loss_fn = None
    if head is not None:
        loss_fn = CorrespondenceLoss(
            pos_intra_weight=cfg.pos_intra_weight, pos_inter_weight=cfg.pos_inter_weight,
            neg_inter_weight=cfg.neg_inter_weight, pos_intra_shift=cfg.pos_intra_shift,
            pos_inter_shift=cfg.pos_inter_shift, neg_inter_shift=cfg.neg_inter_shift, pointwise=cfg.pointwise,
            feature_samples=cfg.feature_samples, neg_samples=cfg.neg_samples, zero_clamp=cfg.zero_clamp,
            stabilize=cfg.stabilize)
    partner_gen = torch.Generator().manual_seed(cfg.seed + 1)  # kNN ranks, one fresh draw per access
    torch.manual_seed(cfg.seed + 2)  # global RNG: channel dropout, loss points and negatives

    step, history, best, last_metrics = 0, [], {}, {}
    if resume and last_path.exists():
        ck = torch.load(last_path, map_location="cpu", weights_only=False)
        if ck.get("version") != _CKPT_VERSION or ck.get("config") != cfg.to_dict():
            raise StegoError(f"resume: {last_path} belongs to another configuration or version; "
                             f"pass resume=False to start over")
        if head is not None:
            head.load_state_dict(ck["head"])
            opt_head.load_state_dict(ck["opt_head"])
        cluster_probe.load_state_dict(ck["cluster_probe"])
        linear_probe.load_state_dict(ck["linear_probe"])
        opt_cluster.load_state_dict(ck["opt_cluster"])
        opt_linear.load_state_dict(ck["opt_linear"])
        torch.set_rng_state(ck["rng_torch"])
        if dev.type == "cuda" and ck.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(ck["rng_cuda"], dev)
        partner_gen.set_state(ck["rng_partner"])
        step, history, best, last_metrics = ck["step"], ck["history"], ck["best"], ck["last_metrics"]

    def save_last(done_steps: int) -> None:
        _save_atomic({
            "version": _CKPT_VERSION, "config": cfg.to_dict(), "step": done_steps,
            "head": head.state_dict() if head is not None else None,
            "cluster_probe": cluster_probe.state_dict(), "linear_probe": linear_probe.state_dict(),
            "opt_head": opt_head.state_dict() if opt_head is not None else None,
            "opt_cluster": opt_cluster.state_dict(), "opt_linear": opt_linear.state_dict(),
            "rng_torch": torch.get_rng_state(), "rng_partner": partner_gen.get_state(),
            "rng_cuda": torch.cuda.get_rng_state(dev) if dev.type == "cuda" else None,
            "history": history, "best": best, "last_metrics": last_metrics,
            "in_dim": in_dim, "n_classes": n_classes, "metrics": last_metrics,
        }, last_path)

    def save_best(done_steps: int, metrics: dict) -> None:
        _save_atomic({
            "version": _CKPT_VERSION, "config": cfg.to_dict(), "step": done_steps,
            "head": head.state_dict() if head is not None else None,
            "cluster_probe": cluster_probe.state_dict(), "linear_probe": linear_probe.state_dict(),
            "in_dim": in_dim, "n_classes": n_classes, "metrics": metrics,
        }, best_path)

    # ---- loop ---------------------------------------------------------------------------------------------
    modules = [m for m in (head, cluster_probe, linear_probe) if m is not None]
    for m in modules:
        m.train()
    stop_at = cfg.steps if max_steps_this_call is None else min(cfg.steps, step + max_steps_this_call)
    validate_at = set(validation_steps(cfg.steps, cfg.val_freq, train_feats.n, cfg.batch_size, cfg.protocol))
    saved_at = step if last_path.exists() else None  # the step last.pt holds
    code_corr = None
    bar = tqdm(total=cfg.steps, initial=step, desc=cfg.run_name, disable=not progress, unit="step")
    try:
        while step < stop_at:
            idx = _batch_indices(train_feats.n, cfg.batch_size, step, cfg.seed)
            feats, label = train_feats.get(idx)
            want_corr = step + 1 == cfg.steps
            for opt in (opt_head, opt_cluster, opt_linear):
                if opt is not None:
                    opt.zero_grad(set_to_none=True)
            terms = {}
            if head is not None:
                ranks = torch.randint(1, cfg.n_neighbors + 1, (len(idx),), generator=partner_gen)
                partner = knn_table[idx, ranks]  # [b]: one kNN partner per item, fresh rank draw
                feats_pos, _ = train_feats.get(partner)
                if cfg.protocol == "original":
                    f, code = head.forward_with_feats(feats)  # third dropout on the loss features (§1.3)
                    f_pos, code_pos = head.forward_with_feats(feats_pos)
                else:
                    f, code = feats, head(feats)
                    f_pos, code_pos = feats_pos, head(feats_pos)
                terms = loss_fn(f, f_pos, code, code_pos, return_corr=want_corr)
                loss = cfg.correspondence_weight * terms["total"]
                probe_code = code.detach()
                if want_corr:
                    code_corr = _corr_samples(terms)
            else:
                probe_code = step_map(feats)
                loss = probe_code.new_zeros(())
            cluster_loss, _ = cluster_probe(probe_code)
            linear_loss = _linear_loss(linear_probe(probe_code), label)
            loss = loss + cluster_loss + linear_loss
            loss.backward()
            for opt in (opt_head, opt_cluster, opt_linear):
                if opt is not None:
                    opt.step()
            step += 1
            bar.update(1)

            logs: dict[str, float] = {}
            if step % _LOG_EVERY == 0 or step == cfg.steps:
                logs = {"loss/total": float(loss.detach()), "loss/cluster": float(cluster_loss.detach()),
                        "loss/linear": float(linear_loss.detach())}
                for key in ("pos_intra", "pos_inter", "neg_inter"):
                    if key in terms:
                        logs[f"loss/{key}"] = float(terms[key].detach())
                for key in ("cd_intra", "cd_inter", "cd_neg"):
                    if key in terms:
                        logs[f"cd/{key[3:]}"] = float(terms[key])
                history.extend({"step": step, "split": "train", "metric": k, "value": v} for k, v in logs.items())
                bar.set_postfix(loss=f"{logs['loss/total']:.4f}", refresh=False)

            if step in validate_at:
                metrics = _validate(step_segmenter, val_feats, cfg)
                history.extend({"step": step, "split": "val", "metric": k, "value": v} for k, v in metrics.items())
                last_metrics = {"step": step, **metrics}
                if not best or metrics["cluster/mIoU"] > best["cluster/mIoU"]:
                    best = {"step": step, **metrics}
                    save_best(step, metrics)
                bar.set_postfix(loss=f"{float(loss.detach()):.4f}", val_cluster_mIoU=f"{metrics['cluster/mIoU']:.1f}",
                                refresh=False)
                save_last(step)
                saved_at = step
            if callback is not None:
                callback(step, logs)
        if saved_at != step:
            save_last(step)  # the final weights, or the exact position when stopped by max_steps_this_call
    finally:
        bar.close()

    for m in modules:
        m.eval()
    completed = step >= cfg.steps
    if completed:
        if code_corr is not None:
            _save_npz_atomic(run_dir / "code_corr.npz", code_corr)
        _write_results(cfg, run_dir, history, best)
        meta = _read_meta(run_dir)
        meta.update(status="done", best=best, last=last_metrics)
        write_json_atomic(run_dir / "meta.json", meta)
        (run_dir / "DONE").write_text(time.strftime("%Y-%m-%dT%H:%M:%S\n"))
    segmenter = Segmenter(code_map, cluster_probe, linear_probe, info=_run_info(cfg, run_dir, "last", step))
    return TrainResult(run_dir=run_dir, config=cfg, history=_history_frame(history), best=best,
                       last=last_metrics, segmenter=segmenter.eval(), code_corr=code_corr if completed else None,
                       checkpoints={"best": best_path, "last": last_path}, completed=completed)


def _linear_loss(logits: Tensor, label: Tensor) -> Tensor:
    return linear_probe_loss(logits, label)


def _corr_samples(terms: dict[str, Tensor]) -> dict[str, np.ndarray]:
    """Up to _CORR_SAMPLES values of each code-correlation tensor (seeded subsample, no RNG side effects)."""
    gen = torch.Generator().manual_seed(0)
    out = {}
    for key in ("intra", "inter", "neg"):
        flat = terms[f"corr_{key}"].reshape(-1)
        if flat.numel() > _CORR_SAMPLES:
            flat = flat[torch.randperm(flat.numel(), generator=gen)[:_CORR_SAMPLES].to(flat.device)]
        out[key] = flat.detach().cpu().numpy().astype(np.float32)
    return out


def _save_npz_atomic(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with atomic_write(path) as fh:
        np.savez(fh, **arrays)


def _read_meta(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / "meta.json"
    if not path.exists():
        raise StegoError(f"run_dir: {run_dir} has no meta.json; expected a folder written by train()")
    return json.loads(path.read_text())


def _write_results(cfg: TrainConfig, run_dir: Path, history: list[dict], best: dict) -> None:
    write_rows(run_dir, _rows_for_results(cfg, run_dir.name, history, best))


def _run_info(cfg: TrainConfig, run_dir: Path, which: str, step: int) -> dict[str, Any]:
    return {"source": "run", "run_dir": str(run_dir), "run_id": run_dir.name, "checkpoint": which, "step": step,
            "dataset": cfg.dataset, "backbone": cfg.backbone, "method": cfg.method, "code_dim": cfg.code_dim,
            "seed": cfg.seed, "protocol": cfg.protocol}


def _finished_result(run_dir: Path, cfg: TrainConfig, device: torch.device) -> TrainResult:
    """TrainResult of a run that has DONE: modules from last.pt (final weights), history from the checkpoint."""
    segmenter = Segmenter.from_run(run_dir, "last", device=device)
    ck = torch.load(run_dir / "last.pt", map_location="cpu", weights_only=False)
    corr_path = run_dir / "code_corr.npz"
    code_corr = None
    if corr_path.exists():
        with np.load(corr_path) as z:
            code_corr = {k: z[k] for k in z.files}
    return TrainResult(run_dir=run_dir, config=cfg, history=_history_frame(ck["history"]), best=ck["best"],
                       last=ck["last_metrics"], segmenter=segmenter, code_corr=code_corr,
                       checkpoints={"best": run_dir / "best.pt", "last": run_dir / "last.pt"}, completed=True)
