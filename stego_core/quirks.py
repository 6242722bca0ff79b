"""Measuring the reference's quirks (stego-spec §10): the same quantity under protocol "original" and "corrected".

Each function isolates one quirk on cheap inputs (cached features, a few images) and returns plain numbers; the
quirks chapter (notebooks/07_quirks.py) puts them side by side.

- ``knn_agreement`` / ``knn_quirk`` (quirk 1): how often the top kNN partners share their classes with the query,
  for the table built from channel-dropped descriptors and for the clean one.
- ``with_extra_clusters`` (quirk 6): a segmenter whose cluster probe is refitted with extra centres, without
  writing a run.
- ``evaluate_run`` (quirks 6, 9, 15, 16): a segmenter's validation metrics from a FeatureStore with a chosen batch
  size, metric protocol and optional CRF (``evaluation.evaluate_store``), including the stego-studies metric names
  (swapped recall / precision).
- ``byte_difference`` (quirk 9): the share of image bytes the CRF sees changed by the unnormalise→×255→truncate
  round trip.
- ``pos_embed_difference`` (quirk 13): how far DINO's (g+0.1)/n interpolation rule moves the positional table
  away from an exact resize.
- ``prediction_change``: the share of pixels whose prediction differs between two settings.
- ``protocol_runs`` / ``best_metric``: a run trained under each protocol for the chapter's side-by-side rows; the
  corrected-protocol run may be absent (the paper profiles train none), which leaves its column empty with a note
  naming the command that trains it.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .backbones import interpolate_pos_embed
from .config import PROTOCOLS, StegoError, check_choice, check_int
from .crf import image_bytes
from .data import normalize_uint8
from .evaluation import evaluate_store
from .knn import build_knn
from .probes import PROBES, ClusterProbe
from .runs import MissingRunError, require_run
from .segmenter import Segmenter
from .train_state import TrainState, train_step

__all__ = ["protocol_runs", "best_metric", "class_histograms",
           "knn_agreement", "knn_quirk", "evaluate_run", "with_extra_clusters", "byte_difference",
           "pos_embed_difference", "prediction_change"]


def protocol_runs(preset: str, *, method: str, code_dim: int | None = None, train_missing: bool = False,
                  **run_args: Any) -> dict[str, Any]:
    """{"original": Segmenter, "corrected": Segmenter or None, "note": str} for one method's runs.

    The original-protocol run is required (chapters 02 and 03 train it). The corrected one is trained here when
    ``train_missing`` is true (``runs.require_run``); otherwise, when it is absent, "corrected" is None and "note"
    names the command that trains it. ``run_args``: the other keywords of ``runs.require_run``.
    """
    out = {p: None for p in PROTOCOLS} | {"note": ""}
    out["original"] = require_run(preset, method=method, code_dim=code_dim, protocol="original",
                                  train_missing=train_missing, **run_args)
    try:
        out["corrected"] = require_run(preset, method=method, code_dim=code_dim, protocol="corrected",
                                       train_missing=train_missing, **run_args)
    except MissingRunError as exc:
        out["note"] = f"no corrected-protocol {method} run: train it with {exc.command}"
    return out


def best_metric(segmenter: Segmenter | None, key: str) -> float:
    """A run's validation metric at its selected step (``info["metrics"][key]``); NaN for an absent run."""
    return float("nan") if segmenter is None else float(segmenter.info["metrics"][key])


def class_histograms(store: Any, *, batch_size: int = 64) -> np.ndarray:
    """Per-item class distribution of a FeatureStore's labels: float [N, K] rows summing to 1 (0 if unlabelled)."""
    k = int(store.n_classes)
    out = np.zeros((len(store), k), dtype=np.float64)
    for start in range(0, len(store), batch_size):
        idx = np.arange(start, min(start + batch_size, len(store)))
        label = np.asarray(store.read(idx)["label"]).reshape(len(idx), -1)  # [b,H,W] -> [b,H*W]
        for row, lab in zip(idx, label):
            lab = lab[(lab >= 0) & (lab < k)]
            if lab.size:
                out[row] = np.bincount(lab, minlength=k) / lab.size
    return out


def knn_agreement(histograms: np.ndarray, table: Any, n_neighbors: int = 7) -> float:
    """Mean histogram intersection (×100) between each item's class distribution and those of its kNN partners of
    ranks 1..n_neighbors (rank 0 is the item itself): 100 = partners show exactly the query's classes."""
    h = np.asarray(histograms, dtype=np.float64)
    t = np.asarray(table)
    check_int("n_neighbors", n_neighbors, minimum=1)
    if t.ndim != 2 or t.shape[0] != h.shape[0]:
        raise StegoError(f"table: expected [{h.shape[0]}, k] (one row per item), got {t.shape}")
    if t.shape[1] <= n_neighbors:
        raise StegoError(f"n_neighbors: the table has {t.shape[1]} columns, needs more than {n_neighbors}")
    partners = t[:, 1:n_neighbors + 1]  # [N,n]
    inter = np.minimum(h[:, None, :], h[partners]).sum(-1)  # [N,n,K] -> [N,n]
    return float(inter.mean() * 100)


