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

import contextlib
import dataclasses
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .backbones import BACKBONES
from .config import METHODS, PROTOCOLS, StegoError, check_choice, check_float, check_int, resolve_device
from .guards import artifact_lock
from .knn import require_knn
from .runlog import LOGGERS, make_logger
from .train_features import FeatureSource, check_stores, live_backbone, open_training_store
from .train_loop import (
    RunSlot,
    TrainResult,
    finish_slot,
    prepare_slot,
    run_dir_for,
    run_group,
    start_state,
    validation_steps,
)

_Features = FeatureSource  # the name the tests spy on

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
    "train_group",
    "fuse_key",
    "run_dir_for",
    "resolve_device",
    "validation_steps",
]

FEATURE_SOURCES = ("cache", "live")


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
    # reach the validation plateau (at 400 steps with the old rates the probes still gained up to 7 mIoU; measured
    # with these settings on 240 scenes: STEGO D = 24 cluster mIoU near 61 from step 600 on, best at 690 of 870,
    # raw features best at 270; the trained head's code correlations were positive for .73 of kNN pairs and .25 of
    # random pairs). Batch 8:
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
# training


def fuse_key(cfg: TrainConfig) -> tuple:
    """Runs with equal keys (on the same stores) can train as one group: the batch schedule (seed, batch size,
    steps), the validation schedule, the kNN partners' table and the feature source. h-NNE trains on its own
    projected copy of the store, so each h-NNE run is a group of its own."""
    own = (cfg.method, cfg.code_dim) if cfg.method == "hnne" else ()
    return (cfg.seed, cfg.batch_size, cfg.steps, cfg.val_freq, cfg.val_batch_size, cfg.protocol, cfg.feature_source,
            cfg.n_neighbors, *own)


def train(cfg: TrainConfig, *, train_store: Any, val_store: Any, root: str | os.PathLike | None = None,
          progress: bool = True, resume: bool = True, backbone: nn.Module | None = None,
          callback: Callable[[int, dict[str, float]], None] | None = None, max_steps_this_call: int | None = None,
          preload_mb: int = 2048, device: str | torch.device = "cpu", logger: str = "none") -> TrainResult:
    """Train one run (see the module docstring) and return its ``TrainResult``.

    train_store / val_store: FeatureStores (or paths) of the training and validation split; the training store
      needs its kNN table (``01_features`` builds it).
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
    logger: live logs of the run, "none" or "tensorboard" (event files in ``<run folder>/tensorboard``:
      training losses, validation metrics, example predictions; ``stego_core.runlog``); not part of the run's key.
    """
    if not isinstance(cfg, TrainConfig):
        raise StegoError(f"cfg: expected a TrainConfig (see make_config), got {type(cfg).__name__}")
    group_callback = None
    if callback is not None:
        def group_callback(step: int, logs: dict) -> None:
            callback(step, next(iter(logs.values()), {}))
    return _train_group([cfg], train_store=train_store, val_store=val_store, root=root, progress=progress,
                        resume=resume, backbone=backbone, callback=group_callback,
                        max_steps_this_call=max_steps_this_call, preload_mb=preload_mb, device=device,
                        own_rng=False, logger=logger)[0]


def train_group(cfgs: Sequence[TrainConfig], *, train_store: Any, val_store: Any,
                root: str | os.PathLike | None = None, progress: bool = True, resume: bool = True,
                backbone: nn.Module | None = None, callback: Callable[[int, dict], None] | None = None,
                max_steps_this_call: int | None = None, preload_mb: int = 2048,
                device: str | torch.device = "cpu", logger: str = "none") -> list[TrainResult]:
    """Train several runs on the same stores in one pass over the batches (a fused sweep) and return their
    ``TrainResult`` in the order of ``cfgs``. Runs with equal ``fuse_key`` share every step's batch (read once;
    PCA / RP runs projected together, probe-only runs train only their probes); each keeps its own
    initialisation, random generators, optimisers, loss, run folder, checkpoints and results, so each run ends
    with the weights it would have trained alone (up to float rounding of the joint projection). Arguments as
    ``train``; ``callback(step, {run_name: logs})`` after every step of a group."""
    cfgs = list(cfgs)
    if not cfgs or not all(isinstance(c, TrainConfig) for c in cfgs):
        raise StegoError("cfgs: expected a non-empty list of TrainConfig (see make_config)")
    return _train_group(cfgs, train_store=train_store, val_store=val_store, root=root, progress=progress,
                        resume=resume, backbone=backbone, callback=callback, max_steps_this_call=max_steps_this_call,
                        preload_mb=preload_mb, device=device, own_rng=True, logger=logger)


