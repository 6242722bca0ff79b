"""Reading the released STEGO checkpoints (PyTorch-Lightning files) into this project's modules.

Layout of a released checkpoint (``cocostuff27_vit_base_5.ckpt``, ``cityscapes_vit_base_1.ckpt``,
``potsdam_test.ckpt``; the LightningModule of the original ``train_segmentation.py``):

- ``state_dict``:
  - ``net.model.*`` — the DINO ViT (``cls_token``, ``pos_embed``, ``patch_embed.proj.*``, ``blocks.N.*``,
    ``norm.*``), the same names as timm's ViT;
  - ``net.cluster1.0.{weight,bias}`` — the head's linear branch (Conv2d C->D, 1x1);
  - ``net.cluster2.0.*`` and ``net.cluster2.2.*`` — the nonlinear branch (Conv2d C->C, ReLU, Conv2d C->D);
  - ``cluster_probe.clusters`` [K+E, D], ``linear_probe.{weight,bias}`` [K, D, 1, 1] / [K];
  - unused here: ``train_cluster_probe.clusters``, ``decoder.*``.
  stego-studies DINO-baseline checkpoints (``only_dino``) have no ``net.cluster*`` entries: the code is the
  backbone features.
- ``hyper_parameters``: ``n_classes`` and ``cfg`` (an omegaconf DictConfig with dataset_name, model_type,
  dino_patch_size, dim, extra_clusters, ...), plus Lightning's own entries (callbacks, optimizer states, ...).

Safe loading: the file is read with ``torch.load(weights_only=True)``. The pickled configuration classes
(omegaconf containers and nodes, Lightning's AttributeDict, ``typing.Any``, callback classes used as dict keys)
are mapped to inert stand-ins — classes of this module that only store what the pickle hands them and run no
code — and converted to plain dicts afterwards, so neither omegaconf nor Lightning has to be installed and no code
from the file runs. Only if the file needs other globals does loading stop, naming them; ``trusted=True`` then
falls back to a full ``torch.load(weights_only=False)``, which executes whatever the pickle says: use it only for
files from a source you trust (the authors' own release, for instance).
"""
from __future__ import annotations

import dataclasses
import json
import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

from .backbones import load_backbone
from .config import StegoError, atomic_write
from .heads import STEGOHead
from .probes import ClusterProbe, LinearProbe

__all__ = ["LoadedCheckpoint", "load_stego_checkpoint", "backbone_name_for", "save_stego_checkpoint",
           "RELEASED_BACKBONES"]

# (model_type, patch size) -> our backbone registry name
_BACKBONE_NAMES = {("vit_small", 8): "dino_vits8", ("vit_small", 16): "dino_vits16",
                   ("vit_base", 8): "dino_vitb8", ("vit_base", 16): "dino_vitb16"}
_WIDTH_TO_TYPE = {384: "vit_small", 768: "vit_base"}
RELEASED_BACKBONES = tuple(_BACKBONE_NAMES.values())  # the backbones a released checkpoint can hold

_REQUIRED = ("cluster_probe.clusters", "linear_probe.weight", "linear_probe.bias")
_HEAD_KEYS = ("net.cluster1.0.weight", "net.cluster1.0.bias", "net.cluster2.0.weight", "net.cluster2.0.bias",
              "net.cluster2.2.weight", "net.cluster2.2.bias")
# Globals whose objects only describe configuration or training state: replaced by inert stand-ins.
# ``builtins.*`` appear as type references (omegaconf's Metadata.object_type = dict); a stand-in never calls them.
_STANDIN_PREFIXES = ("omegaconf.", "pytorch_lightning.", "lightning.", "lightning_fabric.", "hydra.", "typing.",
                     "pathlib.", "argparse.Namespace", "enum.", "builtins.", "collections.defaultdict")


