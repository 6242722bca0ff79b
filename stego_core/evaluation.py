"""The paper's final evaluation protocol: flip-averaged code -> probes -> optional DenseCRF -> pooled metrics.

What ``eval_segmentation.py`` computes (stego-spec §7.2, §1.5, quirk 10):

1. code = ½·(head(feats(x)) + hflip(head(feats(hflip(x))))) — the average is taken on the **head output**
   (``head=None`` is the DINO baseline: the code is the raw backbone features);
2. the code [B, D, h, w] is upsampled bilinearly (align_corners False) to the label resolution;
3. linear log-probabilities = log_softmax(linear_probe(code)); cluster log-probabilities =
   log_softmax(2·cos(code, centres));
4. with ``crf=True`` each of the two maps goes through DenseCRF per image (``stego_core.crf``); predictions are
   the argmaxes;
5. one confusion matrix per probe is pooled over the whole split: Hungarian matching for the cluster probe,
   identity for the linear probe (``stego_core.metrics.UnsupervisedMetrics``); mIoU and accuracy ×100.

Entry points: ``evaluate`` (images through backbone and head) and ``evaluate_codes`` (precomputed code or cached
features, e.g. from a feature store, so no backbone is needed). ``flip_code`` is step 1 alone. The papers'
published numbers, with their sources, are in ``stego_core.papers``.
"""
from __future__ import annotations

from typing import Any, Iterable, Iterator, Mapping

import numpy as np

from .config import PROTOCOLS, StegoError, check_choice, check_int

__all__ = ["flip_code", "evaluate", "evaluate_codes"]


# ---------------------------------------------------------------------------------------------------------------
# step 1: the code
def flip_code(backbone: Any, head: Any, img: Any, *, flip: bool = True) -> Any:
    """Code [B, D, h, w] of ImageNet-normalised ``img`` [B,3,H,W] without gradients.

    flip=True averages head(feats(img)) with hflip(head(feats(hflip(img)))) — on the head output, as the reference
    evaluation does. ``head=None``: the code is the backbone features (DINO baseline).
    """
    import torch

    if not isinstance(img, torch.Tensor) or img.ndim != 4 or img.shape[1] != 3:
        shape = tuple(img.shape) if isinstance(img, torch.Tensor) else type(img).__name__
        raise StegoError(f"img: expected a normalised image batch [B,3,H,W], got {shape}")
    device = _module_device(backbone, img.device)
    img = img.to(device=device, dtype=torch.float32)

    def code_of(x):
        feats = backbone(x)  # [B,C,h,w]
        return feats if head is None else head(feats)

    was_training = head.training if head is not None else False
    if head is not None:
        head.eval()
    try:
        with torch.no_grad():
            code = code_of(img).float()
            if flip:
                code_flipped = code_of(torch.flip(img, dims=[3])).float()
                code = (code + torch.flip(code_flipped, dims=[3])) / 2
    finally:
        if head is not None:
            head.train(was_training)
    return code


def _module_device(module: Any, default: Any) -> Any:
    try:
        return next(module.parameters()).device
    except (StopIteration, AttributeError):
        return default


# ---------------------------------------------------------------------------------------------------------------
# steps 2-5
def _to_normalised(batch: Mapping[str, Any]) -> Any:
    """The normalised images [B,3,H,W] of a batch: ``img`` as is, or ``image`` (uint8 [B,H,W,3]) normalised."""
    import torch

    if "img" in batch and batch["img"] is not None:
        return torch.as_tensor(batch["img"]).float().cpu()
    if "image" in batch and batch["image"] is not None:
        u8 = torch.as_tensor(np.asarray(batch["image"]))
        if u8.ndim != 4 or u8.shape[-1] != 3:
            raise StegoError(f"image: expected uint8 images [B,H,W,3], got shape {tuple(u8.shape)}")
        x = u8.permute(0, 3, 1, 2).float() / 255.0  # [B,H,W,3] -> [B,3,H,W]
        mean = torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1)
        std = torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)
        return (x - mean) / std
    raise StegoError("crf: the batches need images for the CRF: an 'img' (normalised [B,3,H,W]) or 'image' "
                     "(uint8 [B,H,W,3]) entry")


