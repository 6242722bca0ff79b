"""The paper's final evaluation protocol: a ``Segmenter`` scored over a split, with or without DenseCRF.

What ``eval_segmentation.py`` computes (stego-spec §7.2, §1.5, quirk 10), every step a method of
``stego_core.segmenter.Segmenter``:

1. code = ½·(code_map(feats(x)) + hflip(code_map(feats(hflip(x))))) — the average is taken on the **code**
   (``Segmenter.image_code``; the code map of the DINO baseline is the identity, the code the raw features);
2. the code [B, D, h, w] is upsampled bilinearly (align_corners False) to the label resolution;
3. linear log-probabilities = log_softmax(linear_probe(code)); cluster log-probabilities =
   log_softmax(2·cos(code, centres)) (``Segmenter.log_probs``);
4. with ``crf=True`` each of the two maps goes through DenseCRF per image (``stego_core.crf``); predictions are
   the argmaxes (``Segmenter.predict``);
5. one confusion matrix per probe is pooled over the whole split: Hungarian matching for the cluster probe,
   identity for the linear probe (``stego_core.metrics.UnsupervisedMetrics``); mIoU and accuracy ×100.

Entry points: ``evaluate_batches`` (any batches with images, cached features or code: the one scoring loop, which
training-time validation uses too), ``evaluate_store`` (a feature store read in batches of ``batch_size`` as
validation does: per-batch standardised projections depend on the batch), ``evaluate`` (a dataset of images
through the segmenter's backbone, flip-averaged) and ``store_code`` (the code of some store items, computed in
the batches ``evaluate_store`` uses). ``final_rows`` / ``write_final_rows`` put an evaluation into the results
store (stage ``"final"``: Table 2's rows). The papers' published numbers, with their sources, are in
``stego_core.papers``.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .config import PROTOCOLS, StegoError, artifact_dir, check_choice, check_int
from .crf import CRFPool
from .metrics import UnsupervisedMetrics
from .results import write_rows
from .segmenter import PROBES, Segmenter

__all__ = ["evaluate_batches", "evaluate_store", "evaluate", "store_code", "final_rows", "write_final_rows"]




# ---------------------------------------------------------------------------------------------------------------
# the scoring loop
def _code_of(segmenter: Segmenter, batch: Mapping[str, Any], flip: bool) -> torch.Tensor:
    """A batch's code: given (``code``), of cached features (``feats``) or of images through the backbone."""
    if batch.get("code") is not None:
        return torch.as_tensor(batch["code"]).float()
    if batch.get("feats") is not None:
        return segmenter.code(batch["feats"])
    if batch.get("img") is not None:
        return segmenter.image_code(batch["img"], flip=flip)
    raise StegoError("batches: each batch needs a 'code', a 'feats' or an 'img' entry")


def _crf_images_of(batch: Mapping[str, Any]) -> Any:
    for key in ("img", "image"):
        if batch.get(key) is not None:
            return batch[key]
    raise StegoError("crf: the batches need images for the CRF: an 'img' (normalised [B,3,H,W]) or 'image' "
                     "(uint8 [B,H,W,3]) entry")


