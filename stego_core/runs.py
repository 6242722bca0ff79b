"""Finding, loading and requiring training runs: how the downstream stages (evaluation, explorer, quirks) get models.

Data flows one way: the feature stage (``01_features``) writes the stores and their kNN tables, the training stages
(``02_train_stego``, the sweep of ``03_dimension_study``) write runs under ``<root>/runs`` (``config.STAGES``, the one
table of stage folders, re-exported here), and everything after them only *reads* runs:

- ``find_runs(root, **filters)``: the finished runs (folders with ``DONE``), newest first, filtered by any
  ``TrainConfig`` field and by the stores they were trained / validated on;
- ``run_config(preset, train_store=..., method=..., ...)``: the configuration a chapter asks for — the preset's
  hyper-parameters on the *chapter's* stores (dataset and backbone come from the training store, not the preset, so a
  ``directory`` dataset trained with the demo preset is found again);
- ``method_dims(methods, dims, C)``: the (method, dim) pairs that exist on C-channel features;
- ``require_run(...)`` / ``require_runs(...)``: the matching finished run(s) as ``Segmenter``s (``which`` checkpoint,
  on ``device``, with an optional backbone). A missing run is a StegoError that names each missing run and the
  command that makes it (``missing_run_command``: the dimension-study stage with exactly these runs);
- ``train_missing(cfg, ...)``: the one path by which a downstream chapter trains, taken only when the chapter's
  ``train_missing`` parameter says so (the demo and smoke profiles set it for the quirk chapter's protocol variants;
  the paper profiles never do, so a typo in a paper profile stops instead of starting hours of training).
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from .config import PROTOCOLS, STAGES, StegoError, artifacts_root, check_choice, stage_command, stage_root
from .segmenter import Segmenter
from .training import PRESETS, TrainConfig, TrainResult, make_config, train

__all__ = ["STAGES", "MissingRunError", "find_runs", "run_config", "require_run", "require_runs", "method_dims",
           "train_missing",
           "missing_run_command"]

_COLUMNS = ["run_dir", "run_id", "dataset", "backbone", "method", "code_dim", "seed", "protocol", "train_store",
            "val_store", "best", "finished"]
SCRATCH_BOOK = "scratch-book"  # under the artifacts root: the book folder of the commands that make missing runs


class MissingRunError(StegoError):
    """A downstream chapter asked for runs that nobody trained; ``command`` is the command that makes them."""

    def __init__(self, message: str, command: str):
        super().__init__(message)
        self.command = command


def _store_path(store: Any) -> str | None:
    if store is None:
        return None
    return str(getattr(store, "path", store))


def find_runs(root: str | os.PathLike | None = None, *, train_store: Any = None, val_store: Any = None,
              code_dim: int | None = None, **config: Any) -> pd.DataFrame:
    """Finished runs under ``<root>/runs`` (folders with ``DONE``), newest first, filtered by the given values.

    Filters: any ``TrainConfig`` field (``dataset``, ``method``, ``seed``, ``protocol``, ``extra_clusters``, ...;
    None = any; ``code_dim`` is ignored for the DINO baseline, whose code has the backbone's C channels) and the
    stores (FeatureStore or path) the run was trained and validated on. Columns: run_dir, run_id, the config
    fields, train_store, val_store, best (validation metrics at the selected step), finished (mtime of ``DONE``).
    """
    base = stage_root("runs", root)
    want = {k: v for k, v in config.items() if v is not None}
    rows = []
    for done in base.glob("*/DONE") if base.is_dir() else []:
        try:
            meta = json.loads((done.parent / "meta.json").read_text())
        except (OSError, ValueError):
            continue
        cfg = meta.get("config") or {}
        if any(cfg.get(k) != v for k, v in want.items()):
            continue
        if code_dim is not None and cfg.get("method") != "dino" and cfg.get("code_dim") != int(code_dim):
            continue
        if train_store is not None and meta.get("train_store") != _store_path(train_store):
            continue
        if val_store is not None and meta.get("val_store") != _store_path(val_store):
            continue
        rows.append({"run_dir": done.parent, "run_id": done.parent.name, **cfg,
                     "train_store": meta.get("train_store"), "val_store": meta.get("val_store"),
                     "best": meta.get("best") or {}, "finished": done.stat().st_mtime})
    df = pd.DataFrame(rows)
    if df.empty:
        return pd.DataFrame(columns=_COLUMNS)
    return df.sort_values("finished", ascending=False, kind="stable").reset_index(drop=True)


def _store_meta(store: Any, param: str) -> dict[str, Any]:
    meta = getattr(store, "meta", None)
    if not isinstance(meta, dict):
        raise StegoError(f"{param}: expected a FeatureStore (stego_core.cache.cache_features), got "
                         f"{type(store).__name__}")
    return meta


def _request(preset: str, train_store: Any, method: str, code_dim: int | None, seed: int, protocol: str,
             overrides: dict[str, Any]) -> tuple[TrainConfig, dict[str, Any]]:
    """(the TrainConfig a chapter asks for, the values a finished run must have)."""
    check_choice("preset", preset, PRESETS)
    check_choice("protocol", protocol, PROTOCOLS)
    meta = _store_meta(train_store, "train_store")
    for name in ("dataset", "backbone"):
        have = meta.get(name)
        if name in overrides and have is not None and overrides[name] != have:
            raise StegoError(f"overrides: {name} {overrides[name]!r} differs from the training store's {have!r}; "
                             f"the runs are looked up on the chapter's feature stores")
    fixed = {"dataset": meta.get("dataset", PRESETS[preset]["dataset"]),
             "backbone": meta.get("backbone", PRESETS[preset]["backbone"])}
    extra = {k: v for k, v in overrides.items() if k not in fixed}
    if method == "stego" and "correspondence_weight" not in extra:
        # A STEGO run means one trained with the correspondence loss: never a probes-only control run (chapter
        # 02's "untrained head", correspondence_weight 0) in its place.
        extra["correspondence_weight"] = PRESETS[preset].get("correspondence_weight", 1.0)
    dim = int(code_dim if code_dim is not None else PRESETS[preset].get("code_dim", 70))
    cfg = make_config(preset, **fixed, **extra, method=method, code_dim=dim, seed=int(seed), protocol=protocol)
    want = {**fixed, **extra, "method": method, "seed": int(seed), "protocol": protocol}
    return cfg, want


def run_config(preset: str, *, train_store: Any, method: str = "stego", code_dim: int | None = None,
               seed: int = 0, protocol: str = "original", **overrides: Any) -> TrainConfig:
    """The run a chapter asks for: ``preset``'s hyper-parameters with the dataset and backbone of the chapter's
    ``train_store``, ``method`` at ``code_dim`` (None = the preset's), ``seed``, ``protocol`` and ``overrides``
    (further TrainConfig fields; a ``dataset`` / ``backbone`` there must agree with the store)."""
    return _request(preset, train_store, method, code_dim, seed, protocol, dict(overrides))[0]


def _dims_label(cfg: TrainConfig) -> str:
    return f"{cfg.method} (C)" if cfg.method == "dino" else f"{cfg.method} d={cfg.code_dim}"


def missing_run_command(configs: Sequence[TrainConfig], *, train_store: Any, val_store: Any, preset: str,
                        overrides: dict[str, Any] | None = None, root: Any = None, device: str = "cpu") -> str:
    """The command that trains ``configs`` (runs of one preset, seed and protocol on these stores): the
    dimension-study stage with exactly these methods and dimensions, into a scratch book folder under the artifacts
    root (``<root>/scratch-book``) so that the book's own chapter stays as it is."""
    train_meta, val_meta = _store_meta(train_store, "train_store"), _store_meta(val_store, "val_store")
    first = configs[0]
    dims = sorted({c.code_dim for c in configs if c.method != "dino"})
    params = {"preset": preset, "dataset": train_meta.get("dataset"), "backbone": train_meta.get("backbone"),
              "weights": train_meta.get("weights"), "res": train_meta.get("res"), "crop": train_meta.get("crop"),
              "val_res": val_meta.get("res") if val_meta.get("res") != train_meta.get("res") else None,
              "val_crop": val_meta.get("crop") if val_meta.get("crop") != train_meta.get("crop") else None,
              "dataset_options": train_meta.get("dataset_options") or None,
              "methods": sorted({c.method for c in configs}), "dims": dims or None, "seeds": [first.seed],
              "protocol": first.protocol,
              "overrides": {k: v for k, v in (overrides or {}).items() if k not in ("dataset", "backbone")} or None,
              "device": None if str(device) == "cpu" else str(device),
              "root": None if root is None else str(root)}
    return stage_command("03_dimension_study", params, workdir=str(artifacts_root(root) / SCRATCH_BOOK))


def train_missing(cfg: TrainConfig, *, train_store: Any, val_store: Any, root: Any = None, device: Any = "cpu",
                  progress: bool = True) -> TrainResult:
    """Train a run that a downstream chapter needs and did not find: the only place outside the training stages
    where training starts, and only when the chapter's ``train_missing`` parameter asks for it."""
    if not isinstance(cfg, TrainConfig):
        raise StegoError(f"cfg: expected a TrainConfig (runs.run_config), got {type(cfg).__name__}")
    return train(cfg, train_store=train_store, val_store=val_store, root=root, progress=progress, device=device)


_train_missing = train_missing  # require_runs' parameter of the same name shadows the function there


def require_runs(preset: str, requests: Sequence[tuple[str, int | None]], *, train_store: Any, val_store: Any,
                 seed: int = 0, protocol: str = "original", which: str = "best", root: Any = None,
                 device: Any = "cpu", backbone: Any = None, train_missing: bool = False, progress: bool = True,
                 **overrides: Any) -> dict[tuple[str, int], Segmenter]:
    """Segmenters of the finished runs ``requests`` = [(method, code_dim or None for the preset's), ...].

    Keys are (method, dim) with dim = the backbone's C for "dino". The newest finished run that matches (training
    store, method, dim, seed, protocol and every override, e.g. ``extra_clusters=3``) is loaded with ``which``
    checkpoint, on ``device``, with ``backbone`` attached. Missing runs are trained (``train_missing``) when
    ``train_missing`` is True; otherwise one StegoError lists them with the command that makes them.
    """
    check_choice("which", which, ("best", "last"))
    wanted = []
    for method, dim in requests:
        cfg, want = _request(preset, train_store, method, dim, seed, protocol, dict(overrides))
        found = find_runs(root, train_store=train_store, code_dim=cfg.code_dim, **want)
        wanted.append((cfg, found.loc[0, "run_dir"] if len(found) else None))
    missing = [cfg for cfg, run_dir in wanted if run_dir is None]
    if missing and not train_missing:
        names = ", ".join(_dims_label(c) for c in missing)
        command = missing_run_command(missing, train_store=train_store, val_store=val_store, preset=preset,
                                      overrides=overrides, root=root, device=str(device))
        raise MissingRunError(f"runs: no finished run of {names} (seed {seed}, protocol {protocol!r}, "
                              f"preset {preset!r}) "
                         f"on the training store {_store_path(train_store)}; downstream chapters do not train: make "
                         f"{'it' if len(missing) == 1 else 'them'} with {command} (or set train_missing: true in "
                         f"this chapter's parameters to train {'it' if len(missing) == 1 else 'them'} here)", command)
    out: dict[tuple[str, int], Segmenter] = {}
    for cfg, run_dir in wanted:
        if run_dir is None:
            run_dir = _train_missing(cfg, train_store=train_store, val_store=val_store, root=root, device=device,
                                     progress=progress).run_dir
        seg = Segmenter.from_run(Path(run_dir), which, device=device, backbone=backbone)
        out[(cfg.method, seg.code_dim)] = seg
    return out


def require_run(preset: str, *, train_store: Any, val_store: Any, method: str = "stego",
                code_dim: int | None = None, **kwargs: Any) -> Segmenter:
    """The segmenter of one finished run (``require_runs`` with one request; the same keywords)."""
    return next(iter(require_runs(preset, [(method, code_dim)], train_store=train_store, val_store=val_store,
                                  **kwargs).values()))


def method_dims(methods: Sequence[str], dims: Sequence[int], feature_dim: int) -> list[tuple[str, int]]:
    """The (method, code dim) pairs that exist on ``feature_dim``-channel features: the DINO baseline once at C,
    PCA and h-NNE at the dims up to C (they have at most C components), STEGO and RP at every dim."""
    pairs = []
    for method in methods:
        if method == "dino":
            pairs.append((method, int(feature_dim)))
        else:
            pairs += [(method, int(d)) for d in dims if method in ("stego", "rp") or int(d) <= int(feature_dim)]
    return pairs
