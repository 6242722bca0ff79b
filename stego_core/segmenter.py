"""The segmentation model every consumer uses: code map + cluster probe + linear probe (+ backbone, cluster map).

A ``Segmenter`` is one ``nn.Module`` whichever way it was made:

- ``code_map``: the STEGO head (``heads.STEGOHead``), a fitted projection (``ProjectionCode`` around a PCA / RP /
  h-NNE estimator of ``stego_core.projections``) or ``nn.Identity()`` — the DINO baseline, whose code is the raw
  backbone features, is that one module everywhere;
- ``cluster_probe`` (``probes.ClusterProbe``, K + E centres) and ``linear_probe`` (``probes.LinearProbe``, K classes);
- optionally ``backbone`` (``backbones.Backbone``: images -> features) and ``cluster_to_class`` (cluster id -> class,
  the Hungarian assignment of a labelled split; -1 for an unmatched cluster);
- ``info``: where it came from (run folder or checkpoint file, step, dataset, backbone, method, class names, ...).

Constructors: ``Segmenter.from_run(run_dir)`` (a folder written by ``stego_core.training.train``; ``which`` picks the
best or the last checkpoint) and ``Segmenter.from_checkpoint(path)`` (a released STEGO file read by
``stego_core.checkpoints``; it is checked against the dataset, classes, backbone and code dimension it is meant for
before any work). ``.to(device)`` moves every part; every method moves its inputs to the segmenter's device.

The prediction path (stego-spec §7.1-§7.2), the same for training-time validation, the paper's evaluation, the
explorer, ``segment`` and the quirk measurements:

1. ``code(feats)`` or ``image_code(img, flip=True)``: the code [B, D, h, w]; with ``flip`` the code of the mirrored
   image is mirrored back and averaged in (on the code, as the reference's evaluation does);
2. ``log_probs(code, size, probe)``: the code upsampled bilinearly (align_corners False) to ``size``, then
   ``log_softmax(2·cos(code, centres))`` (cluster) or ``log_softmax(linear_probe(code))`` (linear);
3. ``predict(code, size, probe, crf=False)`` (``predict_all`` for both probes from one upsampling): the argmax of
   the upsampled scores (cosine or logits; the same argmax as of the log-probabilities), or with ``crf`` of the
   DenseCRF marginals of the log-probabilities (``refine``, through ``stego_core.crf``), cluster ids mapped to
   classes when the segmenter carries a ``cluster_to_class`` map (``match(assignment)``).

Every method runs without gradients and in eval mode, restoring each module's mode afterwards (training validates
through a segmenter that shares its modules).
"""
from __future__ import annotations

import contextlib
import json
import os
import pickle
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import crf as crf_mod
from .backbones import load_backbone
from .checkpoints import LoadedCheckpoint, load_stego_checkpoint
from .config import PROTOCOLS, StegoError, check_choice, check_int, resolve_device
from .data import CITYSCAPES_CLASSES, COCOSTUFF27_CLASSES, POTSDAM_CLASSES, normalize_uint8
from .heads import STEGOHead
from .metrics import cluster_to_class
from .probes import PROBES, ClusterProbe, LinearProbe

__all__ = ["PROBES", "CLUSTER_ALPHA", "ProjectionCode", "Segmenter"]

CLUSTER_ALPHA = 2.0  # the evaluation's cluster log-probabilities: log_softmax(alpha * cos)
_PIECE_BYTES = 256 << 20  # upsampled code [b, D, H, W] per piece: D ~ 768 at 320 px is 300 MB per image
_CLASS_NAMES = {"cocostuff27": COCOSTUFF27_CLASSES, "cityscapes": CITYSCAPES_CLASSES, "potsdam": POTSDAM_CLASSES}


class ProjectionCode(nn.Module):
    """A fitted projection of ``stego_core.projections`` as a code map: feats [B,C,h,w] -> code [B,k,h,w] float32
    on the features' device. No parameters; under per-batch standardisation (the study's protocol) the code of an
    item depends on the batch it is projected with."""

    def __init__(self, projection: Any):
        super().__init__()
        self.projection = projection

    def forward(self, feats: Tensor) -> Tensor:
        return torch.as_tensor(self.projection.transform(feats)).to(torch.float32)

    def extra_repr(self) -> str:
        return repr(self.projection)


