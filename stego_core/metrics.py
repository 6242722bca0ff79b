"""Segmentation metrics: pooled confusion matrix, Hungarian cluster-to-class matching, mIoU and pixel accuracy.

Spec §7.4 (and quirks §10.6, §10.8, §10.16):

- ``update(pred, target)`` accumulates M [(K+E) x K], rows = predicted cluster, columns = ground-truth class, over
  pixels with 0 <= target < K. Protocol ``"original"`` also drops pixels whose prediction lies outside [0, K), so
  predictions on extra clusters (>= K) vanish ("free abstention"). Protocol ``"corrected"`` keeps them in rows
  K..K+E-1, where they count as errors (a prediction outside [0, K+E) is then a StegoError).
- ``compute()`` with ``hungarian=True``: E = 0 -> maximum-weight one-to-one matching (scipy
  ``linear_sum_assignment``, maximize) and the rows of M reordered so that matched pairs lie on the diagonal.
  E > 0 -> a second matching on M^T picks each class's cluster; the histogram is those K rows, one extra row that
  sums the clusters left unmatched by the first matching, and a zero column: (K+1) x (K+1).
  ``hungarian=False`` is the identity assignment (linear probe).
- With tp = diag(H): IoU = tp / (row + col - tp); mIoU = mean of the non-NaN IoUs; Accuracy = sum tp / sum H;
  both x100. Usual per-class ``precision`` = tp / row sum (pixels predicted as the class), ``recall`` = tp / column
  sum. The stego-studies logger swaps those two names; ``compute()["studies"]`` reproduces its keys and values.

In the corrected protocol the extra "unmatched clusters" row of an E > 0 histogram is not a class: it only adds
errors to the real classes' columns, and mIoU / per-class means are taken over the K real classes.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment

from .config import PROTOCOLS, StegoError, check_choice, check_int

__all__ = ["UnsupervisedMetrics", "hungarian_match", "cluster_to_class"]


def hungarian_match(confusion: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Maximum-weight one-to-one matching of the rows and columns of ``confusion`` -> (rows, cols) index arrays."""
    rows, cols = linear_sum_assignment(np.asarray(confusion), maximize=True)
    return np.asarray(rows, dtype=np.int64), np.asarray(cols, dtype=np.int64)


def cluster_to_class(assignment: tuple[Any, Any], n_clusters: int) -> np.ndarray:
    """The cluster -> class map int64 [n_clusters] of an ``assignment`` (rows = clusters, cols = their classes, as
    ``UnsupervisedMetrics.compute`` returns it); -1 for a cluster that no class was matched to."""
    rows, cols = assignment
    out = np.full(check_int("n_clusters", n_clusters, minimum=1), -1, dtype=np.int64)
    out[np.asarray(rows, dtype=np.int64)] = np.asarray(cols, dtype=np.int64)
    return out