def _train_group(cfgs: list[TrainConfig], *, train_store, val_store, root, progress, resume, backbone, callback,
                 max_steps_this_call, preload_mb, device, own_rng: bool, logger: str = "none") -> list[TrainResult]:
    check_choice("logger", logger, LOGGERS)
    if max_steps_this_call is not None:
        check_int("max_steps_this_call", max_steps_this_call, minimum=1)
    dev = resolve_device(device)
    train_store = open_training_store(train_store, "train_store")
    val_store = open_training_store(val_store, "val_store")
    dims = (0, 0)
    for i, cfg in enumerate(cfgs):
        dims = check_stores(cfg, train_store, val_store)
        if cfg.method == "dino" and cfg.code_dim != dims[0]:
            cfgs[i] = dataclasses.replace(cfg, code_dim=dims[0])  # the raw features are the code
    if len({c.run_name + str(c.to_dict()) for c in cfgs}) != len(cfgs):
        raise StegoError("cfgs: the same run appears twice; expected distinct runs")
    with contextlib.ExitStack() as locks:  # one writer per run: a second process waits for these runs
        for cfg in cfgs:
            run_dir = run_dir_for(cfg, train_store, val_store, root)
            locks.enter_context(artifact_lock(run_dir, f"the training run {run_dir.name}"))
        return _train_slots(cfgs, train_store, val_store, dims, dev, root=root, progress=progress, resume=resume,
                            backbone=backbone, callback=callback, max_steps_this_call=max_steps_this_call,
                            preload_mb=preload_mb, own_rng=own_rng, logger=logger)


def _train_slots(cfgs: list[TrainConfig], train_store, val_store, dims: tuple[int, int], dev, *, root, progress,
                 resume, backbone, callback, max_steps_this_call, preload_mb, own_rng: bool,
                 logger: str = "none") -> list[TrainResult]:
    """``_train_group`` once the runs' folders are locked."""
    opts = dict(root=root, resume=resume, progress=progress, device=dev)
    slots = [prepare_slot(c, train_store, val_store, dims, **opts) for c in cfgs]
    for slot in slots:
        if slot.result is None:  # a run that trains now streams its logs
            slot.logger = make_logger(logger, slot.run_dir)
    groups: dict[tuple, list[RunSlot]] = {}
    for slot in slots:
        if slot.result is None:
            groups.setdefault(fuse_key(slot.cfg), []).append(slot)
    limit = int(preload_mb) << 20
    for group in groups.values():
        cfg = group[0].cfg
        stego = [s for s in group if s.cfg.method == "stego"]
        knn_table = require_knn(train_store, cfg.protocol, n_neighbors=cfg.n_neighbors) if stego else None
        bb = live_backbone(train_store, backbone, dev) if cfg.feature_source == "live" else None
        train_feats = FeatureSource(group[0].train_src, live_backbone=bb, preload_bytes=limit, device=dev)
        val_feats = FeatureSource(group[0].val_src, live_backbone=bb, preload_bytes=limit, device=dev)
        for slot in group:
            start_state(slot, dims, dev, resume=resume, own_rng=own_rng)
        desc = cfg.run_name if len(group) == 1 else f"{cfg.dataset} s{cfg.seed}: {len(group)} runs"
        run_group(group, train_feats, val_feats, knn_table, max_steps_this_call=max_steps_this_call,
                  callback=callback, progress=progress, desc=desc)
        if not own_rng:
            continue
        torch.set_rng_state(group[-1].state.rng)  # as after training the last run alone
    return [finish_slot(s) for s in slots]