def backbone_name_for(model_type: str, patch_size: int) -> str:
    """Our backbone name for the reference's (model_type, dino_patch_size), e.g. ("vit_base", 8) -> "dino_vitb8"."""
    try:
        return _BACKBONE_NAMES[(str(model_type), int(patch_size))]
    except (KeyError, ValueError, TypeError):
        raise StegoError(f"checkpoint: unknown backbone model_type={model_type!r}, dino_patch_size={patch_size!r}; "
                         f"expected vit_small/vit_base with patch 8 or 16") from None


@dataclasses.dataclass
class LoadedCheckpoint:
    """A released STEGO checkpoint, mapped onto this project's modules."""

    path: str  # the file read
    backbone_name: str  # our registry name, e.g. "dino_vitb8"
    dataset: str | None  # cfg.dataset_name, e.g. "cocostuff27" (None if the file has no config)
    code_dim: int  # D (the backbone width C for DINO-baseline checkpoints)
    n_classes: int  # K
    extra_clusters: int  # E (cluster probe centres beyond K)
    head: Any  # STEGOHead with the checkpoint's weights, or None for a DINO-baseline (only_dino) checkpoint
    cluster_probe: Any  # ClusterProbe(code_dim, K+E)
    linear_probe: Any  # LinearProbe(code_dim, K)
    backbone_state: dict  # the ViT's tensors without the "net.model." prefix (DINO/timm names)
    hparams: dict  # the saved configuration as plain Python values (cfg flattened into this dict)

    def build_backbone(self, *, device: Any = "cpu", protocol: str = "original") -> Any:
        """The frozen backbone with the checkpoint's ViT weights (via ``stego_core.backbones.load_backbone``)."""


        with tempfile.TemporaryDirectory(prefix="stego-ckpt-") as tmp:
            file = Path(tmp) / f"{self.backbone_name}.pth"
            torch.save(self.backbone_state, file)
            backbone = load_backbone(self.backbone_name, weights=str(file), device=device, protocol=protocol)
        backbone.weights_source = f"the ViT of the checkpoint {self.path}"  # not the temporary file
        return backbone


# ---------------------------------------------------------------------------------------------------------------
# inert stand-ins for configuration classes
class _StandIn:
    """An object of a class that was not imported: keeps constructor arguments and pickled state, nothing else."""

    _standin_name = "?"

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.__dict__["_standin_args"] = args
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.__dict__["_standin_state"] = state

    def __repr__(self) -> str:
        return f"<stand-in for {self._standin_name}>"


class _StandInDict:
    """Stand-in for dict subclasses (Lightning's AttributeDict): builds a plain dict, which the weights-only
    unpickler lets SETITEMS fill."""

    _standin_name = "?"

    def __new__(cls, *args, **kwargs):
        return {}


_standin_cache: dict[str, type] = {}


def _standin_for(full_name: str) -> type:
    if full_name not in _standin_cache:
        base = _StandInDict if full_name.endswith(("AttributeDict", "defaultdict")) else _StandIn
        cls = type(full_name.rsplit(".", 1)[-1], (base,), {"_standin_name": full_name})
        _standin_cache[full_name] = cls
    return _standin_cache[full_name]


def _plain(obj: Any, depth: int = 0) -> Any:
    """Plain Python values from unpickled config objects (stand-ins for omegaconf containers and nodes)."""
    if depth > 50:
        return repr(obj)
    if not isinstance(obj, (_StandIn, dict, list, tuple, str, bytes, int, float, bool, type(None))) \
            and hasattr(obj, "__dict__") and ("_content" in vars(obj) or "_val" in vars(obj)):
        # a real omegaconf container or node (trusted full unpickle with omegaconf installed)
        return _plain(vars(obj).get("_content", vars(obj).get("_val")), depth + 1)
    if isinstance(obj, _StandIn):
        state = obj.__dict__.get("_standin_state")
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[0], dict):
            state = state[0]
        if isinstance(state, dict):
            if "_content" in state:  # omegaconf DictConfig / ListConfig
                return _plain(state["_content"], depth + 1)
            if "_val" in state:  # omegaconf value node
                return _plain(state["_val"], depth + 1)
            return {str(k): _plain(v, depth + 1) for k, v in state.items() if not str(k).startswith("_")}
        return repr(obj)
    if isinstance(obj, dict):
        return {(k if isinstance(k, (str, int, float, bool)) else repr(k)): _plain(v, depth + 1)
                for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v, depth + 1) for v in obj]
    return obj