def evaluate_batches(segmenter: Segmenter, batches: Iterable[Mapping[str, Any]], *, flip: bool = True,
                     crf: bool = False, workers: int | None = None, protocol: str = "original",
                     class_names: list[str] | None = None, keep_predictions: int = 0, progress: bool = True,
                     require_labels: bool = True) -> dict[str, Any]:
    """Steps 2-5 of the protocol over ``batches`` (step 1 too for batches of images).

    batches: dicts with ``label`` (int64 [B,H,W], -1 = ignore) and one of ``code`` [B,D,h,w], ``feats``
        [B,C,h,w] (through the code map) or ``img`` (normalised [B,3,H,W], through the backbone, flip-averaged
        when ``flip``); with ``crf`` also ``img`` or ``image`` (uint8 [B,H,W,3], as a feature store keeps it).
        Optional ``index`` (ids of the images, for ``keep_predictions``).
    crf: refine both log-probability maps with DenseCRF (``workers`` processes, ``protocol`` for its image bytes).
    protocol: also passed to the metrics (``"corrected"`` counts predictions on extra clusters as errors).
    keep_predictions: how many images' predictions (cluster ids mapped to classes, linear classes, labels) to return.
    require_labels: a split without a single labelled pixel (e.g. a ``directory`` dataset without label files)
        is a StegoError rather than NaN metrics (training-time validation passes False).

    Returns a dict: ``"cluster/mIoU"``, ``"cluster/Accuracy"``, ``"linear/mIoU"``, ``"linear/Accuracy"`` (floats
    ×100), ``"cluster"`` and ``"linear"`` (the full ``UnsupervisedMetrics.compute()`` dicts with confusion
    matrices and per-class values), ``n_images``, ``crf``, ``protocol`` and, if asked, ``predictions``.
    """
    if not isinstance(segmenter, Segmenter):
        raise StegoError(f"segmenter: expected a stego_core.segmenter.Segmenter, got {type(segmenter).__name__}")
    check_choice("protocol", protocol, PROTOCOLS)
    keep = check_int("keep_predictions", keep_predictions, minimum=0)
    n_classes, n_clusters = segmenter.n_classes, segmenter.n_clusters
    metrics = {"cluster": UnsupervisedMetrics(n_classes, extra_clusters=n_clusters - n_classes, hungarian=True,
                                              protocol=protocol),
               "linear": UnsupervisedMetrics(n_classes, hungarian=False, protocol=protocol)}
    kept: dict[str, list] = {"index": [], "cluster": [], "linear": [], "label": []}
    n_images = 0
    n_labelled = 0  # pixels with a class in 0..K-1 (the metrics ignore every other pixel)
    pool = CRFPool(workers, protocol=protocol, progress=False) if crf else None
    try:
        for batch in tqdm(batches, desc="evaluate", unit="batch", disable=not progress):
            label = torch.as_tensor(batch["label"]).long().cpu()
            if label.ndim != 3:
                raise StegoError(f"label: expected [B,H,W], got shape {tuple(label.shape)}")
            code = _code_of(segmenter, batch, flip)
            if code.ndim != 4 or code.shape[0] != label.shape[0]:
                raise StegoError(f"code: expected [{label.shape[0]},D,h,w] matching the labels, "
                                 f"got {tuple(code.shape)}")
            images = _crf_images_of(batch) if crf else None
            pred = segmenter.predict_all(code, label.shape[-2:], PROBES, crf=crf, images=images, pool=pool,
                                         map_clusters=False)  # probe -> [B,H,W]
            n_labelled += int(((label >= 0) & (label < n_classes)).sum())
            for probe in PROBES:
                metrics[probe].update(pred[probe], label)
            if n_images < keep:
                take = min(keep - n_images, label.shape[0])
                index = batch.get("index")
                kept["index"] += (torch.as_tensor(index)[:take].tolist() if index is not None
                                  else list(range(n_images, n_images + take)))
                for probe in PROBES:
                    kept[probe].append(pred[probe][:take].numpy())
                kept["label"].append(label[:take].numpy())
            n_images += label.shape[0]
    finally:
        if pool is not None:
            pool.close()
    if n_images == 0:
        raise StegoError("batches: nothing to evaluate (empty dataset or loader)")
    if require_labels and n_labelled == 0:
        raise StegoError(f"label: no labelled pixels in this split (all -1, or outside 0..{n_classes - 1}); metrics "
                         f"need labels — use stego_core.segment.segment_images for unlabelled data")
    scored = {probe: m.compute(class_names) for probe, m in metrics.items()}
    out: dict[str, Any] = {f"{probe}/{name}": scored[probe][name] for probe in PROBES for name in ("mIoU", "Accuracy")}
    out.update(scored)
    out.update(n_images=n_images, crf=bool(crf), protocol=protocol)
    if keep:
        matched = segmenter.match(scored["cluster"]["assignment"]).cluster_to_class  # cluster id -> class (-1)
        raw = np.concatenate(kept["cluster"])
        out["predictions"] = {
            "index": kept["index"],
            "cluster": matched[raw],  # [n,H,W] class ids, -1 = unmatched cluster
            "cluster_raw": raw,  # [n,H,W] cluster ids
            "linear": np.concatenate(kept["linear"]),
            "label": np.concatenate(kept["label"]),
        }
    return out


# ---------------------------------------------------------------------------------------------------------------
# feature stores and datasets
def _store_items(store: Any, indices: Any) -> np.ndarray:
    items = np.arange(len(store)) if indices is None else np.asarray(indices, dtype=np.int64).reshape(-1)
    if items.size == 0 or items.min() < 0 or items.max() >= len(store):
        raise StegoError(f"indices: expected item numbers in [0, {len(store)})")
    return items


def _store_batches(store: Any, items: np.ndarray, batch_size: int) -> Iterator[dict[str, Any]]:
    for start in range(0, items.size, batch_size):
        idx = items[start:start + batch_size]
        rec = store.read(idx)
        yield {"feats": rec["feats"], "label": rec["label"], "image": rec["image"], "index": torch.as_tensor(idx)}


