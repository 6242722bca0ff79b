"""Probes on the code: the unsupervised cosine cluster probe and the supervised linear probe with its loss.

Spec §5.1-5.2:
- ``ClusterProbe``: K+E centres (standard-normal init); score s_k(x) = cos(x, mu_k) with F.normalize (eps 1e-12).
  Hard mode (alpha None): loss = -mean over pixels of max_k s_k (one-hot assignment, gradient only into the
  winning centres: mini-batch spherical k-means). Soft mode: p = softmax(alpha*s), loss = -mean sum_k p_k s_k.
  ``log_probs(code, alpha=2.0)`` are the CRF unaries of the evaluation; ``predict`` is argmax_k s_k.
- ``LinearProbe``: a 1x1 conv D->K with bias; ``linear_probe_loss`` upsamples the logits bilinearly
  (align_corners False) to the label size and takes the mean cross-entropy over pixels with 0 <= label < K.
Both are trained on a detached code, so they never update the head.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import StegoError, check_float, check_int

__all__ = ["PROBES", "ClusterProbe", "LinearProbe", "linear_probe_loss"]

#: The two probes every method is scored with, in the order tables and results list them.
PROBES = ("cluster", "linear")


def _check_code(code: Tensor, dim: int) -> None:
    if not isinstance(code, Tensor) or code.ndim != 4 or code.shape[1] != dim:
        shape = tuple(code.shape) if isinstance(code, Tensor) else type(code).__name__
        raise StegoError(f"code: expected a tensor [B,{dim},h,w], got {shape}")


class ClusterProbe(nn.Module):
    """Cosine k-means probe: ``centres`` [n_clusters, code_dim]; forward(code, alpha=None) -> (loss, probs)."""

    def __init__(self, code_dim: int, n_clusters: int):
        super().__init__()
        self.code_dim = check_int("code_dim", code_dim, minimum=1)
        self.n_clusters = check_int("n_clusters", n_clusters, minimum=1)
        self.centres = nn.Parameter(torch.randn(n_clusters, code_dim))

    def cosine(self, code: Tensor) -> Tensor:
        """Cosine similarity of every pixel's code with every centre: [B,D,H,W] -> [B,n_clusters,H,W]."""
        _check_code(code, self.code_dim)
        centres = F.normalize(self.centres, dim=1)  # [K,D]
        x = F.normalize(code, dim=1)  # [B,D,H,W]
        return torch.einsum("bdhw,kd->bkhw", x, centres)

    def forward(self, code: Tensor, alpha: float | None = None) -> tuple[Tensor, Tensor]:
        """(loss, probs [B,n_clusters,H,W]); hard one-hot assignment if alpha is None, else softmax(alpha*cos)."""
        cos = self.cosine(code)
        if alpha is None:
            winner = cos.argmax(dim=1)  # [B,H,W]
            probs = F.one_hot(winner, self.n_clusters).permute(0, 3, 1, 2).to(cos.dtype)  # [B,H,W,K] -> [B,K,H,W]
        else:
            probs = torch.softmax(check_float("alpha", alpha) * cos, dim=1)
        loss = -(probs * cos).sum(dim=1).mean()
        return loss, probs

    def log_probs(self, code: Tensor, alpha: float = 2.0) -> Tensor:
        """log_softmax(alpha * cos) over clusters: [B,n_clusters,H,W] (the evaluation's CRF unaries use alpha 2)."""
        return torch.log_softmax(check_float("alpha", alpha) * self.cosine(code), dim=1)

    @torch.no_grad()
    def predict(self, code: Tensor) -> Tensor:
        """Nearest centre by cosine: LongTensor [B,H,W]."""
        return self.cosine(code).argmax(dim=1)

    def extra_repr(self) -> str:
        return f"code_dim={self.code_dim}, n_clusters={self.n_clusters}"


class LinearProbe(nn.Module):
    """Supervised evaluation probe: a 1x1 conv (``conv``) D -> n_classes with bias; forward(code) -> logits."""

    def __init__(self, code_dim: int, n_classes: int):
        super().__init__()
        self.code_dim = check_int("code_dim", code_dim, minimum=1)
        self.n_classes = check_int("n_classes", n_classes, minimum=1)
        self.conv = nn.Conv2d(code_dim, n_classes, kernel_size=1)

    def forward(self, code: Tensor) -> Tensor:
        """logits [B,n_classes,h,w] at the code's resolution."""
        _check_code(code, self.code_dim)
        return self.conv(code)

    @torch.no_grad()
    def predict(self, code: Tensor) -> Tensor:
        """argmax of the logits: LongTensor [B,h,w]."""
        return self.forward(code).argmax(dim=1)


_IGNORE = -100  # label value cross_entropy skips (any label outside [0, K) is mapped to it)


def linear_probe_loss(logits: Tensor, label: Tensor) -> Tensor:
    """Mean cross-entropy of ``logits`` [B,K,h,w], bilinearly upsampled (align_corners False) to ``label``
    [B,H,W], over the pixels with 0 <= label < K (-1 and anything else out of range are ignored).

    If no pixel is valid the result is a zero that still carries the graph (the reference would give NaN).
    """
    if not isinstance(logits, Tensor) or logits.ndim != 4:
        raise StegoError(f"logits: expected a tensor [B,K,h,w], got "
                         f"{tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__}")
    if not isinstance(label, Tensor) or label.ndim != 3 or label.shape[0] != logits.shape[0]:
        raise StegoError(f"label: expected an integer tensor [{logits.shape[0]},H,W], got "
                         f"{tuple(label.shape) if isinstance(label, Tensor) else type(label).__name__}")
    if label.is_floating_point():
        raise StegoError(f"label: expected an integer tensor (int64, -1 = ignore), got dtype {label.dtype}")
    k = logits.shape[1]
    up = F.interpolate(logits, size=tuple(label.shape[-2:]), mode="bilinear", align_corners=False)
    label = label.to(up.device).long()
    keep = (label >= 0) & (label < k)
    if not bool(keep.any()):
        return up.sum() * 0.0
    # The reference gathers the valid pixels (logits[mask]) and averages their cross-entropy; ignore_index gives the
    # same mean without copying [B*H*W, K] logits there and back (about half the probe step's time on a CPU).
    return F.cross_entropy(up, torch.where(keep, label, torch.full_like(label, _IGNORE)), ignore_index=_IGNORE)
