"""Nearest-neighbour table: for every image, the images whose pooled backbone features are most alike.

STEGO draws the positive partner of image ``i`` from ``nns[i, 1..7]`` (spec §4). The descriptor of an image is the
spatial mean of its token map, L2-normalised; neighbours are ranked by cosine similarity (descending, so column 0 is
normally the image itself), computed a block of rows at a time so memory stays O(chunk_size · N).

Protocols (spec §4 and §10 quirk 1):
- ``"original"``: the reference computed the descriptors with the featurizer left in training mode, so its channel
  dropout (Dropout2d, p = 0.1: whole channels of each image zeroed, survivors scaled by 1/0.9) was active. We
  reproduce that on the cached eval-mode features with a seeded mask per image. The mask is constant over space, so
  dropping channels of the map and then pooling equals pooling and then dropping the same channels; we do the latter.
  The masks come from ``numpy.random.default_rng(seed)`` drawn in store order, so they do not depend on batch size.
- ``"corrected"``: no dropout.

The table lives beside the features as ``<store.path>/knn-<protocol>.npy`` (int64 [N, k]) with
``knn-<protocol>.json`` (protocol, k, requested k, seed, n_items) written after it; k is capped at N. The feature
stage (notebook ``01_features``) builds it (``build_knn``); training only reads it (``require_knn``), and a missing
table is an error that names the feature-stage command which builds it.
"""
from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .config import PROTOCOLS, StegoError, check_choice, check_int, stage_command
from .costs import knn_bytes
from .guards import artifact_lock, disk_full_guard
from .losses import tensor_correlation

DROPOUT_P = 0.1  # the reference featurizer's Dropout2d probability


def _knn_files(protocol: str) -> tuple[str, str]:
    return f"knn-{protocol}.npy", f"knn-{protocol}.json"


def nearest_neighbors(feats: torch.Tensor | np.ndarray, k: int = 30, *, chunk_size: int = 1024,
                      progress: bool = False) -> torch.Tensor:
    """Indices of the ``k`` most similar items per item: LongTensor [N, k], most similar first.

    feats: [N, C, h, w] token maps (spatially averaged here) or already pooled descriptors [N, C].
    Similarity is the cosine of the pooled descriptors; rows are processed ``chunk_size`` at a time.
    ``k`` larger than N is capped at N (with a warning).
    """
    x = torch.as_tensor(feats)
    if x.ndim == 4:
        pooled = x.float().mean(dim=(2, 3))  # [N,C,h,w] -> [N,C]
    elif x.ndim == 2:
        pooled = x.float()
    else:
        raise StegoError(f"feats: expected a tensor [N,C,h,w] (or pooled [N,C]), got shape {tuple(x.shape)}")
    check_int("k", k, minimum=1)
    check_int("chunk_size", chunk_size, minimum=1)
    n = pooled.shape[0]
    if n < 1:
        raise StegoError("feats: expected at least one item, got N = 0")
    if k > n:
        warnings.warn(f"k: {k} neighbours asked for but there are only {n} items; using k = {n}", stacklevel=2)
        k = n
    desc = F.normalize(pooled, dim=1)  # [N,C], unit rows
    out = torch.empty((n, k), dtype=torch.long)
    for start in tqdm(range(0, n, chunk_size), desc="kNN", unit="block", disable=not progress):
        sims = desc[start:start + chunk_size] @ desc.T  # [n_rows, C] x [C, N] -> [n_rows, N]
        out[start:start + sims.shape[0]] = sims.topk(k, dim=1).indices
    return out


