"""The STEGO segmentation head: a 1x1 linear branch plus a 1x1 MLP branch on channel-dropped backbone features.

Spec §1.3 and §2: ``code = linear(drop(feats)) + nonlinear(drop(feats))`` with two independent Dropout2d(p)
draws (whole channels zeroed per sample, survivors scaled by 1/(1-p)), active only in training mode. The reference
featurizer applies the same dropout module a third time to the features it hands to the correspondence loss
("feats" of F); ``STEGOHead.drop_features`` is that third draw and ``forward_with_feats`` returns both in the
reference's draw order (linear branch, nonlinear branch, then the loss features).

Parameters use PyTorch's default Conv2d initialisation; ``linear`` is created before ``nonlinear`` as in the
reference, so a seeded construction draws its weights in the same order.
"""
from __future__ import annotations

from torch import Tensor, nn

from .config import StegoError, check_float, check_int

__all__ = ["STEGOHead"]


class STEGOHead(nn.Module):
    """``STEGOHead(in_dim, code_dim, *, dropout=0.1)``: feats [B,in_dim,h,w] -> code [B,code_dim,h,w].

    Attributes: ``linear`` (Conv2d in->code, 1x1), ``nonlinear`` (Conv2d in->in 1x1, ReLU, Conv2d in->code 1x1),
    ``drop`` (the shared Dropout2d module; each call is an independent draw).
    """

    def __init__(self, in_dim: int, code_dim: int, *, dropout: float = 0.1):
        super().__init__()
        self.in_dim = check_int("in_dim", in_dim, minimum=1)
        self.code_dim = check_int("code_dim", code_dim, minimum=1)
        p = check_float("dropout", dropout)
        if not 0.0 <= p < 1.0:
            raise StegoError(f"dropout: expected a channel-dropout probability in [0, 1), got {p}")
        self.dropout = p
        self.linear = nn.Conv2d(in_dim, code_dim, kernel_size=1)
        self.nonlinear = nn.Sequential(
            nn.Conv2d(in_dim, in_dim, kernel_size=1),
            nn.ReLU(),
            nn.Conv2d(in_dim, code_dim, kernel_size=1),
        )
        self.drop = nn.Dropout2d(p=p)

    def _check(self, feats: Tensor) -> None:
        if not isinstance(feats, Tensor) or feats.ndim != 4 or feats.shape[1] != self.in_dim:
            shape = tuple(feats.shape) if isinstance(feats, Tensor) else type(feats).__name__
            raise StegoError(f"feats: expected a tensor [B,{self.in_dim},h,w], got {shape}")

    def forward(self, feats: Tensor) -> Tensor:
        """code = linear(drop(feats)) + nonlinear(drop(feats)); two independent dropout draws in train mode."""
        self._check(feats)
        code = self.linear(self.drop(feats))
        return code + self.nonlinear(self.drop(feats))

    def drop_features(self, feats: Tensor) -> Tensor:
        """The reference's third channel dropout on the features used for the correspondence tensor F
        (identity in eval mode). Uses torch's global RNG, like the two branch draws."""
        self._check(feats)
        return self.drop(feats)

    def forward_with_feats(self, feats: Tensor) -> tuple[Tensor, Tensor]:
        """``(drop_features(feats), code)`` with the draws in the reference order (both branches first)."""
        code = self.forward(feats)
        return self.drop_features(feats), code

    def extra_repr(self) -> str:
        return f"in_dim={self.in_dim}, code_dim={self.code_dim}, dropout={self.dropout}"