# ---------------------------------------------------------------------------------------------------------------
# reading the file
def _read(path: Path, map_location: Any, trusted: bool) -> Any:
    if not path.is_file():
        raise StegoError(f"path: checkpoint file not found: {path}")
    if not zipfile.is_zipfile(path):
        # legacy (pre-1.6) torch files are not zip archives; a truncated zip also fails here
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except Exception as exc:  # noqa: BLE001
            if trusted and isinstance(exc, pickle.UnpicklingError):
                return torch.load(path, map_location=map_location, weights_only=False)
            raise StegoError(f"path: {path} is not a readable PyTorch checkpoint (truncated or another format?): "
                             f"{_first_line(exc)}") from None
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception as exc:  # noqa: BLE001
        raise StegoError(f"path: {path} is not a readable PyTorch checkpoint (truncated?): {_first_line(exc)}") \
            from None
    standins = [n for n in unsafe if n.startswith(_STANDIN_PREFIXES)]
    others = [n for n in unsafe if n not in standins]
    if others and not trusted:
        raise StegoError(f"path: {path} needs code from {', '.join(others[:5])} to be unpickled; pass trusted=True "
                         f"only if you trust the file's source (it then runs a full torch.load)")
    try:
        if others:  # trusted
            return torch.load(path, map_location=map_location, weights_only=False)
        with torch.serialization.safe_globals([(_standin_for(n), n) for n in standins]):
            return torch.load(path, map_location=map_location, weights_only=True)
    except StegoError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise StegoError(f"path: cannot read {path} (truncated or damaged?): {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:200]


def _cfg_get(cfg: dict, key: str, default: Any = None) -> Any:
    value = cfg.get(key, default)
    return default if value is None else value


def load_stego_checkpoint(path: str | os.PathLike, *, map_location: Any = "cpu", trusted: bool = False,
                          expected_code_dim: int | None = None, expected_dataset: str | None = None
                          ) -> LoadedCheckpoint:
    """Load a released STEGO (or stego-studies DINO-baseline) Lightning checkpoint.

    path: the ``.ckpt`` file. map_location: as for ``torch.load``.
    trusted: allow a full (code-executing) unpickle when the file needs globals beyond the configuration classes.
    expected_code_dim / expected_dataset: raise a StegoError when the checkpoint does not match the profile.
    """
    path = Path(path)
    raw = _read(path, map_location, trusted)
    if not isinstance(raw, dict) or not isinstance(raw.get("state_dict"), dict):
        raise StegoError(f"path: {path} has no 'state_dict' entry; expected a PyTorch-Lightning STEGO checkpoint")
    sd: dict[str, torch.Tensor] = raw["state_dict"]
    hp_raw = raw.get("hyper_parameters") or {}
    hparams = _plain(hp_raw) if isinstance(hp_raw, (dict, _StandIn)) else {}
    if not isinstance(hparams, dict):
        hparams = {}
    cfg = hparams.get("cfg") if isinstance(hparams.get("cfg"), dict) else {}

    missing = [k for k in _REQUIRED if k not in sd]
    backbone_state = {k[len("net.model."):]: v for k, v in sd.items() if k.startswith("net.model.")}
    if not backbone_state:
        missing.append("net.model.* (the DINO ViT)")
    has_head = any(k.startswith("net.cluster") for k in sd)
    only_dino = bool(cfg.get("only_dino", False)) or not has_head
    if not only_dino:
        missing += [k for k in _HEAD_KEYS if k not in sd]
    if missing:
        raise StegoError(f"path: {path} lacks {', '.join(missing)}; expected the STEGO Lightning layout "
                         f"(net.model.*, net.cluster1.*, net.cluster2.*, cluster_probe.clusters, linear_probe.*)")

    # backbone from the config, else from the tensors
    if "patch_embed.proj.weight" not in backbone_state:
        raise StegoError(f"path: {path} lacks net.model.patch_embed.proj.weight; the backbone is not a DINO ViT")
    width = int(backbone_state["patch_embed.proj.weight"].shape[0])
    patch = int(backbone_state["patch_embed.proj.weight"].shape[-1])
    model_type = _cfg_get(cfg, "model_type", _WIDTH_TO_TYPE.get(width))
    backbone_name = backbone_name_for(model_type, _cfg_get(cfg, "dino_patch_size", patch))

    centres = sd["cluster_probe.clusters"]
    lin_w, lin_b = sd["linear_probe.weight"], sd["linear_probe.bias"]
    code_dim = int(centres.shape[1])
    n_classes = int(hparams.get("n_classes") or lin_w.shape[0])
    n_clusters = int(centres.shape[0])
    if lin_w.shape[0] != n_classes or lin_w.shape[1] != code_dim or n_clusters < n_classes:
        raise StegoError(f"path: {path} is inconsistent: linear_probe.weight {tuple(lin_w.shape)}, "
                         f"cluster_probe.clusters {tuple(centres.shape)}, n_classes {n_classes}")
    cfg_dim = cfg.get("dim")
    if not only_dino and cfg_dim is not None and int(cfg_dim) != code_dim:
        raise StegoError(f"path: {path} config says dim={cfg_dim} but the probes have code dim {code_dim}")

    dataset = cfg.get("dataset_name")
    if expected_code_dim is not None and int(expected_code_dim) != code_dim:
        raise StegoError(f"expected_code_dim: the checkpoint {path.name} has code dim {code_dim}, "
                         f"expected {expected_code_dim}")
    if expected_dataset is not None and dataset is not None and str(expected_dataset) != str(dataset):
        raise StegoError(f"expected_dataset: the checkpoint {path.name} was trained on {dataset!r}, "
                         f"expected {expected_dataset!r}")
    if expected_dataset is not None and dataset is None:
        raise StegoError(f"expected_dataset: the checkpoint {path.name} does not record its dataset "
                         f"(no cfg.dataset_name); cannot check it is {expected_dataset!r}")

    head = None
    if not only_dino:
        w1 = sd["net.cluster1.0.weight"]
        if tuple(w1.shape[:2]) != (code_dim, width):
            raise StegoError(f"path: {path} net.cluster1.0.weight has shape {tuple(w1.shape)}, expected "
                             f"[{code_dim}, {width}, 1, 1]")
        head = STEGOHead(width, code_dim)
        head_sd = {"linear.weight": w1, "linear.bias": sd["net.cluster1.0.bias"],
                   "nonlinear.0.weight": sd["net.cluster2.0.weight"], "nonlinear.0.bias": sd["net.cluster2.0.bias"],
                   "nonlinear.2.weight": sd["net.cluster2.2.weight"], "nonlinear.2.bias": sd["net.cluster2.2.bias"]}
        _load(head, head_sd, path, "head")
        head.eval()
    elif code_dim != width:
        raise StegoError(f"path: {path} has no head but probes of dim {code_dim} on a {width}-wide backbone "
                         f"(a dimension-reduction baseline? those are not released checkpoints)")

    cluster_probe = ClusterProbe(code_dim, n_clusters)
    _load(cluster_probe, {"centres": centres}, path, "cluster_probe")
    linear_probe = LinearProbe(code_dim, n_classes)
    _load_conv(linear_probe, lin_w, lin_b, path)

    flat = {k: v for k, v in hparams.items() if k != "cfg"}
    flat.update(cfg)
    return LoadedCheckpoint(path=str(path), backbone_name=backbone_name, dataset=dataset, code_dim=code_dim,
                            n_classes=n_classes, extra_clusters=n_clusters - n_classes, head=head,
                            cluster_probe=cluster_probe.eval(), linear_probe=linear_probe.eval(),
                            backbone_state=backbone_state, hparams=flat)


def _load(module: Any, state: dict, path: Path, what: str) -> None:
    target = module.state_dict()
    for k, v in state.items():
        if k not in target or tuple(target[k].shape) != tuple(v.shape):
            want = tuple(target[k].shape) if k in target else "absent"
            raise StegoError(f"path: {path} {what} tensor {k} has shape {tuple(v.shape)}, expected {want}")
    module.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)