def _batch(name: str, x: Any, channels: int | None = None) -> Tensor:
    """``x`` as a float32 tensor [B, C, h, w] (with C = ``channels`` when given), else a one-line StegoError."""
    t = torch.as_tensor(x) if not isinstance(x, Tensor) else x
    if t.ndim != 4 or (channels is not None and t.shape[1] != channels):
        want = f"[B,{channels},h,w]" if channels is not None else "[B,C,h,w]"
        raise StegoError(f"{name}: expected a tensor {want}, got shape {tuple(t.shape)}")
    return t.float() if t.dtype != torch.float32 else t


def _crf_images(images: Any) -> Tensor:
    """The images the CRF reads: ImageNet-normalised float [B,3,H,W] as given, or uint8 [B,H,W,3] normalised."""
    if isinstance(images, Tensor) and images.is_floating_point():
        if images.ndim != 4 or images.shape[1] != 3:
            raise StegoError(f"images: expected normalised images [B,3,H,W], got shape {tuple(images.shape)}")
        return images.detach().cpu().float()
    arr = np.asarray(images.cpu() if isinstance(images, Tensor) else images)
    if arr.dtype != np.uint8 or arr.ndim != 4:
        raise StegoError(f"images: expected normalised float images [B,3,H,W] or uint8 images [B,H,W,3], got "
                         f"{arr.dtype} of shape {arr.shape}")
    return normalize_uint8(arr)


