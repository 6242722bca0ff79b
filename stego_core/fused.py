"""The fused sweep: the runs of a sweep that share a feature store and a batch schedule train in one pass.

In a fused sweep (``run_sweep(..., fused=True)``, the default) the pending runs are grouped by
``group_specs``: same preset, same feature-store options, same ``training.fuse_key`` (seed, batch size, steps,
validation schedule, protocol, kNN partners, feature source), STEGO heads in one group and the probe-only runs
(DINO baseline, PCA, RP) in another, every h-NNE run on its own (it trains on its own projected store). Each group
is one call of ``training.train_group``: every step's batch is read once, the PCA / RP runs of the group project it
with one matmul, the probe-only runs train only their probes, the STEGO heads train side by side on the same batch
and kNN partners, each run with its own initialisation, random generators, optimisers, loss and checkpoints. Every
run still gets its own training run folder, ``run.json`` and sweep ``DONE`` marker, exactly as an independent run.

Fidelity. In the original study every run was its own training job with its own random batch order. Here every run
of one seed already has the same batch order (``train_features.batch_indices`` depends on the seed and the batch
size only), fused or not, and a fused run draws its dropout masks, loss points and kNN partners from its own
generators: a fused run trains on exactly the batches, partners and points it would see alone, and its weights
match the independent run's up to float rounding in the joint PCA / RP projection (a group of one is bit for bit
the independent run). ``fused=False`` trains every run on its own, as before.
"""
from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .cache import cache_features
from .config import write_json_atomic
from .guards import artifact_lock
from .training import fuse_key, train_group

__all__ = ["group_specs", "train_group_run", "RunGroup"]


def group_specs(specs: list[Any]) -> list[list[Any]]:
    """The runs (``sweep.RunSpec``) that can train as one fused group, in the order they first appear."""
    groups: dict[tuple, list[Any]] = {}
    for spec in specs:
        cfg = spec.train_config()
        caches = json.dumps([spec.train_cache, spec.val_cache], sort_keys=True, default=str)
        kind = "stego" if cfg.method == "stego" else "probes"
        groups.setdefault((spec.preset, caches, kind, fuse_key(cfg)), []).append(spec)
    return list(groups.values())


def train_group_run(specs: list[Any], *, root=None, progress: bool = False) -> list[Any]:
    """The fused counterpart of ``sweep.train_run``: open/build the group's two feature stores once, train every
    run with ``training.train_group`` and record each run's training folder in its sweep folder's ``run.json``."""
    first = specs[0]
    cfg = first.train_config()
    train_store = cache_features(cfg.dataset, "train", cfg.backbone, root=root, progress=progress, **first.train_cache)
    val_store = cache_features(cfg.dataset, "val", cfg.backbone, root=root, progress=progress, **first.val_cache)
    device = first.train_cache.get("device", "cpu")  # the caches' device also trains
    results = train_group([s.train_config() for s in specs], train_store=train_store, val_store=val_store,
                          root=root, progress=progress, device=device, logger=first.logger)
    for spec, result in zip(specs, results):
        write_json_atomic(Path(spec.run_dir(root)) / "run.json",
                          {"train_run_dir": str(result.run_dir), "best": result.best})
    return results


@dataclass
class RunGroup:
    """One pending fused group of ``run_sweep``: the group, then each run's DONE marker. Returns (name, error) per
    run. A module-level class so that a process executor can send it to its workers."""

    root: Any
    run_progress: bool
    on_error: str

    def __call__(self, specs: list[Any]) -> list[tuple[str, str | None]]:
        with contextlib.ExitStack() as locks:  # a second sweep on the same runs waits for this group
            for spec in specs:
                locks.enter_context(artifact_lock(spec.run_dir(self.root), f"the sweep run {spec.name}"))
            todo = [s for s in specs if not (s.run_dir(self.root) / "DONE").exists()]  # others finished meanwhile
            return self._run(todo) + [(s.name, None) for s in specs if s not in todo]

    def _run(self, specs: list[Any]) -> list[tuple[str, str | None]]:
        if not specs:
            return []
        for spec in specs:
            run_dir = spec.run_dir(self.root)
            run_dir.mkdir(parents=True, exist_ok=True)
            write_json_atomic(run_dir / "spec.json", {"name": spec.name, **spec.key()})
        try:
            train_group_run(specs, root=self.root, progress=self.run_progress)
        except Exception as exc:  # noqa: BLE001 - reported per run, re-raised below unless on_error="continue"
            if self.on_error == "raise":
                raise
            return [(spec.name, f"{type(exc).__name__}: {exc}") for spec in specs]
        for spec in specs:
            write_json_atomic(spec.run_dir(self.root) / "DONE", {"finished": time.strftime("%Y-%m-%dT%H:%M:%S")})
        return [(spec.name, None) for spec in specs]
