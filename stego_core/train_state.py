"""The state of one training run and its step: modules, optimisers, random generators, progress, checkpoints.

``TrainState`` holds everything a run needs to continue bit for bit: the STEGO head (or the fixed code map of a
baseline), the cluster and linear probes, their Adam optimisers, the correspondence loss, the kNN-partner
generator, the run's own state of torch's global generator (channel dropout, loss points and negatives), the step,
the history and the best / last validation. ``build_state(cfg, in_dim, n_classes)`` initialises it as the reference
does (``torch.manual_seed(seed)`` before the modules); ``state.checkpoint(kind)`` / ``save_checkpoint`` is the one
writer of ``last.pt`` (everything, for resume) and ``best.pt`` (modules and metrics), ``state.load_last(ck)``
restores a ``last.pt`` (as DINO's ``restart_from_checkpoint``).

``train_step(state, feats, label, ...)`` is one optimisation step (spec §5.3): head forward in train mode, the
correspondence loss, the probe losses on the detached code, one backward, the Adam steps. The training loop
(``stego_core.training``), the fused sweep (``stego_core.fused``), the benchmark and the quirks chapter all call it.

``with state.own_rng():`` runs code under the run's own global-generator state (saved back on exit), so that runs
trained side by side draw exactly what each would draw alone.
"""
from __future__ import annotations

import contextlib
import copy
import pickle
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .config import atomic_write, code_hash
from .guards import disk_full_guard
from .heads import STEGOHead
from .losses import CorrespondenceLoss
from .probes import ClusterProbe, LinearProbe, linear_probe_loss
from .segmenter import ProjectionCode

__all__ = ["CKPT_VERSION", "TrainState", "StepOutput", "build_modules", "build_state", "train_step",
           "save_checkpoint", "save_pickle", "save_npz"]

CKPT_VERSION = 1
_CORR_SAMPLES = 20000  # code-correlation values kept per term for the histograms


def build_modules(cfg: Any, in_dim: int, n_classes: int):
    """(head or None, cluster probe, linear probe) of ``cfg``, initialised on the CPU after
    ``torch.manual_seed(cfg.seed)`` (the reference seeds everything once before building the model)."""
    torch.manual_seed(cfg.seed)
    head = STEGOHead(in_dim, cfg.code_dim) if cfg.method == "stego" else None
    cluster_probe = ClusterProbe(cfg.code_dim, n_classes + cfg.extra_clusters)
    linear_probe = LinearProbe(cfg.code_dim, n_classes)
    return head, cluster_probe, linear_probe


def _loss_of(cfg: Any) -> CorrespondenceLoss:
    return CorrespondenceLoss(
        pos_intra_weight=cfg.pos_intra_weight, pos_inter_weight=cfg.pos_inter_weight,
        neg_inter_weight=cfg.neg_inter_weight, pos_intra_shift=cfg.pos_intra_shift,
        pos_inter_shift=cfg.pos_inter_shift, neg_inter_shift=cfg.neg_inter_shift, pointwise=cfg.pointwise,
        feature_samples=cfg.feature_samples, neg_samples=cfg.neg_samples, zero_clamp=cfg.zero_clamp,
        stabilize=cfg.stabilize)