class Segmenter(nn.Module):
    """Code map + probes (+ backbone, cluster -> class map): see the module docstring."""

    def __init__(self, code_map: nn.Module, cluster_probe: ClusterProbe, linear_probe: LinearProbe, *,
                 backbone: nn.Module | None = None, cluster_to_class: Any = None, info: dict | None = None):
        super().__init__()
        if not isinstance(code_map, nn.Module):
            raise StegoError(f"code_map: expected an nn.Module (STEGOHead, ProjectionCode or nn.Identity), got "
                             f"{type(code_map).__name__}")
        if cluster_probe.code_dim != linear_probe.code_dim:
            raise StegoError(f"linear_probe: reads codes of dim {linear_probe.code_dim}, the cluster probe "
                             f"{cluster_probe.code_dim}")
        if cluster_probe.n_clusters < linear_probe.n_classes:
            raise StegoError(f"cluster_probe: expected at least {linear_probe.n_classes} clusters (the linear probe's "
                             f"classes), got {cluster_probe.n_clusters}")
        self.code_map = code_map
        self.cluster_probe = cluster_probe
        self.linear_probe = linear_probe
        self.register_module("backbone", backbone)
        anchor = next(cluster_probe.parameters()).device
        self.register_buffer("_anchor", torch.empty(0, device=anchor), persistent=False)  # follows .to(device)
        mapping = None if cluster_to_class is None else np.asarray(cluster_to_class, dtype=np.int64)
        if mapping is not None and mapping.shape != (cluster_probe.n_clusters,):
            raise StegoError(f"cluster_to_class: expected one class per cluster ({cluster_probe.n_clusters}), got "
                             f"shape {mapping.shape}")
        self.cluster_to_class = mapping
        self.info = dict(info or {})

    # ---- description ---------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self._anchor.device

    @property
    def code_dim(self) -> int:
        return int(self.cluster_probe.code_dim)

    @property
    def n_classes(self) -> int:
        return int(self.linear_probe.n_classes)

    @property
    def n_clusters(self) -> int:
        return int(self.cluster_probe.n_clusters)

    @property
    def method(self) -> str:
        """"stego" (a head), "dino" (identity) or the projection's method, unless ``info`` says otherwise."""
        if "method" in self.info:
            return str(self.info["method"])
        if isinstance(self.code_map, STEGOHead):
            return "stego"
        if isinstance(self.code_map, ProjectionCode):
            return str(getattr(self.code_map.projection, "method", "projection"))
        return "dino"

    @property
    def description(self) -> dict[str, Any]:
        """``info`` without the bulky entries (class names, palette, metrics): what made this segmenter."""
        return {k: v for k, v in self.info.items() if k not in ("class_names", "palette", "metrics")}

    def _replace(self, **changes: Any) -> Segmenter:
        """A new segmenter sharing this one's modules, with some parts replaced, on this one's device."""
        parts = dict(code_map=self.code_map, cluster_probe=self.cluster_probe, linear_probe=self.linear_probe,
                     backbone=self.backbone, cluster_to_class=self.cluster_to_class, info=self.info)
        parts.update(changes)
        return Segmenter(**parts).to(self.device)

    def match(self, assignment: tuple[Any, Any]) -> Segmenter:
        """This segmenter with the cluster -> class map of a Hungarian ``assignment`` (rows = clusters, cols = their
        classes, as ``UnsupervisedMetrics.compute()["assignment"]``); shares the modules."""
        return self._replace(cluster_to_class=cluster_to_class(assignment, self.n_clusters))

    def with_cluster_probe(self, cluster_probe: ClusterProbe) -> Segmenter:
        """This segmenter with another cluster probe (e.g. refitted with extra centres); no cluster map."""
        return self._replace(cluster_probe=cluster_probe, cluster_to_class=None)

    def with_backbone(self, backbone: nn.Module) -> Segmenter:
        """This segmenter with a backbone (moved to the segmenter's device), for ``image_code``."""
        return self._replace(backbone=backbone)

    # ---- the prediction path ---------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _inference(self) -> Iterator[None]:
        modes = [(m, m.training) for m in self.modules()]
        self.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            for m, mode in modes:
                m.training = mode

    def code(self, feats: Any) -> Tensor:
        """feats [B,C,h,w] (any device) -> code [B,D,h,w] float32 on the segmenter's device."""
        feats = _batch("feats", feats).to(self.device)
        with self._inference():
            return self.code_map(feats).float()

    def image_code(self, img: Any, *, flip: bool = True) -> Tensor:
        """Code [B,D,h,w] of ImageNet-normalised images [B,3,H,W] through the backbone and the code map; with
        ``flip`` averaged with the mirrored code of the mirrored images (on the code, as the reference)."""
        if self.backbone is None:
            raise StegoError("backbone: this segmenter has no backbone; pass one (with_backbone, or backbone= when "
                             "loading) or compute features first and call code(feats)")
        img = _batch("img", img, 3).to(self.device)
        with self._inference():
            code = self.code_map(self.backbone(img)).float()
            if flip:
                mirrored = self.code_map(self.backbone(torch.flip(img, dims=[3]))).float()
                code = (code + torch.flip(mirrored, dims=[3])) / 2
        return code

    def _upsampled(self, code: Any, size: Sequence[int], fns: Sequence[Callable[[Tensor], Tensor]]) -> list[Tensor]:
        """Each of ``fns`` of the code upsampled bilinearly to ``size`` = (H, W): one upsampling for all of them,
        in pieces of a few images (the upsampled code of one image is 300 MB at D = 768 and 320 px)."""
        code = _batch("code", code, self.code_dim).to(self.device)
        height, width = int(size[0]), int(size[1])
        per_image = 4 * code.shape[1] * height * width
        piece = max(1, min(code.shape[0], _PIECE_BYTES // max(per_image, 1)))
        parts: list[list[Tensor]] = [[] for _ in fns]
        with self._inference():
            for p in range(0, code.shape[0], piece):
                up = F.interpolate(code[p:p + piece], size=(height, width), mode="bilinear",
                                   align_corners=False)  # [b,D,H,W]
                for out, fn in zip(parts, fns):
                    out.append(fn(up))
        return [out[0] if len(out) == 1 else torch.cat(out) for out in parts]

    def _score_fn(self, probe: str) -> Callable[[Tensor], Tensor]:
        return self.cluster_probe.cosine if check_choice("probe", probe, PROBES) == "cluster" else self.linear_probe

    def _log_prob_fn(self, probe: str) -> Callable[[Tensor], Tensor]:
        if check_choice("probe", probe, PROBES) == "cluster":
            return lambda up: self.cluster_probe.log_probs(up, alpha=CLUSTER_ALPHA)
        return lambda up: torch.log_softmax(self.linear_probe(up), dim=1)

    def scores(self, code: Any, size: Sequence[int], probe: str = "cluster") -> Tensor:
        """Scores [B,K,H,W] of the upsampled code: cosine to the centres (cluster) or the linear probe's logits."""
        return self._upsampled(code, size, [self._score_fn(probe)])[0]

    def log_probs(self, code: Any, size: Sequence[int], probe: str = "cluster") -> Tensor:
        """Log-probabilities [B,K,H,W] at ``size``: log_softmax(2·cos) (cluster, K + E) or log_softmax(logits)."""
        return self._upsampled(code, size, [self._log_prob_fn(probe)])[0]

    def refine(self, log_probs: Any, images: Any, *, pool: Any = None, workers: int = 1,
               protocol: str = "original") -> list[np.ndarray]:
        """DenseCRF marginals [K,H,W] per image of ``log_probs`` [B,K,H,W] (``stego_core.crf``).

        images: the ImageNet-normalised images [B,3,H,W] or the uint8 images [B,H,W,3]. pool: a ``crf.CRFPool`` to
        use (its own protocol); else ``workers`` processes (1: in this process) with ``protocol``'s image bytes.
        """
        imgs = list(_crf_images(images))
        logits = list(torch.as_tensor(log_probs).detach().cpu())
        if len(imgs) != len(logits):
            raise StegoError(f"images: expected one image per map ({len(logits)}), got {len(imgs)}")
        if pool is not None:
            return pool.map(imgs, logits)
        check_choice("protocol", protocol, PROTOCOLS)
        if check_int("workers", workers, minimum=1) == 1:
            return [crf_mod.dense_crf(i, lg, protocol=protocol) for i, lg in zip(imgs, logits)]
        with crf_mod.CRFPool(workers, protocol=protocol, progress=False) as own:
            return own.map(imgs, logits)

    def predict(self, code: Any, size: Sequence[int], probe: str = "cluster", *, crf: bool = False,
                images: Any = None, pool: Any = None, workers: int = 1, protocol: str = "original",
                map_clusters: bool = True) -> Tensor:
        """Predictions int64 [B,H,W] on the CPU of the code [B,D,h,w] at ``size`` = (H, W).

        Without ``crf`` the argmax of ``scores``; with it the argmax of the DenseCRF marginals of ``log_probs``
        (``images`` needed, see ``refine``). Cluster ids become classes through ``cluster_to_class`` when the
        segmenter has one and ``map_clusters`` (-1 = a cluster without a class).
        """
        return self.predict_all(code, size, (probe,), crf=crf, images=images, pool=pool, workers=workers,
                                protocol=protocol, map_clusters=map_clusters)[probe]

    def predict_all(self, code: Any, size: Sequence[int], probes: Sequence[str] = PROBES, *, crf: bool = False,
                    images: Any = None, pool: Any = None, workers: int = 1, protocol: str = "original",
                    map_clusters: bool = True) -> dict[str, Tensor]:
        """``predict`` for several probes (probe -> int64 [B,H,W]) from one upsampling of the code."""
        if crf:
            if images is None:
                raise StegoError("images: the CRF needs the images (normalised [B,3,H,W] or uint8 [B,H,W,3])")
            maps = self._upsampled(code, size, [self._log_prob_fn(p) for p in probes])
            preds = [torch.from_numpy(np.stack([m.argmax(0) for m in self.refine(
                lp, images, pool=pool, workers=workers, protocol=protocol)]).astype(np.int64)) for lp in maps]
        else:
            scores = [self._score_fn(p) for p in probes]
            fns = [lambda up, fn=fn: fn(up).argmax(1) for fn in scores]
            preds = [pred.cpu() for pred in self._upsampled(code, size, fns)]  # [B,H,W] each
        out = dict(zip(probes, preds))
        if "cluster" in out and map_clusters and self.cluster_to_class is not None:
            out["cluster"] = torch.from_numpy(self.cluster_to_class[out["cluster"].numpy()])
        return out

    # ---- constructors ------------------------------------------------------------------------------------------------
    @classmethod
    def from_run(cls, run_dir: str | os.PathLike, which: str = "best", *, device: Any = "cpu",
                 backbone: nn.Module | None = None) -> Segmenter:
        """The segmenter of a run folder written by ``stego_core.training.train``: ``which`` = "best" (the best
        validation cluster mIoU, the study's model selection) or "last" (the final weights); eval mode, on
        ``device`` (checkpoints hold CPU tensors, so a run trained on a GPU loads anywhere). ``info`` holds the
        run's name, step, validation metrics, dataset, backbone, feature weights, method, class names, palette."""
        run_dir = Path(run_dir)
        check_choice("which", which, ("best", "last"))
        dev = resolve_device(device)
        meta_path = run_dir / "meta.json"
        if not meta_path.is_file():
            raise StegoError(f"run_dir: {run_dir} has no meta.json; expected a run folder written by "
                             f"stego_core.training.train (artifacts/runs/NAME-HASH)")
        meta = json.loads(meta_path.read_text())
        path = run_dir / f"{which}.pt"
        if not path.exists():
            raise StegoError(f"run_dir: {path} is missing; the run has not validated yet (train it first)")
        ck = torch.load(path, map_location="cpu", weights_only=False)
        cfg = ck["config"]
        code_dim, n_classes = int(cfg["code_dim"]), int(ck["n_classes"])
        if ck["head"] is not None:
            code_map: nn.Module = STEGOHead(int(ck["in_dim"]), code_dim)
            code_map.load_state_dict(ck["head"])
        elif (run_dir / "projection.pkl").exists():
            with open(run_dir / "projection.pkl", "rb") as fh:
                code_map = ProjectionCode(pickle.load(fh))
        else:
            code_map = nn.Identity()  # the DINO baseline: the features are the code
        cluster_probe = ClusterProbe(code_dim, n_classes + int(cfg.get("extra_clusters", 0)))
        cluster_probe.load_state_dict(ck["cluster_probe"])
        linear_probe = LinearProbe(code_dim, n_classes)
        linear_probe.load_state_dict(ck["linear_probe"])
        store_meta = dict(meta.get("train_store_meta") or {})
        info = {"source": "run", "run_dir": str(run_dir), "run_id": run_dir.name, "checkpoint": which,
                "step": int(ck["step"]), "metrics": dict(ck.get("metrics") or {}), "dataset": cfg["dataset"],
                "backbone": cfg["backbone"], "weights": store_meta.get("weights"), "method": cfg["method"],
                "code_dim": code_dim, "seed": cfg["seed"], "protocol": cfg["protocol"],
                "class_names": list(meta.get("class_names") or store_meta.get("class_names") or []),
                "palette": store_meta.get("palette")}
        return cls(code_map, cluster_probe, linear_probe, backbone=backbone, info=info).eval().to(dev)

    @classmethod
    def from_checkpoint(cls, checkpoint: Any, *, trusted: bool = False, device: Any = "cpu",
                        protocol: str = "original", weights: str | None = None, with_backbone: bool = True,
                        expected_dataset: str | None = None, expected_classes: int | None = None,
                        expected_backbone: str | None = None, expected_code_dim: int | None = None) -> Segmenter:
        """The segmenter of a released STEGO checkpoint (a ``.ckpt`` path or a ``checkpoints.LoadedCheckpoint``).

        The expected_* values (the dataset, its number of classes, the backbone and code dimension of the profile)
        are checked before the backbone is built: a mismatch is a StegoError naming both values. With
        ``with_backbone`` the ViT stored in the checkpoint (or ``weights``) becomes the backbone, with the
        positional-embedding rule of ``protocol``. ``trusted`` as in ``checkpoints.load_stego_checkpoint``.
        """
        dev = resolve_device(device)
        check_choice("protocol", protocol, PROTOCOLS)
        if isinstance(checkpoint, LoadedCheckpoint):
            ck = checkpoint
        else:
            if not Path(checkpoint).is_file():
                raise StegoError(f"checkpoint: file {checkpoint} not found; expected a released STEGO .ckpt file")
            ck = load_stego_checkpoint(checkpoint, trusted=trusted)
        name = Path(ck.path).name
        for what, have, want in (("dataset", ck.dataset, expected_dataset), ("classes", ck.n_classes, expected_classes),
                                 ("backbone", ck.backbone_name, expected_backbone),
                                 ("code dim", ck.code_dim, expected_code_dim)):
            if want is not None and have != want:
                raise StegoError(f"checkpoint: {name} has {what} {have!r} but this evaluation expects {want!r}; "
                                 f"use the checkpoint trained for it, or change the parameters")
        backbone = None
        if with_backbone:
            if weights is not None:
                backbone = load_backbone(ck.backbone_name, weights, protocol=protocol)
            else:
                backbone = ck.build_backbone(protocol=protocol)  # the ViT stored in the checkpoint
        names = _CLASS_NAMES.get(str(ck.dataset))
        info = {"source": "checkpoint", "checkpoint": str(ck.path), "run_id": f"checkpoint:{name}", "step": None,
                "dataset": ck.dataset, "backbone": ck.backbone_name, "weights": weights or "checkpoint",
                "method": "dino" if ck.head is None else "stego", "code_dim": ck.code_dim,
                "extra_clusters": ck.extra_clusters,
                "class_names": list(names) if names is not None and len(names) == ck.n_classes
                else [f"class {k}" for k in range(ck.n_classes)], "palette": None}
        code_map = nn.Identity() if ck.head is None else ck.head
        return cls(code_map, ck.cluster_probe, ck.linear_probe, backbone=backbone, info=info).eval().to(dev)
