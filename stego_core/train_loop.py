"""The training loop of one run or of a group of runs that share a feature store and a batch schedule.

A run's life: ``prepare_slot`` makes its keyed folder (``run_dir_for``) and ``meta.json``, fits or loads its
projection (baselines), builds its ``stego_core.train_state.TrainState`` and, when ``last.pt`` exists, restores it;
``run_group`` is the loop (nanoGPT-style: batch, ``train_step``, logs, validation, checkpoints); ``finish_slot``
writes ``code_corr.npz``, ``results.csv``, ``meta.json`` and ``DONE`` and returns the run's ``TrainResult``.

A group (``stego_core.training.train_group``) is several slots fed from one batch: the items of a step come from
``batch_indices`` (a function of the step, the seed and the batch size), read once; each run then takes its own
step with its own random generators (``TrainState.own_rng``), so it draws what it would draw alone. The projection
baselines of a group are projected together (``projections.transform_many``: one standardisation, one matmul).
Every run keeps its own checkpoints; after an interruption each run restarts from its own ``last.pt`` and a run
that is ahead of the others waits until the group reaches its step. ``train`` is a group of one.
"""
from __future__ import annotations

import json
import pickle
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm

from .config import (
    PROTOCOLS,
    StegoError,
    artifact_dir,
    artifacts_root,
    check_choice,
    check_int,
    code_hash,
    ensure_writable,
    write_json_atomic,
)
from .evaluation import evaluate_batches
from .guards import note
from .projections import project_store, transform_many
from .results import write_rows
from .runlog import NullLogger, RunLogger
from .segmenter import ProjectionCode, Segmenter
from .train_features import FeatureSource, batch_indices, fit_run_projection
from .train_state import CKPT_VERSION, TrainState, build_state, save_checkpoint, save_npz, save_pickle, train_step

__all__ = ["TrainResult", "RunSlot", "run_dir_for", "validation_steps", "prepare_slot", "run_group", "finish_slot",
           "finished_result", "start_state"]

_LOG_EVERY = 10  # steps between host syncs for the progress bar and the logged training losses


@dataclass
class TrainResult:
    """The record of one training run that ``train`` returns (also for a finished run that was only loaded)."""

    run_dir: Path  # the run folder (meta.json, best.pt, last.pt, results.csv, DONE)
    config: Any  # the resolved TrainConfig (code_dim = C for "dino")
    history: Any  # pandas DataFrame: step, split ("train"|"val"), metric (e.g. "loss/total", "cluster/mIoU"), value
    best: dict[str, float]  # step and the four validation metrics at the best cluster-mIoU validation
    last: dict[str, float]  # step and the four validation metrics at the last validation
    segmenter: Segmenter  # the final modules (eval mode): head, fitted projection or identity, and both probes
    code_corr: dict[str, np.ndarray] | None  # "intra"/"inter"/"neg" code-correlation samples of the last step
    checkpoints: dict[str, Path] = field(default_factory=dict)  # "best", "last"
    completed: bool = True  # False when stopped early by max_steps_this_call


def _store_key(store: Any) -> str:
    """What identifies a store in the run hash: its folder name (which carries the feature config hash)."""
    path = getattr(store, "path", None)
    return Path(path).name if path is not None else repr(sorted(getattr(store, "meta", {}).items()))


def run_dir_for(cfg: Any, train_store: Any, val_store: Any, root=None) -> Path:
    """The keyed run folder of ``cfg`` trained on these stores."""
    key = {"config": cfg.to_dict(), "train_features": _store_key(train_store),
           "val_features": _store_key(val_store)}
    return artifact_dir("runs", cfg.run_name, key, root)