def evaluate_codes(batches: Iterable[Mapping[str, Any]], cluster_probe: Any, linear_probe: Any, *,
                   head: Any = None, crf: bool = False, workers: int | None = None, protocol: str = "original",
                   class_names: list[str] | None = None, keep_predictions: int = 0,
                   progress: bool = True) -> dict[str, Any]:
    """Steps 2-5 of the protocol on precomputed code.

    batches: dicts with ``label`` (int64 [B,H,W], -1 = ignore) and either ``code`` [B,D,h,w] or ``feats``
        [B,C,h,w] (then ``code = head(feats)``, or the features themselves when ``head`` is None); with ``crf``
        also ``img`` (normalised [B,3,H,W]) or ``image`` (uint8 [B,H,W,3], as a feature store keeps it).
        Optional ``index`` (ids of the images, for ``keep_predictions``).
    cluster_probe, linear_probe: fitted ``ClusterProbe`` / ``LinearProbe``; K = the linear probe's classes,
        extra clusters = the cluster probe's centres beyond K.
    crf: refine both log-probability maps with DenseCRF (``workers`` processes, ``protocol`` for its image bytes).
    protocol: also passed to the metrics (``"corrected"`` counts predictions on extra clusters as errors).
    keep_predictions: how many images' predictions (cluster ids mapped to classes, linear classes, labels) to return.

    A split without a single labelled pixel (e.g. a ``directory`` dataset without label files, all -1) is a
    StegoError rather than NaN metrics.

    Returns a dict: ``"cluster/mIoU"``, ``"cluster/Accuracy"``, ``"linear/mIoU"``, ``"linear/Accuracy"`` (floats
    ×100), ``"cluster"`` and ``"linear"`` (the full ``UnsupervisedMetrics.compute()`` dicts with confusion
    matrices and per-class values), ``n_images``, ``crf``, ``protocol`` and, if asked, ``predictions``.
    """
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    from .crf import CRFPool
    from .metrics import UnsupervisedMetrics

    check_choice("protocol", protocol, PROTOCOLS)
    keep = check_int("keep_predictions", keep_predictions, minimum=0)
    n_classes = int(getattr(linear_probe, "n_classes", 0) or _out_channels(linear_probe))
    n_clusters = int(getattr(cluster_probe, "n_clusters", 0) or cluster_probe.centres.shape[0])
    if n_clusters < n_classes:
        raise StegoError(f"cluster_probe: expected at least {n_classes} clusters (the linear probe's classes), "
                         f"got {n_clusters}")
    cluster_metrics = UnsupervisedMetrics(n_classes, extra_clusters=n_clusters - n_classes, hungarian=True,
                                          protocol=protocol)
    linear_metrics = UnsupervisedMetrics(n_classes, hungarian=False, protocol=protocol)
    kept: dict[str, list] = {"index": [], "cluster": [], "linear": [], "label": []}
    n_images = 0
    n_labelled = 0  # pixels with a class in 0..K-1 (the metrics ignore every other pixel)
    modules = [m for m in (head, cluster_probe, linear_probe) if m is not None]
    states = [m.training for m in modules]
    for m in modules:
        m.eval()
    pool = CRFPool(workers, protocol=protocol, progress=False) if crf else None
    try:
        for batch in tqdm(batches, desc="evaluate", unit="batch", disable=not progress):
            label = torch.as_tensor(batch["label"]).long()
            if label.ndim != 3:
                raise StegoError(f"label: expected [B,H,W], got shape {tuple(label.shape)}")
            with torch.no_grad():
                if batch.get("code") is not None:
                    code = torch.as_tensor(batch["code"]).float()
                elif batch.get("feats") is not None:
                    feats = torch.as_tensor(batch["feats"]).float()
                    code = feats if head is None else head(feats.to(_module_device(head, feats.device)))
                else:
                    raise StegoError("batches: each batch needs a 'code' or a 'feats' entry")
                if code.ndim != 4 or code.shape[0] != label.shape[0]:
                    raise StegoError(f"code: expected [{label.shape[0]},D,h,w] matching the labels, "
                                     f"got {tuple(code.shape)}")
                dev = _module_device(linear_probe, code.device)
                code = F.interpolate(code.to(dev), size=tuple(label.shape[-2:]), mode="bilinear",
                                     align_corners=False)  # [B,D,H,W]
                linear_lp = torch.log_softmax(linear_probe(code), dim=1).cpu()  # [B,K,H,W]
                cluster_lp = cluster_probe.log_probs(code, alpha=2.0).cpu()  # [B,K+E,H,W]
            if pool is not None:
                images = _to_normalised(batch)
                q_lin = pool.map(list(images), list(linear_lp))
                q_clu = pool.map(list(images), list(cluster_lp))
                linear_pred = torch.from_numpy(np.stack([q.argmax(0) for q in q_lin]))  # [B,H,W]
                cluster_pred = torch.from_numpy(np.stack([q.argmax(0) for q in q_clu]))
            else:
                linear_pred = linear_lp.argmax(1)
                cluster_pred = cluster_lp.argmax(1)
            n_labelled += int(((label >= 0) & (label < n_classes)).sum())
            linear_metrics.update(linear_pred, label)
            cluster_metrics.update(cluster_pred, label)
            if n_images < keep:
                take = min(keep - n_images, label.shape[0])
                index = batch.get("index")
                index = (torch.as_tensor(index)[:take].tolist() if index is not None
                         else list(range(n_images, n_images + take)))
                kept["index"] += index
                kept["cluster"].append(cluster_pred[:take].numpy())
                kept["linear"].append(linear_pred[:take].numpy())
                kept["label"].append(label[:take].numpy())
            n_images += label.shape[0]
    finally:
        if pool is not None:
            pool.close()
        for m, s in zip(modules, states):
            m.train(s)
    if n_images == 0:
        raise StegoError("batches: nothing to evaluate (empty dataset or loader)")
    if n_labelled == 0:
        raise StegoError(f"label: no labelled pixels in this split (all -1, or outside 0..{n_classes - 1}); metrics "
                         f"need labels — use stego_core.segment.segment_images for unlabelled data")
    cluster = cluster_metrics.compute(class_names)
    linear = linear_metrics.compute(class_names)
    out: dict[str, Any] = {
        "cluster/mIoU": cluster["mIoU"], "cluster/Accuracy": cluster["Accuracy"],
        "linear/mIoU": linear["mIoU"], "linear/Accuracy": linear["Accuracy"],
        "cluster": cluster, "linear": linear,
        "n_images": n_images, "crf": bool(crf), "protocol": protocol,
    }
    if keep:
        rows, cols = cluster["assignment"]
        to_class = np.full(n_clusters, -1, dtype=np.int64)  # cluster id -> matched class (-1: unmatched)
        to_class[np.asarray(rows)] = np.asarray(cols)
        out["predictions"] = {
            "index": kept["index"],
            "cluster": to_class[np.concatenate(kept["cluster"])],  # [n,H,W] class ids, -1 = unmatched cluster
            "cluster_raw": np.concatenate(kept["cluster"]),  # [n,H,W] cluster ids
            "linear": np.concatenate(kept["linear"]),
            "label": np.concatenate(kept["label"]),
        }
    return out