@dataclass(eq=False)
class TrainState:
    """One run's trainable modules, optimisers, generators and progress (module docstring)."""

    cfg: Any  # the TrainConfig (or any object with its fields)
    cluster_probe: ClusterProbe
    linear_probe: LinearProbe | None
    opt_cluster: torch.optim.Optimizer
    opt_linear: torch.optim.Optimizer | None
    head: STEGOHead | None = None  # None: the code is a fixed map of the features (step_map)
    opt_head: torch.optim.Optimizer | None = None
    loss_fn: CorrespondenceLoss | None = None
    code_map: nn.Module = field(default_factory=nn.Identity)  # the run's code on raw features
    step_map: nn.Module = field(default_factory=nn.Identity)  # the code each step applies (h-NNE: identity)
    partner_gen: torch.Generator | None = None  # kNN partner ranks, one fresh draw per access
    rng: Tensor | None = None  # this run's state of torch's global CPU generator (None: use it as it is)
    rng_cuda: Tensor | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    in_dim: int = 0
    n_classes: int = 0
    step: int = 0
    history: list = field(default_factory=list)  # {"step", "split", "metric", "value"} rows
    best: dict = field(default_factory=dict)  # step + metrics of the best validation (cluster mIoU)
    last_metrics: dict = field(default_factory=dict)  # step + metrics of the last validation
    _in_scope: bool = field(default=False, repr=False)  # inside own_rng()

    @property
    def modules(self) -> list[nn.Module]:
        return [m for m in (self.head, self.cluster_probe, self.linear_probe) if m is not None]

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [o for o in (self.opt_head, self.opt_cluster, self.opt_linear) if o is not None]

    def train(self, mode: bool = True) -> TrainState:
        for m in self.modules:
            m.train(mode)
        return self

    @contextlib.contextmanager
    def own_rng(self) -> Iterator[None]:
        """Run the block with this run's state of the global generator(s); the advanced state is kept on exit."""
        if self.rng is None or self._in_scope:
            yield
            return
        self._in_scope = True
        torch.set_rng_state(self.rng)
        if self.rng_cuda is not None:
            torch.cuda.set_rng_state(self.rng_cuda, self.device)
        try:
            yield
        finally:
            self._in_scope = False
            self.rng = torch.get_rng_state()
            if self.rng_cuda is not None:
                self.rng_cuda = torch.cuda.get_rng_state(self.device)

    def _rng_now(self) -> tuple[Tensor, Tensor | None]:
        if self.rng is not None and not self._in_scope:  # inside own_rng() the global generators are the run's
            return self.rng, self.rng_cuda
        cuda = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        return torch.get_rng_state(), cuda

    def checkpoint(self, kind: str, metrics: dict | None = None) -> dict[str, Any]:
        """The content of ``last.pt`` (``kind="last"``: all of the state) or ``best.pt`` (modules + metrics)."""
        ck = {"version": CKPT_VERSION, "config": self.cfg.to_dict(), "step": self.step, "code": code_hash(),
              "head": self.head.state_dict() if self.head is not None else None,
              "cluster_probe": self.cluster_probe.state_dict(), "linear_probe": self.linear_probe.state_dict()}
        if kind == "best":
            return {**ck, "in_dim": self.in_dim, "n_classes": self.n_classes, "metrics": metrics}
        rng, rng_cuda = self._rng_now()
        ck.update({
            "opt_head": self.opt_head.state_dict() if self.opt_head is not None else None,
            "opt_cluster": self.opt_cluster.state_dict(), "opt_linear": self.opt_linear.state_dict(),
            "rng_torch": rng, "rng_partner": self.partner_gen.get_state() if self.partner_gen is not None else None,
            "rng_cuda": rng_cuda, "history": self.history, "best": self.best, "last_metrics": self.last_metrics,
            "in_dim": self.in_dim, "n_classes": self.n_classes, "metrics": self.last_metrics,
        })
        return ck

    def load_last(self, ck: dict[str, Any]) -> None:
        """Restore a ``last.pt`` written by ``checkpoint("last")`` (the caller checks its config and version)."""
        if self.head is not None:
            self.head.load_state_dict(ck["head"])
            self.opt_head.load_state_dict(ck["opt_head"])
        self.cluster_probe.load_state_dict(ck["cluster_probe"])
        self.linear_probe.load_state_dict(ck["linear_probe"])
        self.opt_cluster.load_state_dict(ck["opt_cluster"])
        self.opt_linear.load_state_dict(ck["opt_linear"])
        if self.rng is not None:
            self.rng = ck["rng_torch"]
        else:
            torch.set_rng_state(ck["rng_torch"])
        if self.device.type == "cuda" and ck.get("rng_cuda") is not None:
            if self.rng_cuda is not None:
                self.rng_cuda = ck["rng_cuda"]
            else:
                torch.cuda.set_rng_state(ck["rng_cuda"], self.device)
        if self.partner_gen is not None and ck.get("rng_partner") is not None:
            self.partner_gen.set_state(ck["rng_partner"])
        self.step, self.history = ck["step"], ck["history"]
        self.best, self.last_metrics = ck["best"], ck["last_metrics"]

    def draw_partners(self, idx: Tensor, knn_table: Tensor) -> Tensor:
        """One kNN partner per item of ``idx`` at a fresh rank r ~ U{1..n_neighbors} (spec §4): [b] indices."""
        ranks = torch.randint(1, self.cfg.n_neighbors + 1, (len(idx),), generator=self.partner_gen)
        return knn_table[idx, ranks]


def build_state(cfg: Any, in_dim: int, n_classes: int, *, device: Any = "cpu", projection: Any = None,
                own_rng: bool = False) -> TrainState:
    """A fresh ``TrainState`` of ``cfg`` on ``device`` (modules initialised on the CPU first, so the initial weights
    do not depend on the device). ``projection``: the fitted projection of a PCA / RP / h-NNE run.
    Seeds torch's global generator with ``seed + 2`` (dropout, loss points, negatives); with ``own_rng`` that state
    is kept in the TrainState (``own_rng()``), so several states can train side by side."""
    dev = torch.device(device)
    head, cluster_probe, linear_probe = build_modules(cfg, in_dim, n_classes)
    for m in (head, cluster_probe, linear_probe):
        if m is not None:
            m.to(dev)
    code_map = head if head is not None else ProjectionCode(projection) if projection is not None else nn.Identity()
    state = TrainState(
        cfg=cfg, cluster_probe=cluster_probe, linear_probe=linear_probe,
        opt_cluster=torch.optim.Adam(cluster_probe.parameters(), lr=cfg.probe_lr),
        opt_linear=torch.optim.Adam(linear_probe.parameters(), lr=cfg.probe_lr),
        head=head, opt_head=torch.optim.Adam(head.parameters(), lr=cfg.lr) if head is not None else None,
        loss_fn=_loss_of(cfg) if head is not None else None, code_map=code_map,
        step_map=nn.Identity() if cfg.method == "hnne" else code_map,
        partner_gen=torch.Generator().manual_seed(cfg.seed + 1), device=dev, in_dim=in_dim, n_classes=n_classes)
    torch.manual_seed(cfg.seed + 2)  # global RNG: channel dropout, loss points and negatives
    if own_rng:
        state.rng = torch.get_rng_state()
        state.rng_cuda = torch.cuda.get_rng_state(dev) if dev.type == "cuda" else None
    return state