def validation_steps(steps: int, val_freq: int, n_items: int, batch_size: int,
                     protocol: str = "original") -> list[int]:
    """The global steps (1-based, ascending) after which a run of ``steps`` steps validates (module docstring of
    ``stego_core.training``).

    "original": PyTorch Lightning 1.x's ``val_check_interval`` counted within each epoch of E = ceil(n_items /
    batch_size) batches (once per epoch, at its last batch, when val_freq > E), nothing extra at the last step.
    "corrected": every ``val_freq`` steps and after the last one. Never empty: a run too short for the rule
    validates after its last step.
    """
    for name, value in (("steps", steps), ("val_freq", val_freq), ("n_items", n_items), ("batch_size", batch_size)):
        check_int(name, value, minimum=1)
    check_choice("protocol", protocol, PROTOCOLS)
    if protocol == "corrected":
        return sorted(set(range(val_freq, steps + 1, val_freq)) | {steps})
    per_epoch = -(-n_items // batch_size)  # batches per epoch (the loader keeps the last, short batch)
    interval = val_freq if val_freq <= per_epoch else per_epoch
    out = [s for s in range(1, steps + 1) if ((s - 1) % per_epoch + 1) % interval == 0]
    return out or [steps]


@dataclass(eq=False)
class RunSlot:
    """One run of a training group: its config, folder and state (``result`` set when it was already done)."""

    cfg: Any
    run_dir: Path
    state: TrainState | None = None
    result: TrainResult | None = None  # a finished run, loaded rather than trained
    train_src: Any = None  # the store it trains / validates on (h-NNE: the projected copies)
    val_src: Any = None
    projection: Any = None
    saved_at: int | None = None  # the step last.pt holds
    code_corr: dict[str, np.ndarray] | None = None
    logger: RunLogger = field(default_factory=NullLogger)  # live logs (stego_core.runlog), closed by finish_slot

    @property
    def last_path(self) -> Path:
        return self.run_dir / "last.pt"

    @property
    def best_path(self) -> Path:
        return self.run_dir / "best.pt"


def _projection_of(cfg: Any, train_store: Any, in_dim: int, run_dir: Path, root, resume: bool, progress: bool):
    proj_path = run_dir / "projection.pkl"
    if resume and proj_path.exists():
        with open(proj_path, "rb") as fh:
            return pickle.load(fh)
    projection = fit_run_projection(cfg, train_store, in_dim, root, progress)
    save_pickle(projection, proj_path)
    return projection


def prepare_slot(cfg: Any, train_store: Any, val_store: Any, dims: tuple[int, int], *, root, resume: bool,
                 progress: bool, device: torch.device) -> RunSlot:
    """The run folder of ``cfg`` with its meta.json, projection and (restored) TrainState; a run with DONE is
    loaded instead (``slot.result``)."""
    in_dim, n_classes = dims
    run_dir = run_dir_for(cfg, train_store, val_store, root)
    ensure_writable(run_dir, "root")
    slot = RunSlot(cfg, run_dir, train_src=train_store, val_src=val_store)
    if resume and (run_dir / "DONE").exists() and slot.last_path.exists():
        slot.result = finished_result(run_dir, cfg, device)
        return slot
    if not resume:
        for name in ("DONE", "last.pt", "best.pt", "results.csv", "code_corr.npz"):
            (run_dir / name).unlink(missing_ok=True)
    write_json_atomic(run_dir / "meta.json", {
        "stage": "runs", "run_id": run_dir.name, "config": cfg.to_dict(), "in_dim": in_dim,
        "n_classes": n_classes, "train_store": str(getattr(train_store, "path", "")),
        "val_store": str(getattr(val_store, "path", "")), "train_store_meta": dict(train_store.meta),
        "class_names": list(train_store.meta.get("class_names", [])), "status": "running",
    })
    if cfg.feature_source == "live" and cfg.method == "hnne":
        raise StegoError("feature_source: 'live' is not available for method 'hnne' (its projection is "
                         "precomputed over the cached features, as in the study); use feature_source='cache'")
    if cfg.method in ("pca", "rp", "hnne"):
        slot.projection = _projection_of(cfg, train_store, in_dim, run_dir, root, resume, progress)
    if cfg.method == "hnne":
        # h-NNE is too slow to apply per batch: like the study, precompute projected copies of both stores
        # (batches of 512, per-batch standardisation under the original protocol) and train on those. The study's
        # training cache was shuffled, so its batches were random mixes; its validation cache was in order.
        slot.train_src = project_store(slot.projection, train_store, artifacts_root(root), shuffle=True,
                                       progress=progress)
        slot.val_src = project_store(slot.projection, val_store, artifacts_root(root), shuffle=False,
                                     progress=progress)
    return slot


def start_state(slot: RunSlot, dims: tuple[int, int], device: torch.device, *, resume: bool,
                own_rng: bool) -> None:
    """Build the slot's TrainState (after its features are loaded, as before) and restore its last.pt."""
    cfg = slot.cfg
    slot.state = build_state(cfg, *dims, device=device, projection=slot.projection, own_rng=own_rng)
    if resume and slot.last_path.exists():
        ck = torch.load(slot.last_path, map_location="cpu", weights_only=False)
        if ck.get("version") != CKPT_VERSION or ck.get("config") != cfg.to_dict():
            raise StegoError(f"resume: {slot.last_path} belongs to another configuration or version; "
                             f"pass resume=False to start over")
        slot.state.load_last(ck)
        slot.saved_at = slot.state.step
        name = slot.last_path.parent.name
        if ck.get("code") != code_hash():
            note(f"resuming the training run {name} at step {ck['step']} of {cfg.steps}: it was started by a "
                 f"different stego_core (code {ck.get('code') or 'unrecorded'}, this one {code_hash()}), so this "
                 f"resumes someone else's run and mixes two versions; pass resume=False to start over")
        else:
            note(f"resuming the training run {name} at step {ck['step']} of {cfg.steps}")


def _validate(segmenter: Segmenter, val: FeatureSource, cfg: Any) -> dict[str, float]:
    """Cluster and linear mIoU / accuracy over the whole validation store (spec §7.1), in batches of
    ``val_batch_size`` (per-batch standardised projections depend on it), through the common prediction path."""

    def batches():
        for start in range(0, val.n, cfg.val_batch_size):
            feats, label = val.get(torch.arange(start, min(start + cfg.val_batch_size, val.n)))
            yield {"feats": feats, "label": label}

    res = evaluate_batches(segmenter, batches(), protocol=cfg.protocol, progress=False, require_labels=False)
    return {key: float(res[key]) for key in ("cluster/mIoU", "cluster/Accuracy", "linear/mIoU", "linear/Accuracy")}


def _validate_slot(slot: RunSlot, val: FeatureSource) -> dict[str, float]:
    st = slot.state
    metrics = _validate(Segmenter(st.step_map, st.cluster_probe, st.linear_probe), val, slot.cfg)
    st.history.extend({"step": st.step, "split": "val", "metric": k, "value": v} for k, v in metrics.items())
    if not isinstance(slot.logger, NullLogger):
        slot.logger.log_validation(st.step, metrics)
        _log_examples(slot, val)
    st.last_metrics = {"step": st.step, **metrics}
    if not st.best or metrics["cluster/mIoU"] > st.best["cluster/mIoU"]:
        st.best = {"step": st.step, **metrics}
        save_checkpoint(st, slot.best_path, "best", metrics)
    save_checkpoint(st, slot.last_path, "last")
    slot.saved_at = st.step
    return metrics


def _log_examples(slot: RunSlot, val: FeatureSource, n: int = 4) -> None:
    """The first ``n`` validation images with labels and linear-probe predictions, to the run's logger (stores
    without images, such as h-NNE's projected copies, log none)."""
    idx = torch.arange(min(n, val.n))
    items = val.store.read(idx)
    if "image" not in items:
        return
    feats, label = val.get(idx)
    st = slot.state
    segmenter = Segmenter(st.step_map, st.cluster_probe, st.linear_probe)
    pred = segmenter.predict(segmenter.code(feats), tuple(label.shape[-2:]), probe="linear")  # [n,H,W]
    slot.logger.log_examples(st.step, items["image"], label.cpu().numpy(), pred.numpy(),
                             getattr(val.store, "palette", None))


@dataclass
class _Batch:
    """What every run of a group takes from one step's batch."""

    idx: Tensor  # [b] items
    feats: Tensor  # [b,C,h,w]
    label: Tensor  # [b,H,W]
    source: FeatureSource
    knn_table: Tensor | None
    codes: dict[int, Tensor]  # id(slot) -> code of a projection run computed with the others
    partners: dict[tuple, Tensor] = field(default_factory=dict)  # partner items -> their features

    def partner_feats(self, partner: Tensor) -> Tensor:
        key = tuple(partner.tolist())
        if key not in self.partners:
            self.partners[key] = self.source.get(partner)[0]
        return self.partners[key]


def _advance(slot: RunSlot, batch: _Batch, val: FeatureSource, validate_at: set[int]) -> dict[str, float]:
    """One step of one run on the group's batch: train_step, logs, validation and checkpoints when due."""
    st, cfg = slot.state, slot.cfg
    with st.own_rng():
        feats_pos = None
        if st.head is not None:
            feats_pos = batch.partner_feats(st.draw_partners(batch.idx, batch.knn_table))
        out = train_step(st, batch.feats, batch.label, feats_pos=feats_pos, code=batch.codes.get(id(slot)),
                         want_corr=st.step + 1 == cfg.steps)
        st.step += 1
        if out.code_corr is not None:
            slot.code_corr = out.code_corr
        logs: dict[str, float] = {}
        if st.step % _LOG_EVERY == 0 or st.step == cfg.steps:
            logs = out.logs()
            st.history.extend({"step": st.step, "split": "train", "metric": k, "value": v} for k, v in logs.items())
            slot.logger.log_losses(st.step, logs)
        if st.step in validate_at:
            _validate_slot(slot, val)
    return logs


def _stacked_codes(slots: list[RunSlot], feats: Tensor) -> dict[int, Tensor]:
    """The codes of a group's PCA / RP runs, projected together (nothing for a lone run: it projects itself)."""
    proj = [s for s in slots if isinstance(s.state.step_map, ProjectionCode)]
    if len(proj) < 2:
        return {}
    codes = transform_many([s.projection for s in proj], feats)
    return {id(s): c for s, c in zip(proj, codes)}


def run_group(slots: list[RunSlot], train: FeatureSource, val: FeatureSource, knn_table: Tensor | None, *,
              max_steps_this_call: int | None = None, callback: Callable[[int, dict], None] | None = None,
              progress: bool = True, desc: str = "") -> None:
    """Train the slots (same train store, steps, batch size, seed and validation schedule) side by side, from the
    step of the one furthest behind, up to ``cfg.steps`` (or ``max_steps_this_call`` more steps). ``callback(step,
    {run_name: logs})`` after every step; an exception there stops the loop (the runs stay resumable)."""
    cfg = slots[0].cfg
    validate_at = set(validation_steps(cfg.steps, cfg.val_freq, train.n, cfg.batch_size, cfg.protocol))
    step = min(s.state.step for s in slots)
    stop_at = cfg.steps if max_steps_this_call is None else min(cfg.steps, step + max_steps_this_call)
    for s in slots:
        s.state.train()
    bar = tqdm(total=cfg.steps, initial=step, desc=desc or cfg.run_name, disable=not progress, unit="step")
    try:
        while step < stop_at:
            idx = batch_indices(train.n, cfg.batch_size, step, cfg.seed)
            feats, label = train.get(idx)
            behind = [s for s in slots if s.state.step == step]  # a run ahead waits for the group
            batch = _Batch(idx, feats, label, train, knn_table, _stacked_codes(behind, feats))
            logs = {s.cfg.run_name: _advance(s, batch, val, validate_at) for s in behind}
            step += 1
            bar.update(1)
            first = next(iter(logs.values()), {})
            if "loss/total" in first:
                bar.set_postfix(loss=f"{first['loss/total']:.4f}", refresh=False)
            if callback is not None:
                callback(step, logs)
        for s in slots:
            if s.saved_at != s.state.step:
                save_checkpoint(s.state, s.last_path, "last")  # final weights, or where max_steps_this_call stopped
                s.saved_at = s.state.step
    finally:
        bar.close()


def _rows_for_results(cfg: Any, run_id: str, history_rows: list[dict], best: dict) -> list[dict]:
    base = dict(run_id=run_id, dataset=cfg.dataset, backbone=cfg.backbone, method=cfg.method,
                code_dim=cfg.code_dim, seed=cfg.seed, protocol=cfg.protocol, crf=False, split="val")
    rows = []
    for r in history_rows:
        if r["split"] != "val":
            continue
        probe, metric = r["metric"].split("/", 1)
        rows.append({**base, "probe": probe, "metric": metric, "step": r["step"], "value": r["value"],
                     "stage": "train"})
    for key, value in best.items():
        if key == "step":
            continue
        probe, metric = key.split("/", 1)
        rows.append({**base, "probe": probe, "metric": metric, "step": best["step"], "value": value,
                     "stage": "best"})
    return rows


def _history_frame(rows: list[dict]):
    return pd.DataFrame(rows, columns=["step", "split", "metric", "value"])


def _run_info(cfg: Any, run_dir: Path, which: str, step: int) -> dict[str, Any]:
    return {"source": "run", "run_dir": str(run_dir), "run_id": run_dir.name, "checkpoint": which, "step": step,
            "dataset": cfg.dataset, "backbone": cfg.backbone, "method": cfg.method, "code_dim": cfg.code_dim,
            "seed": cfg.seed, "protocol": cfg.protocol}


def finish_slot(slot: RunSlot) -> TrainResult:
    """The slot's TrainResult; for a completed run also code_corr.npz, results.csv, meta.json and DONE."""
    if slot.result is not None:
        return slot.result
    slot.logger.close()
    st, cfg, run_dir = slot.state, slot.cfg, slot.run_dir
    st.train(False)
    completed = st.step >= cfg.steps
    if completed:
        if slot.code_corr is not None:
            save_npz(run_dir / "code_corr.npz", slot.code_corr)
        write_rows(run_dir, _rows_for_results(cfg, run_dir.name, st.history, st.best))
        meta = json.loads((run_dir / "meta.json").read_text())
        meta.update(status="done", best=st.best, last=st.last_metrics)
        write_json_atomic(run_dir / "meta.json", meta)
        (run_dir / "DONE").write_text(time.strftime("%Y-%m-%dT%H:%M:%S\n"))
    segmenter = Segmenter(st.code_map, st.cluster_probe, st.linear_probe, info=_run_info(cfg, run_dir, "last", st.step))
    return TrainResult(run_dir=run_dir, config=cfg, history=_history_frame(st.history), best=st.best,
                       last=st.last_metrics, segmenter=segmenter.eval(),
                       code_corr=slot.code_corr if completed else None,
                       checkpoints={"best": slot.best_path, "last": slot.last_path}, completed=completed)


def finished_result(run_dir: Path, cfg: Any, device: torch.device) -> TrainResult:
    """TrainResult of a run that has DONE: modules from last.pt (final weights), history from the checkpoint."""
    segmenter = Segmenter.from_run(run_dir, "last", device=device)
    ck = torch.load(run_dir / "last.pt", map_location="cpu", weights_only=False)
    corr_path = run_dir / "code_corr.npz"
    code_corr = None
    if corr_path.exists():
        with np.load(corr_path) as z:
            code_corr = {k: z[k] for k in z.files}
    return TrainResult(run_dir=run_dir, config=cfg, history=_history_frame(ck["history"]), best=ck["best"],
                       last=ck["last_metrics"], segmenter=segmenter, code_corr=code_corr,
                       checkpoints={"best": run_dir / "best.pt", "last": run_dir / "last.pt"}, completed=True)