def pooled_descriptors(store: Any, *, protocol: str = "original", seed: int = 0, batch_size: int = 64,
                       progress: bool = True) -> torch.Tensor:
    """Per-image descriptors [N, C] (spatial means, not yet normalised) from a FeatureStore or a tensor [N,C,h,w].

    protocol "original" applies the reference's channel dropout (see the module docstring), "corrected" does not.
    """
    check_choice("protocol", protocol, PROTOCOLS)
    check_int("seed", seed, minimum=0)
    check_int("batch_size", batch_size, minimum=1)
    if isinstance(store, (torch.Tensor, np.ndarray)):
        all_feats = torch.as_tensor(store)
        if all_feats.ndim != 4:
            raise StegoError(f"store: expected a FeatureStore or features [N,C,h,w], got shape "
                             f"{tuple(all_feats.shape)}")
        batches = (all_feats[i:i + batch_size].float() for i in range(0, all_feats.shape[0], batch_size))
        total = -(-all_feats.shape[0] // batch_size)
    elif hasattr(store, "iter_batches"):
        batches = (b["feats"] for b in store.iter_batches(batch_size))
        total = -(-len(store) // batch_size)
    else:
        raise StegoError(f"store: expected a FeatureStore or features [N,C,h,w], got {type(store).__name__}")
    rng = np.random.default_rng(seed)
    parts = []
    for feats in tqdm(batches, total=total, desc=f"kNN descriptors ({protocol})", unit="batch",
                      disable=not progress):
        pooled = feats.mean(dim=(2, 3))  # [b,C,h,w] -> [b,C]
        if protocol == "original":
            keep = rng.random(tuple(pooled.shape)) >= DROPOUT_P  # [b,C]: channel kept with probability 0.9
            pooled = pooled * torch.from_numpy(keep).to(pooled.dtype) / (1.0 - DROPOUT_P)
        parts.append(pooled)
    return torch.cat(parts)


def build_knn(store: Any, k: int = 30, *, protocol: str = "original", seed: int = 0, batch_size: int = 64,
              chunk_size: int = 1024, progress: bool = True) -> torch.Tensor:
    """Compute the kNN table of a FeatureStore and save it beside it; an existing table with the same settings
    (protocol, k, seed, length) is loaded instead. Returns LongTensor [N, min(k, N)]."""
    check_choice("protocol", protocol, PROTOCOLS)
    check_int("k", k, minimum=1)
    n = len(store)
    k_eff = min(k, n)
    npy, info_name = _knn_files(protocol)
    info = {"protocol": protocol, "k": k_eff, "k_requested": k, "seed": seed, "n_items": n,
            "dropout_p": DROPOUT_P if protocol == "original" else 0.0}
    if store.has_file(npy) and store.has_file(info_name):
        if store.read_json(info_name) == info:
            return load_knn(store, protocol)
    local = isinstance(getattr(store, "path", None), Path)  # object storage has no file locks
    lock = artifact_lock(store.path, f"the kNN table ({protocol})", name=f"knn-{protocol}") if local else None
    with lock or contextlib.nullcontext():
        if store.has_file(npy) and store.has_file(info_name) and store.read_json(info_name) == info:
            return load_knn(store, protocol)  # another process built it while we waited
        return _build_knn(store, info, k, k_eff, protocol=protocol, seed=seed, batch_size=batch_size,
                          chunk_size=chunk_size, progress=progress)


def _build_knn(store: Any, info: dict, k: int, k_eff: int, *, protocol: str, seed: int, batch_size: int,
               chunk_size: int, progress: bool) -> torch.Tensor:
    n = len(store)
    npy, info_name = _knn_files(protocol)
    if k > n:
        warnings.warn(f"k: {k} neighbours asked for but the store has only {n} items; using k = {n}", stacklevel=2)
    store.remove_file(info_name)  # the info file is written last: it vouches for the table beside it
    desc = pooled_descriptors(store, protocol=protocol, seed=seed, batch_size=batch_size, progress=progress)
    nns = nearest_neighbors(desc, k_eff, chunk_size=chunk_size, progress=progress)
    with disk_full_guard(store.path, knn_bytes(n, k_eff), f"the kNN table ({protocol})"):
        store.save_array(npy, nns.numpy().astype(np.int64))
        store.write_json(info_name, info)
    return nns


def load_knn(store: Any, protocol: str = "original") -> torch.Tensor:
    """The saved kNN table of a FeatureStore as LongTensor [N, k]; StegoError if missing or of the wrong length."""
    check_choice("protocol", protocol, PROTOCOLS)
    npy, _ = _knn_files(protocol)
    where = f"{str(store.path).rstrip('/')}/{npy}"
    if not store.has_file(npy):
        raise StegoError(f"store: no kNN table at {where}; build it with "
                         f"stego_core.knn.build_knn(store, protocol={protocol!r})")
    nns = store.load_array(npy)
    if nns.ndim != 2 or nns.shape[0] != len(store):
        raise StegoError(f"store: kNN table of the wrong length: {where} has {nns.shape[0] if nns.ndim else 0} rows "
                         f"but the store holds {len(store)} items; rebuild it with build_knn(store, "
                         f"protocol={protocol!r})")
    if nns.size and (nns.min() < 0 or nns.max() >= len(store)):
        raise StegoError(f"store: the kNN table at {where} points outside the store's {len(store)} items; "
                         f"rebuild it with build_knn")
    return torch.from_numpy(nns.astype(np.int64))


def require_knn(store: Any, protocol: str = "original", *, n_neighbors: int = 1) -> torch.Tensor:
    """The saved kNN table of a training store, checked to serve partners of ranks 1..``n_neighbors``.

    A missing table is a StegoError naming the feature-stage command that builds it (``01_features`` with the
    store's dataset, backbone, resolution, crop, weights and options, and this protocol): training never builds one.
    """
    check_choice("protocol", protocol, PROTOCOLS)
    npy, _ = _knn_files(protocol)
    if hasattr(store, "has_file") and not store.has_file(npy):
        meta = dict(getattr(store, "meta", {}) or {})
        command = stage_command("01_features", {
            "dataset": meta.get("dataset"), "backbone": meta.get("backbone"), "weights": meta.get("weights"),
            "res": meta.get("res"), "crop": meta.get("crop"), "dataset_options": meta.get("dataset_options") or None,
            "protocol": protocol})
        raise StegoError(f"knn: the training store {getattr(store, 'path', '')} has no kNN table for protocol "
                         f"{protocol!r}; the feature stage builds it: {command} (or in Python "
                         f"stego_core.knn.build_knn(store, protocol={protocol!r}))")
    table = load_knn(store, protocol)  # StegoError when it does not fit the store
    if table.shape[1] <= n_neighbors:
        raise StegoError(f"n_neighbors: {n_neighbors} needs a kNN table with more than {n_neighbors} columns, the "
                         f"table has {table.shape[1]}; lower n_neighbors or rebuild the table with a larger k")
    return table


PAIR_TYPES = ("self", "knn", "random")  # the three pair types of STEGO's loss: intra, inter (kNN partner), negative


def _token_labels(label: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Label [n,H,W] -> the label at each token's centre [n,h,w] (nearest pixel)."""
    n, height, width = label.shape
    rows = ((torch.arange(grid[0]) + 0.5) * height / grid[0]).long().clamp(max=height - 1)
    cols = ((torch.arange(grid[1]) + 0.5) * width / grid[1]).long().clamp(max=width - 1)
    return label[:, rows][:, :, cols]  # [n,h,w]


def pair_statistics(store: Any, table: torch.Tensor | np.ndarray, *, n_neighbors: int | None = None,
                    n_images: int = 64, points: int = 64, pointwise: bool = True, seed: int = 0) -> Any:
    """Feature correlations F and label agreement of token pairs, per pair type of STEGO's loss.

    For ``n_images`` anchor images drawn from the store (seeded), each is paired with itself, with a partner drawn
    from its kNN ranks 1..``n_neighbors`` (as training draws it; None: STEGO's 7, fewer for a narrower table) and
    with a random other image. For every pair, F is the cosine correlation of all anchor tokens with all partner
    tokens (``losses.tensor_correlation``), centred per anchor token when ``pointwise`` (as the loss centres it);
    ``points`` token pairs are then kept at random.
    Returns a pandas DataFrame with one row per kept token pair: ``pair`` (``PAIR_TYPES``), ``F`` and
    ``same_class`` (both tokens' labels, read at the token centres, are equal and not ignored). The shifts of the
    loss are thresholds on F: a pair is pulled together where F exceeds its term's shift, pushed apart below it.
    """

    n = len(store)
    table = torch.as_tensor(np.asarray(table), dtype=torch.long)
    if n_neighbors is None:
        n_neighbors = max(1, min(7, table.shape[-1] - 1))
    check_int("n_neighbors", n_neighbors, minimum=1)
    check_int("n_images", n_images, minimum=1)
    check_int("points", points, minimum=1)
    if n < 2:
        raise StegoError(f"store: pair statistics need at least 2 images, the store holds {n}")
    if table.ndim != 2 or table.shape[0] != n or table.shape[1] <= n_neighbors:
        raise StegoError(f"table: expected a kNN table [{n}, > {n_neighbors}] for this store, got "
                         f"{tuple(table.shape)}")
    rng = np.random.default_rng(seed)
    anchors = np.sort(rng.choice(n, size=min(n_images, n), replace=False))
    knn_partner = table[anchors, rng.integers(1, n_neighbors + 1, size=anchors.size)].numpy()
    random_partner = (anchors + rng.integers(1, n, size=anchors.size)) % n  # never the anchor itself
    anchor = store.read(anchors)
    grid = tuple(anchor["feats"].shape[-2:])
    anchor_lab = _token_labels(anchor["label"], grid).flatten(1)  # [n,hw]
    rows = []
    for name, partners in (("self", anchors), ("knn", knn_partner), ("random", random_partner)):
        other = anchor if name == "self" else store.read(partners)
        fd = tensor_correlation(anchor["feats"], other["feats"])  # [n,h,w,i,j]
        if pointwise:  # as the loss: centre each anchor token over its partners, keep the global mean
            old_mean = fd.mean()
            fd = fd - fd.mean(dim=(3, 4), keepdim=True)
            fd = fd - fd.mean() + old_mean
        fd = fd.flatten(3).flatten(1, 2)  # [n,hw,ij]
        other_lab = _token_labels(other["label"], grid).flatten(1)  # [n,ij]
        tokens = fd.shape[1]
        a_idx = rng.integers(0, tokens, size=(anchors.size, points))
        b_idx = rng.integers(0, fd.shape[2], size=(anchors.size, points))
        img_idx = np.arange(anchors.size)[:, None]
        f_vals = fd[img_idx, a_idx, b_idx].numpy().ravel()
        la, lb = anchor_lab[img_idx, a_idx].numpy().ravel(), other_lab[img_idx, b_idx].numpy().ravel()
        rows.append(pd.DataFrame({"pair": name, "F": f_vals.astype(np.float64),
                                  "same_class": (la == lb) & (la >= 0)}))
    return pd.concat(rows, ignore_index=True)