def _load_conv(module: Any, weight: Any, bias: Any, path: Path) -> None:
    """Copy a 1x1 conv's weight/bias into the module's only weight and bias (whatever they are called)."""
    target = module.state_dict()
    w_keys = [k for k in target if k.endswith("weight")]
    b_keys = [k for k in target if k.endswith("bias")]
    if len(w_keys) != 1 or len(b_keys) != 1:
        raise StegoError(f"linear_probe: expected one weight and one bias, found {list(target)}")
    wk, bk = w_keys[0], b_keys[0]
    if weight.numel() != target[wk].numel() or bias.numel() != target[bk].numel():
        raise StegoError(f"path: {path} linear_probe.weight {tuple(weight.shape)} does not fit the probe's "
                         f"{tuple(target[wk].shape)}")
    module.load_state_dict({wk: weight.float().reshape(target[wk].shape), bk: bias.float().reshape(target[bk].shape)},
                           strict=True)


def save_stego_checkpoint(run_dir: str | os.PathLike, path: str | os.PathLike, *,
                          weights: str | os.PathLike | None = None) -> Path:
    """Write a trained STEGO run on a DINO v1 backbone as a checkpoint in the released layout (module doc):
    ``net.model.*`` = the run's backbone (``weights``: instead of the run's), ``net.cluster1/2.*`` = its head,
    both probes, and ``hyper_parameters`` with ``n_classes`` and the ``cfg`` entries ``load_stego_checkpoint``
    reads. Written to a temporary name and renamed."""

    run_dir, path = Path(run_dir), Path(path)
    cfg = json.loads((run_dir / "meta.json").read_text()).get("config") or {}
    names = {v: k for k, v in _BACKBONE_NAMES.items()}
    if cfg.get("method") != "stego" or cfg.get("backbone") not in names:
        raise StegoError(f"run_dir: {run_dir.name} is a {cfg.get('method')} run on {cfg.get('backbone')}; the "
                         f"released layout holds STEGO runs on {', '.join(sorted(names))}")
    from .segmenter import Segmenter  # segmenter imports this module to read checkpoints: import at call time

    seg = Segmenter.from_run(run_dir)
    head = seg.code_map
    backbone = load_backbone(cfg["backbone"], weights if weights is not None else cfg.get("weights"))
    sd = {f"net.model.{k}": v for k, v in backbone.vit.state_dict().items() if not k.startswith("head.")}
    sd.update({"net.cluster1.0.weight": head.linear.weight, "net.cluster1.0.bias": head.linear.bias,
               "net.cluster2.0.weight": head.nonlinear[0].weight, "net.cluster2.0.bias": head.nonlinear[0].bias,
               "net.cluster2.2.weight": head.nonlinear[2].weight, "net.cluster2.2.bias": head.nonlinear[2].bias,
               "cluster_probe.clusters": seg.cluster_probe.centres,
               "linear_probe.weight": seg.linear_probe.conv.weight, "linear_probe.bias": seg.linear_probe.conv.bias})
    model_type, patch = names[cfg["backbone"]]
    hparams = {"n_classes": seg.n_classes,
               "cfg": {"dataset_name": cfg["dataset"], "model_type": model_type, "dino_patch_size": patch,
                       "dim": seg.code_dim, "extra_clusters": seg.n_clusters - seg.n_classes}}
    with atomic_write(path) as fh:
        torch.save({"state_dict": {k: v.detach().cpu().clone() for k, v in sd.items()}, "hyper_parameters": hparams},
                   fh)
    return path
