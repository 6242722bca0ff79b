"""The segmentation explorer's content: precomputed predictions per (image, method, dim, CRF, probe) of finished
runs. Its views (the static Altair explorer and the live ipywidgets panel) are in ``stego_core.book.widgets``.

Models are ``stego_core.segmenter.Segmenter``s of finished runs (``stego_core.runs.require_runs``: the explorer never
trains). Predictions are the segmenter's own (``Segmenter.predict``): code upsampled bilinearly to the image size,
linear scores or cosine to the centres, optional DenseCRF of the log-probabilities (``stego_core.crf.CRFPool``),
argmax; cluster ids are mapped to classes with the Hungarian assignment of the whole validation split (the
``assignment`` of ``evaluation.evaluate_store`` without CRF), not of the few images shown.

``precompute`` scores every model over the validation store once (its metrics and assignment) and predicts the
chosen images with and without CRF from the code those images get in that pass (``evaluation.store_code``).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from .config import METHOD_LABELS, PROTOCOLS, StegoError, check_choice, check_int
from .crf import CRFPool
from .evaluation import evaluate_store, store_code
from .segmenter import PROBES, Segmenter

__all__ = ["METHOD_LABELS", "ExplorerData", "image_miou", "model_label", "precompute"]


# ---------------------------------------------------------------------------------------------------------------
# models
def model_label(method: str, code_dim: int | None) -> str:
    """"STEGO d=24", "PCA d=6", "DINO (C=112)"."""
    name = METHOD_LABELS.get(method, method)
    return f"{name} (C={code_dim})" if method == "dino" else f"{name} d={code_dim}"


# ---------------------------------------------------------------------------------------------------------------
# predictions
@dataclass
class ExplorerData:
    """Precomputed explorer content (see ``precompute``)."""

    indices: list[int]  # validation-store items shown
    images: np.ndarray  # uint8 [n,H,W,3]
    labels: np.ndarray  # int64 [n,H,W] ground truth (-1 ignore)
    class_names: list[str]
    palette: np.ndarray  # uint8 [K,3]
    models: dict[tuple[str, int], Segmenter]  # (method, dim) -> segmenter with its validation-split cluster map
    predictions: dict[tuple[int, str, int, bool, str], np.ndarray]  # (item, method, dim, crf, probe) -> [H,W]
    metrics: pd.DataFrame  # method, label, code_dim, probe, crf, mIoU, Accuracy (+ split "val" or "shown")
    protocol: str = "original"
    dims: list[int] = field(default_factory=list)  # the code dims offered (DINO excluded)


def image_miou(pred: np.ndarray, label: np.ndarray, k: int) -> float:
    """mIoU of one image's class map (NaN-skipping over classes present in prediction or label)."""
    valid = (label >= 0) & (label < k)
    p, t = pred[valid], label[valid]
    ious = []
    for c in range(k):
        union = np.sum((p == c) | (t == c))
        if union:
            ious.append(np.sum((p == c) & (t == c)) / union)
    return 100.0 * float(np.mean(ious)) if ious else float("nan")


def precompute(models: dict[tuple[str, int], Segmenter], store: Any, indices: Sequence[int], *,
               crf: Sequence[bool] = (False, True), probes: Sequence[str] = PROBES, workers: int | None = None,
               protocol: str = "original", batch_size: int = 8, progress: bool = True) -> ExplorerData:
    """Predictions of every model for the validation-store items ``indices`` with and without CRF.

    models: (method, dim) -> Segmenter (``runs.require_runs``). store: the validation FeatureStore; each model
    first runs over all of it (``evaluation.evaluate_store``, batches of ``batch_size`` as validation does: the
    per-batch standardisation of PCA/RP/h-NNE depends on it) for its no-CRF metrics and the cluster -> class
    assignment; the chosen items are predicted from the code they get in those batches.
    """
    check_choice("protocol", protocol, PROTOCOLS)
    check_int("batch_size", batch_size, minimum=1)
    for p in probes:
        check_choice("probes", p, PROBES)
    if not models:
        raise StegoError("models: expected at least one (method, dim) -> segmenter")
    indices = [int(i) for i in indices]
    if not indices or min(indices) < 0 or max(indices) >= len(store):
        raise StegoError(f"indices: expected item numbers in [0, {len(store)}), got {indices}")
    shown = store.read(np.asarray(indices))
    images = np.asarray(shown["image"], dtype=np.uint8)
    labels = torch.as_tensor(shown["label"]).numpy().astype(np.int64)
    class_names = list(store.class_names)
    palette = store.palette if store.palette is not None else np.zeros((len(class_names), 3), np.uint8)
    predictions: dict = {}
    matched: dict[tuple[str, int], Segmenter] = {}
    metric_rows = []
    pool = CRFPool(workers, protocol=protocol, progress=False) if any(crf) else None
    try:
        for (method, dim), seg in tqdm(list(models.items()), desc="explorer", unit="model", disable=not progress):
            res = evaluate_store(seg, store, batch_size=batch_size, protocol=protocol, class_names=class_names,
                                 progress=False)
            matched[(method, dim)] = seg.match(res["cluster"]["assignment"])
            for probe in PROBES:
                metric_rows.append({"method": method, "label": model_label(method, dim), "code_dim": dim,
                                    "probe": probe,
                                        "crf": False, "split": "val", "n_images": res["n_images"],
                                        "mIoU": res[f"{probe}/mIoU"], "Accuracy": res[f"{probe}/Accuracy"]})
            code = store_code(seg, store, indices, batch_size=batch_size)  # [n,D,h,w]
            for use_crf in crf:
                for probe in probes:
                    maps = matched[(method, dim)].predict(code, images.shape[1:3], probe, crf=bool(use_crf),
                                                          images=images, pool=pool).numpy()
                    for item, m in zip(indices, maps):
                        predictions[(item, method, dim, bool(use_crf), probe)] = m
    finally:
        if pool is not None:
            pool.close()
    dims = sorted({d for (m, d) in models if m != "dino"})
    return ExplorerData(indices=indices, images=images, labels=labels, class_names=class_names,
                        palette=np.asarray(palette, dtype=np.uint8), models=matched, predictions=predictions,
                        metrics=pd.DataFrame(metric_rows), protocol=protocol, dims=dims)