def _as_int_array(name: str, x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
        raise StegoError(f"{name}: expected integer class indices (tensor or array), got dtype {arr.dtype}")
    return arr.reshape(-1).astype(np.int64, copy=False)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return num / den  # 0/0 -> NaN, as the reference's float division


def _nanmean(x: np.ndarray) -> float:
    x = x[~np.isnan(x)]
    return float(x.mean()) if x.size else float("nan")


class UnsupervisedMetrics:
    """Confusion-matrix metrics for cluster (Hungarian) and linear (identity) probes.

    ``UnsupervisedMetrics(n_classes, *, extra_clusters=0, hungarian=True, protocol="original")``;
    ``update(pred, target)`` any number of times, then ``compute()``; ``reset()`` clears the counts.
    """

    def __init__(self, n_classes: int, *, extra_clusters: int = 0, hungarian: bool = True,
                 protocol: str = "original"):
        self.n_classes = check_int("n_classes", n_classes, minimum=1)
        self.extra_clusters = check_int("extra_clusters", extra_clusters, minimum=0)
        self.hungarian = bool(hungarian)
        self.protocol = check_choice("protocol", protocol, PROTOCOLS)
        if not self.hungarian and self.extra_clusters:
            raise StegoError("extra_clusters: must be 0 when hungarian=False (the identity assignment needs "
                             "one prediction per class)")
        self.reset()

    @property
    def n_clusters(self) -> int:
        return self.n_classes + self.extra_clusters

    def reset(self) -> None:
        """Forget all counts."""
        self.confusion = np.zeros((self.n_clusters, self.n_classes), dtype=np.int64)

    def update(self, pred: Any, target: Any) -> None:
        """Add one batch: integer ``pred`` (cluster / class indices) and ``target`` (-1 = ignore), equal shapes."""
        p = _as_int_array("pred", pred)
        t = _as_int_array("target", target)
        if np.shape(pred) != np.shape(target):
            raise StegoError(f"target: expected the shape of pred {tuple(np.shape(pred))}, "
                             f"got {tuple(np.shape(target))}")
        k = self.n_classes
        keep = (t >= 0) & (t < k)
        if self.protocol == "original":
            keep &= (p >= 0) & (p < k)
        else:
            bad = keep & ((p < 0) | (p >= self.n_clusters))
            if bad.any():
                raise StegoError(f"pred: expected cluster indices in [0, {self.n_clusters}), got values "
                                 f"{np.unique(p[bad])[:5].tolist()}")
        idx = p[keep] * k + t[keep]  # row-major index into [(K+E), K]
        self.confusion += np.bincount(idx, minlength=self.n_clusters * k).reshape(self.n_clusters, k)

    def _histogram(self) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
        m = self.confusion
        k = self.n_classes
        if not self.hungarian:
            ident = np.arange(k, dtype=np.int64)
            return m.copy(), (ident, ident.copy())
        rows, cols = hungarian_match(m)  # rows: clusters, cols: their classes
        if self.extra_clusters == 0:
            return m[np.argsort(cols)], (rows, cols)  # row c = the cluster matched to class c
        _, cluster_of_class = hungarian_match(m.T)  # second matching on M^T: class c -> cluster
        hist = m[cluster_of_class]  # [K,K]
        unmatched = sorted(set(range(self.n_clusters)) - set(rows.tolist()))
        extra_row = m[unmatched].sum(axis=0, keepdims=True)  # [1,K]
        hist = np.concatenate([hist, extra_row], axis=0)  # [K+1,K]
        hist = np.concatenate([hist, np.zeros((k + 1, 1), dtype=hist.dtype)], axis=1)  # [K+1,K+1]
        return hist, (rows, cols)

    def compute(self, class_names: Sequence[str] | None = None) -> dict[str, Any]:
        """Metrics of everything seen since the last ``reset()``.

        Returns ``mIoU`` and ``Accuracy`` (floats x100), ``confusion`` (raw M, rows = predicted cluster, columns =
        ground truth), ``histogram`` (M after matching), ``assignment`` ((rows, cols) arrays; identity for the
        linear probe), per-class ``iou``, ``precision`` (tp / predicted), ``recall`` (tp / ground truth) as
        arrays x100 over the histogram's classes, and ``studies``: the stego-studies names
        ``mIoU``, ``Accuracy``, ``per_class_iou/<name>``, ``per_class_recall/<name>`` (= our precision),
        ``per_class_precision/<name>`` (= our recall), ``recall``, ``precision`` (NaN-skipping means), with
        ``<name>`` from ``class_names`` or ``c0, c1, ...``.
        """
        k = self.n_classes
        if class_names is None:
            class_names = [f"c{i}" for i in range(k)]
        elif len(class_names) != k:
            raise StegoError(f"class_names: expected {k} names, got {len(class_names)}")
        hist, (rows, cols) = self._histogram()
        h = hist.astype(np.float64)
        tp = np.diag(h)
        pred_total = h.sum(axis=1)  # pixels predicted as (matched) class c
        gt_total = h.sum(axis=0)  # pixels whose ground truth is c
        iou = _ratio(tp, pred_total + gt_total - tp) * 100
        precision = _ratio(tp, pred_total) * 100
        recall = _ratio(tp, gt_total) * 100
        accuracy = float(_ratio(tp.sum(), h.sum()) * 100)
        # which entries are classes for the means: the extra "unmatched" row counts only in the original protocol
        scored = slice(None) if self.protocol == "original" else slice(0, k)
        miou = _nanmean(iou[scored])
        studies: dict[str, float] = {"mIoU": miou, "Accuracy": accuracy}
        for i, name in enumerate(class_names):
            studies[f"per_class_iou/{name}"] = float(iou[i])
            studies[f"per_class_recall/{name}"] = float(precision[i])  # swapped names, as stego-studies logs them
            studies[f"per_class_precision/{name}"] = float(recall[i])
        studies["recall"] = _nanmean(precision[scored])
        studies["precision"] = _nanmean(recall[scored])
        return {
            "mIoU": miou,
            "Accuracy": accuracy,
            "confusion": self.confusion.copy(),
            "histogram": hist,
            "assignment": (rows, cols),
            "iou": iou,
            "precision": precision,
            "recall": recall,
            "studies": studies,
        }
