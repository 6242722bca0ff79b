"""What a training run reads: its feature stores (checked against the config), the batch schedule, the features of
a batch (cached, or computed live from the stored images) and, for the projection baselines, the fitted projection.

- ``open_training_store(store, param)``: a FeatureStore or the path of one (a missing cache names the fix);
  ``check_stores(cfg, train_store, val_store)`` returns (C, K) after checking dataset, backbone, width and classes.
- ``batch_indices(n, batch_size, step, seed)``: the items of a step, stateless in the step (epochs of a seeded
  permutation, the last batch kept short as the reference's ``drop_last=False``): runs of the same seed and batch
  size share the schedule, which is what lets a fused sweep (``stego_core.fused``) feed them from one batch.
- ``FeatureSource``: feature / label access for one store, preloaded onto the device when small.
- ``fit_run_projection``: the PCA / RP / h-NNE projection of a baseline run (spec §8.3).
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .backbones import extract_features, load_backbone
from .cache import open_store
from .config import StegoError, artifacts_root
from .data import normalize
from .projections import fit_projection

__all__ = ["open_training_store", "check_stores", "batch_indices", "FeatureSource", "live_backbone",
           "fit_run_projection"]


def open_training_store(store: Any, param: str) -> Any:
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


def check_stores(cfg: Any, train_store: Any, val_store: Any) -> tuple[int, int]:
    """(feature dimension C, number of classes K) of a train/val store pair that fits ``cfg`` (else StegoError)."""
    for param, store in (("train_store", train_store), ("val_store", val_store)):
        if len(store) < 1:
            raise StegoError(f"{param}: the feature store at {getattr(store, 'path', '?')} is empty")
        meta = store.meta
        for key, want in (("dataset", cfg.dataset), ("backbone", cfg.backbone)):
            have = meta.get(key)
            if have is not None and have != want:
                raise StegoError(f"{param}: the store holds {key} {have!r} but the config asks for {want!r}")
    in_dim = int(train_store.meta.get("dim", train_store.dim))
    val_dim = int(val_store.meta.get("dim", val_store.dim))
    if in_dim != val_dim:
        raise StegoError(f"val_store: feature dimension {val_dim} differs from the training store's {in_dim}")
    k = int(train_store.meta.get("n_classes", train_store.n_classes))
    kv = int(val_store.meta.get("n_classes", val_store.n_classes))
    if k != kv:
        raise StegoError(f"val_store: {kv} classes, but the training store has {k}")
    return in_dim, k


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> Tensor:
    """Item indices of training step ``step`` (0-based): epochs of a seeded permutation, last batch kept short
    (``drop_last=False``). Stateless in ``step``, so resuming needs no sampler state."""
    per_epoch = -(-n // batch_size)
    epoch, pos = divmod(step, per_epoch)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=gen)
    return perm[pos * batch_size:(pos + 1) * batch_size]


class FeatureSource:
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


def live_backbone(store: Any, backbone: nn.Module | None, device: torch.device) -> nn.Module:
    """The backbone for ``feature_source="live"``: the given one, else the store's own, on ``device``."""
    if backbone is not None:
        return backbone.to(device)
    meta = store.meta
    return load_backbone(meta["backbone"], weights=meta.get("weights")).to(device)


def fit_run_projection(cfg: Any, store: Any, in_dim: int, root, progress: bool) -> Any:
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