def _out_channels(linear_probe: Any) -> int:
    for p in linear_probe.parameters():
        if p.ndim >= 2:
            return int(p.shape[0])
    raise StegoError("linear_probe: cannot tell its number of classes (no weight tensor)")


def evaluate(backbone: Any, head: Any, cluster_probe: Any, linear_probe: Any, dataset_or_loader: Any, *,
             flip: bool = True, crf: bool = False, workers: int | None = None, protocol: str = "original",
             batch_size: int = 8, class_names: list[str] | None = None, keep_predictions: int = 0,
             progress: bool = True) -> dict[str, Any]:
    """The paper's final evaluation of (backbone, head, probes) on a dataset or a DataLoader.

    dataset_or_loader: a SegDataset (read in order, ``batch_size`` images per batch) or any iterable of batches
        with ``img`` [B,3,H,W] (ImageNet-normalised), ``label`` [B,H,W] and optionally ``index``.
    head: a STEGOHead, or None for the DINO baseline (code = backbone features).
    flip: average the head output over the image and its horizontal flip (the reference's test-time augmentation).
    crf, workers, protocol, class_names, keep_predictions: as in ``evaluate_codes``; class names default to the
        dataset's ``class_names``.
    """
    check_int("batch_size", batch_size, minimum=1)
    loader = dataset_or_loader
    if hasattr(dataset_or_loader, "__getitem__") and hasattr(dataset_or_loader, "__len__") \
            and not hasattr(dataset_or_loader, "batch_size"):
        from torch.utils.data import DataLoader

        loader = DataLoader(dataset_or_loader, batch_size=batch_size, shuffle=False)
    if class_names is None:
        ds = getattr(loader, "dataset", dataset_or_loader)
        names = getattr(ds, "class_names", None)
        n_classes = getattr(linear_probe, "n_classes", None)
        if names is not None and n_classes is not None and len(names) == n_classes:
            class_names = list(names)

    def code_batches() -> Iterator[dict[str, Any]]:
        for batch in loader:
            if not isinstance(batch, Mapping) or "img" not in batch or "label" not in batch:
                raise StegoError("dataset_or_loader: expected batches as dicts with 'img' and 'label'")
            out = dict(batch)
            out["code"] = flip_code(backbone, head, batch["img"], flip=flip)
            yield out

    return evaluate_codes(code_batches(), cluster_probe, linear_probe, head=None, crf=crf, workers=workers,
                          protocol=protocol, class_names=class_names, keep_predictions=keep_predictions,
                          progress=progress)