def knn_quirk(store: Any, *, k: int = 30, n_neighbors: int = 7, seed: int = 0, progress: bool = False) -> dict:
    """Quirk 1 on a training store: the kNN tables of both protocols (built beside the store if missing) compared.

    Returns agreement_original / agreement_corrected (``knn_agreement``) and changed: the share (%) of
    (item, rank ≤ n_neighbors) partners that differ between the two tables as sets per item.
    """
    hist = class_histograms(store)
    tables = {p: build_knn(store, k=k, protocol=p, seed=seed, progress=progress).numpy() for p in PROTOCOLS}
    n = min(n_neighbors, tables["original"].shape[1] - 1)
    a, b = tables["original"][:, 1:n + 1], tables["corrected"][:, 1:n + 1]
    same = np.array([len(set(x) & set(y)) for x, y in zip(a.tolist(), b.tolist())])
    return {"agreement_original": knn_agreement(hist, tables["original"], n),
            "agreement_corrected": knn_agreement(hist, tables["corrected"], n),
            "changed": float(100 * (1 - same.sum() / a.size)), "n_neighbors": n}


def evaluate_run(segmenter: Segmenter, store: Any, *, batch_size: int = 8, protocol: str = "original",
                 crf: bool = False, indices: Any = None, workers: int | None = None, keep_predictions: int = 0) -> dict:
    """A segmenter's metrics on a validation FeatureStore (``stego_core.evaluation.evaluate_store``).

    batch_size: how many items share one call of the code map (per-batch standardisation, quirk 15).
    protocol: the metric / CRF protocol (quirks 6 and 9). indices: evaluate only these items (e.g. for the CRF).
    Adds ``"cluster/recall (studies)"``: the value the study logs as recall (our precision, quirk 16), beside the
    true ``"cluster/recall"``.
    """
    check_choice("protocol", protocol, PROTOCOLS)
    res = evaluate_store(segmenter, store, batch_size=batch_size, indices=indices, crf=crf, workers=workers,
                         protocol=protocol, class_names=[f"c{i}" for i in range(segmenter.n_classes)],
                         keep_predictions=keep_predictions, progress=False)
    for probe in PROBES:
        k = len(res[probe]["recall"])
        scored = res[probe]["recall"][: k if protocol == "original" else segmenter.n_classes]
        res[f"{probe}/recall"] = float(np.nanmean(scored)) if np.isfinite(scored).any() else float("nan")
        res[f"{probe}/recall (studies)"] = float(res[probe]["studies"]["recall"])
    return res


def with_extra_clusters(segmenter: Segmenter, store: Any, extra_clusters: int, *, steps: int = 200,
                        batch_size: int = 16, lr: float = 5e-3, seed: int = 0) -> Segmenter:
    """The segmenter with a cluster probe of K + ``extra_clusters`` centres, fitted like the training's probe (hard
    cosine k-means by Adam, spec §5.1) on the segmenter's code of a FeatureStore (the training split).

    Nothing is written: the study's results store keeps only real training runs.
    """
    check_int("extra_clusters", extra_clusters, minimum=0)
    check_int("steps", steps, minimum=1)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    probe = ClusterProbe(segmenter.code_dim, segmenter.n_classes + int(extra_clusters)).to(segmenter.device)
    state = TrainState(cfg=None, cluster_probe=probe, linear_probe=None,
                       opt_cluster=torch.optim.Adam(probe.parameters(), lr=lr), opt_linear=None)
    for _ in range(steps):
        idx = torch.randperm(len(store), generator=gen)[:batch_size].sort().values
        code = segmenter.code(store.read(idx.numpy())["feats"])  # [b,D,h,w], no gradient
        train_step(state, code, None, code=code)  # the training's probe step, cluster probe only
    return segmenter.with_cluster_probe(probe.eval())


def byte_difference(images_u8: np.ndarray) -> dict:
    """Quirk 9: of the bytes the CRF sees (``stego_core.crf.image_bytes``), the share (%) that the original round
    trip changes against the exact bytes, and the mean change in byte units (colour order aside)."""
    imgs = np.asarray(images_u8, dtype=np.uint8)
    norm = normalize_uint8(imgs)
    diffs = []
    for x, raw in zip(norm, imgs):
        orig = image_bytes(x, protocol="original")[:, :, ::-1].astype(np.int64)  # BGR -> RGB for the comparison
        diffs.append(orig - raw.astype(np.int64))
    d = np.stack(diffs)
    corr = np.stack([image_bytes(x, protocol="corrected") for x in norm]).astype(np.int64)
    return {"changed": float(100 * np.mean(d != 0)), "mean_change": float(d.mean()),
            "corrected_exact": bool(np.array_equal(corr, imgs.astype(np.int64)))}


def pos_embed_difference(n: int = 28, grid: int = 40, dim: int = 384, *, seed: int = 0) -> dict:
    """Quirk 13: DINO's rule vs an exact resize of a random (trunc-normal, std .02, as ViTs are initialised)
    positional table from an n×n to a grid×grid token grid. Returns the relative L2 difference (%) and the mean
    cosine similarity of the two tables' grid entries."""
    gen = torch.Generator().manual_seed(seed)
    table = (torch.randn(1, 1 + n * n, dim, generator=gen) * 0.02).clamp(-0.04, 0.04)  # [1,1+n*n,C]
    a = interpolate_pos_embed(table, grid, grid, protocol="original")[0, 1:]  # [g*g,C]
    b = interpolate_pos_embed(table, grid, grid, protocol="corrected")[0, 1:]
    rel = float(100 * (a - b).norm() / b.norm())
    cos = float(torch.nn.functional.cosine_similarity(a, b, dim=1).mean())
    return {"relative_difference": rel, "cosine": cos, "n": n, "grid": grid}


def prediction_change(a: np.ndarray, b: np.ndarray) -> float:
    """Share (%) of pixels whose predicted class differs between two prediction arrays of equal shape."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise StegoError(f"b: expected the shape of a {a.shape}, got {b.shape}")
    return float(100 * np.mean(a != b))