def evaluate_store(segmenter: Segmenter, store: Any, *, batch_size: int = 8, indices: Any = None,
                   crf: bool = False, workers: int | None = None, protocol: str = "original",
                   class_names: list[str] | None = None, keep_predictions: int = 0,
                   progress: bool = True) -> dict[str, Any]:
    """``evaluate_batches`` over a feature store's cached features (no flip: the store holds one view).

    batch_size: items per call of the code map, in store order (or in the order of ``indices``) — as training
    validates (``val_batch_size``), since per-batch standardised projections depend on the batch (quirk 15).
    indices: evaluate only these items. class_names: default the store's.
    """
    check_int("batch_size", batch_size, minimum=1)
    items = _store_items(store, indices)
    names = list(class_names) if class_names is not None else list(getattr(store, "class_names", None) or []) or None
    if names is not None and len(names) != segmenter.n_classes:
        names = None
    return evaluate_batches(segmenter, _store_batches(store, items, batch_size), crf=crf, workers=workers,
                            protocol=protocol, class_names=names, keep_predictions=keep_predictions,
                            progress=progress)


def store_code(segmenter: Segmenter, store: Any, items: Sequence[int], *, batch_size: int = 8) -> torch.Tensor:
    """Code [n,D,h,w] of the store items ``items``, each computed in the batch ``evaluate_store`` gives it (the
    batches of ``batch_size`` consecutive items from 0), so a per-batch standardised code is the one scored."""
    check_int("batch_size", batch_size, minimum=1)
    wanted = [int(i) for i in _store_items(store, items)]
    codes: dict[int, torch.Tensor] = {}
    for start in sorted({i - i % batch_size for i in wanted}):
        idx = np.arange(start, min(start + batch_size, len(store)))
        code = segmenter.code(store.read(idx)["feats"])  # [b,D,h,w]
        codes.update({int(i): code[j] for j, i in enumerate(idx) if int(i) in wanted})
    return torch.stack([codes[i] for i in wanted])


def evaluate(segmenter: Segmenter, dataset_or_loader: Any, *, flip: bool = True, crf: bool = False,
             workers: int | None = None, protocol: str = "original", batch_size: int = 8,
             class_names: list[str] | None = None, keep_predictions: int = 0, progress: bool = True) -> dict[str, Any]:
    """The paper's final evaluation of a segmenter (with its backbone) on a dataset or a DataLoader.

    dataset_or_loader: a SegDataset (read in order, ``batch_size`` images per batch) or any iterable of batches
        with ``img`` [B,3,H,W] (ImageNet-normalised), ``label`` [B,H,W] and optionally ``index``.
    flip: average the code over the image and its horizontal flip (the reference's test-time augmentation).
    crf, workers, protocol, class_names, keep_predictions: as in ``evaluate_batches``; class names default to the
        dataset's ``class_names``.
    """
    check_int("batch_size", batch_size, minimum=1)
    loader = dataset_or_loader
    if hasattr(dataset_or_loader, "__getitem__") and hasattr(dataset_or_loader, "__len__") \
            and not hasattr(dataset_or_loader, "batch_size"):
        loader = DataLoader(dataset_or_loader, batch_size=batch_size, shuffle=False)
    if class_names is None:
        names = getattr(getattr(loader, "dataset", dataset_or_loader), "class_names", None)
        if names is not None and len(names) == segmenter.n_classes:
            class_names = list(names)

    def image_batches() -> Iterator[Mapping[str, Any]]:
        for batch in loader:
            if not isinstance(batch, Mapping) or "img" not in batch or "label" not in batch:
                raise StegoError("dataset_or_loader: expected batches as dicts with 'img' and 'label'")
            yield {k: v for k, v in batch.items() if k not in ("code", "feats")}

    return evaluate_batches(segmenter, image_batches(), flip=flip, crf=crf, workers=workers, protocol=protocol,
                            class_names=class_names, keep_predictions=keep_predictions, progress=progress)


# ---------------------------------------------------------------------------------------------------------------
# the results store
def final_rows(result: Mapping[str, Any], segmenter: Segmenter, *, dataset: str) -> list[dict[str, Any]]:
    """The tidy rows (``stego_core.results``, stage ``"final"``) of one evaluation ``result`` of ``segmenter`` on
    ``dataset``: one per probe and metric; ``split`` is ``"val[:N]"`` (the first N validation images scored)."""
    info = segmenter.info
    base = dict(run_id=str(info.get("run_id") or info.get("checkpoint") or "segmenter"), dataset=dataset,
                backbone=info.get("backbone"), method=segmenter.method, code_dim=segmenter.code_dim,
                seed=info.get("seed"), protocol=result["protocol"], crf=bool(result["crf"]),
                split=f"val[:{int(result['n_images'])}]", step=info.get("step"), stage="final")
    return [{**base, "probe": probe, "metric": metric, "value": float(result[f"{probe}/{metric}"])}
            for probe in PROBES for metric in ("mIoU", "Accuracy")]


def write_final_rows(rows: Iterable[Mapping[str, Any]], *, name: str, key: Any, root: Any = None) -> Path:
    """Write final-evaluation rows into the results store: ``<root>/evaluations/<name>-<hash(key)>/results.csv``
    (atomic; ``key`` = everything that decides the numbers). Returns the file; ``results.load_results`` finds it."""
    return write_rows(artifact_dir("evaluations", name, key, root), rows)
