"""The STEGO correspondence loss: feature/code correlation tensors, point sampling and the three pair terms.

Definitions follow stego-spec.md §3 (and the quirks in §10):

- ``tensor_correlation(a, b)``: cosine correlation of every location of ``a`` with every location of ``b``
  (channel-normalised with eps 1e-10) -> [B, H, W, I, J].
- ``pair_correspondence_loss``: the elementwise pair loss ``-clamp(C, lo, hi) * (F - shift)`` where F is the
  (optionally pointwise-centred) feature correlation, computed without gradient, and C the code correlation.
- ``super_perm``: the reference's "not-quite-permutation" used to pick negative partners within a batch.
- ``sample_points``: bilinear ``grid_sample`` at [-1, 1] coordinates with the reference's transposed grid.
- ``CorrespondenceLoss``: the module that samples points and sums the intra / inter / negative terms.

Random draws, when the module makes them itself, happen in the reference's order: coords1, coords2 (each
``torch.rand([B, S, S, 2]) * 2 - 1``), then one ``torch.randperm`` per negative sample.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import StegoError, check_float, check_int

__all__ = [
    "tensor_correlation",
    "pair_correspondence_loss",
    "super_perm",
    "sample_points",
    "CorrespondenceLoss",
]

_NORM_EPS = 1e-10  # the reference normalises loss inputs with eps 1e-10 (not PyTorch's default 1e-12)


def _check_map(name: str, t: Tensor) -> None:
    if not isinstance(t, Tensor):
        raise StegoError(f"{name}: expected a torch.Tensor [B,C,H,W], got {type(t).__name__}")
    if t.ndim != 4:
        raise StegoError(f"{name}: expected a 4-d tensor [B,C,H,W], got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise StegoError(f"{name}: expected a floating-point tensor, got dtype {t.dtype}")


def tensor_correlation(a: Tensor, b: Tensor) -> Tensor:
    """Cosine correlation of ``a`` [B,C,H,W] with ``b`` [B,C,I,J] -> [B,H,W,I,J].

    ``out[n, h, w, i, j] = <a[n,:,h,w] / |a[n,:,h,w]|, b[n,:,i,j] / |b[n,:,i,j]|>`` with the norms clamped at 1e-10.
    """
    _check_map("a", a)
    _check_map("b", b)
    if a.shape[:2] != b.shape[:2]:
        raise StegoError(f"b: expected the same batch and channel sizes as a {tuple(a.shape[:2])}, "
                         f"got {tuple(b.shape[:2])}")
    a_hat = F.normalize(a, dim=1, eps=_NORM_EPS)
    b_hat = F.normalize(b, dim=1, eps=_NORM_EPS)
    # [n,c,h,w] x [n,c,i,j] -> [n,h,w,i,j]
    return torch.einsum("nchw,ncij->nhwij", a_hat, b_hat)


def pair_correspondence_loss(
    feats_a: Tensor,
    feats_b: Tensor,
    code_a: Tensor,
    code_b: Tensor,
    shift: float,
    *,
    pointwise: bool,
    zero_clamp: bool = True,
    stabilize: bool = False,
) -> tuple[Tensor, Tensor]:
    """Elementwise STEGO pair loss and the code correlation (spec §3.3-3.4).

    Returns ``(loss, code_corr)``, both [B,H,W,I,J]; ``loss.mean()`` is the term's value. The feature
    correlation is computed without gradient (``feats_*`` never receive one). ``pointwise`` centres every anchor's
    row of the feature correlation over (i, j) and then restores the original global mean. ``zero_clamp`` clamps
    the code correlation at 0 from below (else at -9999); ``stabilize`` (the reference's ``stabalize``) also clamps
    it at 0.8 from above.
    """
    shift = check_float("shift", shift)
    for side, f, c in (("a", feats_a, code_a), ("b", feats_b, code_b)):
        _check_map(f"feats_{side}", f)
        _check_map(f"code_{side}", c)
        if f.shape[0] != c.shape[0] or f.shape[-2:] != c.shape[-2:]:
            raise StegoError(f"code_{side}: expected batch and spatial size of feats_{side} "
                             f"{(f.shape[0], *f.shape[-2:])}, got {(c.shape[0], *c.shape[-2:])}")
    with torch.no_grad():
        fd = tensor_correlation(feats_a.detach(), feats_b.detach())  # [B,H,W,I,J]
        if pointwise:
            old_mean = fd.mean()
            fd = fd - fd.mean(dim=(3, 4), keepdim=True)  # centre each anchor (n,h,w) over its partners (i,j)
            fd = fd - fd.mean() + old_mean
    cd = tensor_correlation(code_a, code_b)  # [B,H,W,I,J], with gradient
    lo = 0.0 if zero_clamp else -9999.0
    clamped = cd.clamp(lo, 0.8) if stabilize else cd.clamp(lo)
    loss = -clamped * (fd - shift)
    return loss, cd


def super_perm(size: int, generator: torch.Generator | None = None, *, device=None) -> Tensor:
    """The reference's negative-partner draw: a random permutation of 0..size-1 whose fixed points n are
    replaced by n+1 (mod size). Duplicates are possible (it is not always a permutation), but n never maps to
    itself when size > 1. Returns a LongTensor [size]."""
    size = check_int("size", size, minimum=1)
    perm = torch.randperm(size, generator=generator, device=device, dtype=torch.long)
    fixed = perm == torch.arange(size, device=perm.device)
    perm[fixed] += 1
    return perm % size


def sample_points(t: Tensor, coords: Tensor) -> Tensor:
    """Bilinearly sample the map ``t`` [B,C,H,W] at ``coords`` [B,P,Q,2] -> [B,C,Q,P].

    ``coords[..., 0]`` is x (width axis), ``coords[..., 1]`` is y (height axis), both in [-1, 1] with -1/+1 at
    the centres of the first/last token (align_corners=True); outside points use border padding. As in the
    reference the grid is transposed first, so output location (p, q) reads ``coords[b, q, p]``.
    """
    _check_map("t", t)
    if not isinstance(coords, Tensor) or coords.ndim != 4 or coords.shape[-1] != 2:
        shape = tuple(coords.shape) if isinstance(coords, Tensor) else type(coords).__name__
        raise StegoError(f"coords: expected a tensor [B,P,Q,2] of (x, y) in [-1, 1], got {shape}")
    if coords.shape[0] != t.shape[0]:
        raise StegoError(f"coords: expected batch size {t.shape[0]} to match the map, got {coords.shape[0]}")
    grid = coords.to(dtype=t.dtype, device=t.device).permute(0, 2, 1, 3)  # [B,P,Q,2] -> [B,Q,P,2]
    return F.grid_sample(t, grid, mode="bilinear", padding_mode="border", align_corners=True)


class CorrespondenceLoss(nn.Module):
    """STEGO's contrastive correlation loss over an image batch, its kNN partners and random negatives.

    ``forward(feats, feats_pos, code, code_pos)`` samples S x S points per image (``coords1`` on the images,
    ``coords2`` on partners and negatives), then computes
      intra = l((F1,G1),(F1,G1); pos_intra_shift)   (same points both sides, trivial self-matches included)
      inter = l((F1,G1),(F2,G2); pos_inter_shift)
      neg   = mean over ``neg_samples`` draws p of l((F1,G1),(samp(f[p],P2), samp(g[p],P2)); neg_inter_shift)
    and ``total = pos_inter_weight*inter + pos_intra_weight*intra + neg_inter_weight*neg`` (the reference's
    summation order). ``feats`` should already carry the training-time channel dropout (see
    ``STEGOHead.forward_with_feats``); they never receive gradient.
    """

    def __init__(
        self,
        *,
        pos_intra_weight: float,
        pos_inter_weight: float,
        neg_inter_weight: float,
        pos_intra_shift: float,
        pos_inter_shift: float,
        neg_inter_shift: float,
        pointwise: bool,
        feature_samples: int = 11,  # S: points per axis, S*S points per image (reference 11)
        neg_samples: int = 5,  # negative draws per step (reference 5); 0 disables the negative term
        zero_clamp: bool = True,  # clamp the code correlation at 0 from below (reference default)
        stabilize: bool = False,  # also clamp it at 0.8 from above (reference "stabalize", default off)
    ):
        super().__init__()
        self.pos_intra_weight = check_float("pos_intra_weight", pos_intra_weight)
        self.pos_inter_weight = check_float("pos_inter_weight", pos_inter_weight)
        self.neg_inter_weight = check_float("neg_inter_weight", neg_inter_weight)
        self.pos_intra_shift = check_float("pos_intra_shift", pos_intra_shift)
        self.pos_inter_shift = check_float("pos_inter_shift", pos_inter_shift)
        self.neg_inter_shift = check_float("neg_inter_shift", neg_inter_shift)
        self.pointwise = bool(pointwise)
        self.feature_samples = check_int("feature_samples", feature_samples, minimum=1)
        self.neg_samples = check_int("neg_samples", neg_samples, minimum=0)
        self.zero_clamp = bool(zero_clamp)
        self.stabilize = bool(stabilize)

    def extra_repr(self) -> str:
        return (f"weights(intra={self.pos_intra_weight}, inter={self.pos_inter_weight}, neg={self.neg_inter_weight}), "
                f"shifts(intra={self.pos_intra_shift}, inter={self.pos_inter_shift}, neg={self.neg_inter_shift}), "
                f"pointwise={self.pointwise}, S={self.feature_samples}, neg_samples={self.neg_samples}, "
                f"zero_clamp={self.zero_clamp}, stabilize={self.stabilize}")

    def _pair(self, fa, fb, ca, cb, shift):
        return pair_correspondence_loss(fa, fb, ca, cb, shift, pointwise=self.pointwise,
                                        zero_clamp=self.zero_clamp, stabilize=self.stabilize)

    def _check_inputs(self, feats, feats_pos, code, code_pos) -> int:
        for name, t in (("feats", feats), ("feats_pos", feats_pos), ("code", code), ("code_pos", code_pos)):
            _check_map(name, t)
        b = feats.shape[0]
        for name, t in (("feats_pos", feats_pos), ("code", code), ("code_pos", code_pos)):
            if t.shape[0] != b:
                raise StegoError(f"{name}: expected batch size {b} (as feats), got {t.shape[0]}")
        if feats_pos.shape[1] != feats.shape[1]:
            raise StegoError(f"feats_pos: expected {feats.shape[1]} channels (as feats), got {feats_pos.shape[1]}")
        if code_pos.shape[1] != code.shape[1]:
            raise StegoError(f"code_pos: expected {code.shape[1]} channels (as code), got {code_pos.shape[1]}")
        if feats.shape[-2:] != code.shape[-2:]:
            raise StegoError(f"code: expected the spatial size of feats {tuple(feats.shape[-2:])}, "
                             f"got {tuple(code.shape[-2:])}")
        if feats_pos.shape[-2:] != code_pos.shape[-2:]:
            raise StegoError(f"code_pos: expected the spatial size of feats_pos {tuple(feats_pos.shape[-2:])}, "
                             f"got {tuple(code_pos.shape[-2:])}")
        return b

    def _check_perms(self, perms: Sequence[Tensor], b: int, device) -> list[Tensor]:
        if isinstance(perms, Tensor) or not isinstance(perms, Sequence) or len(perms) != self.neg_samples:
            got = f"a {type(perms).__name__}" + (f" of length {len(perms)}" if isinstance(perms, Sequence) else "")
            raise StegoError(f"perms: expected a list of neg_samples={self.neg_samples} LongTensors [B], got {got}")
        out = []
        for k, p in enumerate(perms):
            p = torch.as_tensor(p, device=device)
            if p.shape != (b,) or p.is_floating_point() or (b and (int(p.min()) < 0 or int(p.max()) >= b)):
                raise StegoError(f"perms: entry {k} must be an integer tensor [{b}] with values in [0, {b}), "
                                 f"got shape {tuple(p.shape)} dtype {p.dtype}")
            out.append(p.long())
        return out

    def forward(
        self,
        feats: Tensor,
        feats_pos: Tensor,
        code: Tensor,
        code_pos: Tensor,
        *,
        coords1: Tensor | None = None,
        coords2: Tensor | None = None,
        perms: Sequence[Tensor] | None = None,
        generator: torch.Generator | None = None,
        return_corr: bool = False,
    ) -> dict[str, Tensor]:
        """Loss terms for one batch.

        feats [B,C,h,w], feats_pos [B,C,h',w'] (kNN partners), code [B,D,h,w], code_pos [B,D,h',w'].
        ``coords1``/``coords2`` [B,S,S,2] and ``perms`` (list of ``neg_samples`` LongTensors [B]) are drawn
        from ``generator`` (or torch's global RNG) when not given, in the order coords1, coords2, perms.

        Returns floats tensors ``pos_intra``, ``pos_inter``, ``neg_inter`` (term means, with gradient), ``total``
        (weighted sum), and the detached mean code correlations ``cd_intra``, ``cd_inter``, ``cd_neg``; with
        ``return_corr=True`` also the detached code-correlation tensors ``corr_intra``, ``corr_inter``,
        ``corr_neg`` (the negatives concatenated along the batch axis) for histograms.
        """
        b = self._check_inputs(feats, feats_pos, code, code_pos)
        s = self.feature_samples
        dev = feats.device
        if coords1 is None:
            coords1 = torch.rand([b, s, s, 2], generator=generator, device=dev) * 2 - 1
        if coords2 is None:
            coords2 = torch.rand([b, s, s, 2], generator=generator, device=dev) * 2 - 1
        if perms is None:
            perms = [super_perm(b, generator, device=dev) for _ in range(self.neg_samples)]
        else:
            perms = self._check_perms(perms, b, dev)

        feats, feats_pos = feats.detach(), feats_pos.detach()
        f1 = sample_points(feats, coords1)  # [B,C,S,S]
        g1 = sample_points(code, coords1)  # [B,D,S,S]
        f2 = sample_points(feats_pos, coords2)
        g2 = sample_points(code_pos, coords2)

        intra_loss, intra_cd = self._pair(f1, f1, g1, g1, self.pos_intra_shift)
        inter_loss, inter_cd = self._pair(f1, f2, g1, g2, self.pos_inter_shift)
        neg_losses, neg_cds = [], []
        for perm in perms:
            f_neg = sample_points(feats[perm], coords2)  # image perm[n] read at n's coords2 points
            g_neg = sample_points(code[perm], coords2)
            loss_k, cd_k = self._pair(f1, f_neg, g1, g_neg, self.neg_inter_shift)
            neg_losses.append(loss_k)
            neg_cds.append(cd_k)

        pos_intra = intra_loss.mean()
        pos_inter = inter_loss.mean()
        if neg_losses:
            neg_loss = torch.cat(neg_losses, dim=0)  # [neg_samples*B,S,S,S,S]
            neg_cd = torch.cat(neg_cds, dim=0)
            neg_inter = neg_loss.mean()
            cd_neg = neg_cd.detach().mean()
        else:
            neg_cd = code.new_zeros((0, s, s, s, s))
            neg_inter = code.new_zeros(())
            cd_neg = code.new_full((), float("nan"))
        total = (self.pos_inter_weight * pos_inter + self.pos_intra_weight * pos_intra
                 + self.neg_inter_weight * neg_inter)
        out = {
            "pos_intra": pos_intra,
            "pos_inter": pos_inter,
            "neg_inter": neg_inter,
            "total": total,
            "cd_intra": intra_cd.detach().mean(),
            "cd_inter": inter_cd.detach().mean(),
            "cd_neg": cd_neg,
        }
        if return_corr:
            out.update(corr_intra=intra_cd.detach(), corr_inter=inter_cd.detach(), corr_neg=neg_cd.detach())
        return out