@dataclass
class StepOutput:
    """What one step computed (tensors, not synced): the summed loss, the probe losses, the loss terms."""

    loss: Tensor
    cluster_loss: Tensor
    linear_loss: Tensor | None
    terms: dict[str, Tensor]
    code_corr: dict[str, np.ndarray] | None = None

    def logs(self) -> dict[str, float]:
        """The synced training losses and mean code correlations (a host sync: call it every few steps)."""
        logs = {"loss/total": float(self.loss.detach()), "loss/cluster": float(self.cluster_loss.detach())}
        if self.linear_loss is not None:
            logs["loss/linear"] = float(self.linear_loss.detach())
        for key in ("pos_intra", "pos_inter", "neg_inter"):
            if key in self.terms:
                logs[f"loss/{key}"] = float(self.terms[key].detach())
        for key in ("cd_intra", "cd_inter", "cd_neg"):
            if key in self.terms:
                logs[f"cd/{key[3:]}"] = float(self.terms[key])
        return logs


def train_step(state: TrainState, feats: Tensor, label: Tensor | None, *, feats_pos: Tensor | None = None,
               code: Tensor | None = None, want_corr: bool = False) -> StepOutput:
    """One optimisation step of ``state`` on a batch (spec §5.3). Does not advance ``state.step``.

    feats [b,C,h,w] and label [b,H,W] of the batch (label None: no linear probe loss); feats_pos [b,C,h,w]: the
    features of each item's kNN partner (STEGO runs). code [b,D,h,w]: the batch's code when the caller computed it
    (probe-only runs; default ``state.step_map(feats)``). want_corr: keep samples of the code correlations.
    """
    cfg = state.cfg
    for opt in state.optimizers:
        opt.zero_grad(set_to_none=True)
    terms: dict[str, Tensor] = {}
    corr = None
    if state.head is not None:
        head = state.head
        if cfg.protocol == "original":
            f, code = head.forward_with_feats(feats)  # third dropout on the loss features (§1.3)
            f_pos, code_pos = head.forward_with_feats(feats_pos)
        else:
            f, code = feats, head(feats)
            f_pos, code_pos = feats_pos, head(feats_pos)
        terms = state.loss_fn(f, f_pos, code, code_pos, return_corr=want_corr)
        loss = cfg.correspondence_weight * terms["total"]
        probe_code = code.detach()
        if want_corr:
            corr = corr_samples(terms)
    else:
        probe_code = state.step_map(feats) if code is None else code
        loss = probe_code.new_zeros(())
    cluster_loss, _ = state.cluster_probe(probe_code)
    linear_loss = None
    loss = loss + cluster_loss
    if label is not None and state.linear_probe is not None:
        linear_loss = linear_probe_loss(state.linear_probe(probe_code), label)
        loss = loss + linear_loss
    loss.backward()
    for opt in state.optimizers:
        opt.step()
    return StepOutput(loss, cluster_loss, linear_loss, terms, corr)


def corr_samples(terms: dict[str, Tensor]) -> dict[str, np.ndarray]:
    """Up to _CORR_SAMPLES values of each code-correlation tensor (seeded subsample, no RNG side effects)."""
    gen = torch.Generator().manual_seed(0)
    out = {}
    for key in ("intra", "inter", "neg"):
        flat = terms[f"corr_{key}"].reshape(-1)
        if flat.numel() > _CORR_SAMPLES:
            flat = flat[torch.randperm(flat.numel(), generator=gen)[:_CORR_SAMPLES].to(flat.device)]
        out[key] = flat.detach().cpu().numpy().astype(np.float32)
    return out


# ---------------------------------------------------------------------------------------------------------------
# atomic writers of a run's files


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


def save_checkpoint(state: TrainState, path: Path, kind: str, metrics: dict | None = None) -> None:
    """The one checkpoint writer: ``state.checkpoint(kind, metrics)`` with CPU tensors, atomically at ``path``."""
    ck = _cpu(state.checkpoint(kind, metrics))
    need = 2 * sum(p.numel() * p.element_size() for m in state.modules for p in m.state_dict().values())
    guard = disk_full_guard(Path(path).parent, need, f"the training run {Path(path).parent.name}")
    with guard, atomic_write(path) as fh:
        torch.save(ck, fh)  # need: last.pt and best.pt, the modules' weights (optimiser moments: x3 for last.pt)


def save_pickle(obj: Any, path: Path) -> None:
    with atomic_write(path) as fh:
        pickle.dump(obj, fh)


def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with atomic_write(path) as fh:
        np.savez(fh, **arrays)
