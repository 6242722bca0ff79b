"""The dimension-study sweep: expand (preset x method x dim x seed) into runs, run the unfinished ones, collect rows.

One run = one training of the probes (and, for STEGO, the head) for one (method, code dim, seed) on one dataset
preset (``stego_core.training.PRESETS``). ``SweepGrid`` expands into ``RunSpec``s, each resolved into a validated
``TrainConfig`` up front (a bad override fails before any work) and keyed by the config hash of everything that
defines it: ``<root>/sweeps/<dataset>-<method>-d<dim>-s<seed>-<hash>/`` holds ``spec.json`` and, once the run has
returned, a ``DONE`` marker (written last). ``run_sweep`` skips runs with ``DONE``; an interrupted sweep is simply
called again: finished runs are skipped and the interrupted one is re-invoked, and ``training.train`` resumes it
from its last checkpoint. Results are read back with ``stego_core.results.load_results``.

Why direct calls rather than one papermill notebook per run: a run is a function call on cached features (seconds
to minutes), so a notebook kernel per run would cost more than the run; and the sweep's notebook renders the whole
sweep (progress, table, figure) in one executed chapter.

Fused sweeps (``fused=True``, the default): runs that share a feature store and a batch schedule train as one
group in one pass over the batches (``stego_core.fused``); each still gets its own run folder, markers and rows.

Seams:
- ``run_fn(spec, *, run_dir, root, progress)`` does one run; the default ``train_run`` opens (or builds) the
  train/val feature stores with ``stego_core.cache.cache_features`` and calls ``stego_core.training.train``. Tests
  pass a fake.
- ``executor(fn, specs)`` applies ``fn`` to every pending spec and yields as runs finish; the default runs them one
  after the other in this process. A distributed engine (e.g. Ray: submit ``fn`` per spec, yield from
  ``ray.wait``) plugs in here; the markers live under ``root``, so workers need the same artifacts root.

``STUDY_DIMS`` / ``STUDY_METHODS`` / ``study_grid`` give the paper's grids (spec §8.6 dims per dataset, §9.3: PCA and
RP on all datasets, h-NNE on Cityscapes, the DINO baseline once per seed).
"""
from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from tqdm.auto import tqdm

from .cache import cache_features
from .config import (
    METHODS,
    PROTOCOLS,
    StegoError,
    artifact_dir,
    check_choice,
    check_int,
    config_hash,
    stage_root,
    write_json_atomic,
)
from .crf import start_method
from .fused import RunGroup, group_specs
from .guards import artifact_lock, pool_worker
from .results import empty_results, load_results, summarise
from .runlog import LOGGERS
from .training import PRESETS, TrainConfig, make_config, train

__all__ = ["SWEEP_METHODS", "STUDY_DIMS", "STUDY_METHODS", "RunSpec", "SweepGrid", "SweepResult", "study_grid",
           "run_sweep", "train_run", "serial_executor", "ProcessExecutor", "local_executor", "is_done",
           "sweep_run_ids", "load_sweep_results", "dimension_ladder"]

SWEEP_METHODS = METHODS  # every method can be swept
ON_ERROR = ("raise", "continue")

# Embedding dimensions of the study's figure (spec §8.6); the DINO baseline has none (code = raw features).
STUDY_DIMS: dict[str, tuple[int, ...]] = {
    "cocostuff27": (768, 384, 192, 96, 90, 48, 24, 12, 6, 3),
    "cityscapes": (768, 384, 192, 100, 96, 48, 24, 12, 6, 3),
    "potsdam": (384, 192, 96, 70, 48, 24, 12, 6, 3),
    # embedded demo (112-channel EfficientNet-Lite0 features): the same powers-of-two ladder below C
    "demo": (96, 48, 24, 12, 6, 3),
}
STUDY_METHODS: dict[str, tuple[str, ...]] = {
    "cocostuff27": ("stego", "dino", "pca", "rp"),
    "cityscapes": ("stego", "dino", "pca", "rp", "hnne"),
    "potsdam": ("stego", "dino", "pca", "rp"),
    "demo": ("stego", "dino", "pca", "rp"),
}


def dimension_ladder(width: int, code_dim: int) -> tuple[int, ...]:
    """The study's dimensions for a backbone of width C and a preset's code dimension D (descending): C itself, every
    3·2^k below C, and D. It gives the paper's lists (C = 768, D = 90 / 100; C = 384, D = 70)."""
    check_int("width", width, minimum=1)
    check_int("code_dim", code_dim, minimum=1)
    dims = {width, code_dim} | {3 * 2 ** k for k in range(0, 20) if 3 * 2 ** k < width}
    return tuple(sorted(dims, reverse=True))


# Beyond the paper: the extended study's presets (training.NEWER_BACKBONE_PRESETS, each a paper preset on a DINOv2 or
# DINOv3 backbone): the paper's ladder for the backbone's width C and the preset's scaled code dimension D, and the
# paper preset's methods.
_EXTENDED_STUDY: dict[str, tuple[str, int, int]] = {  # preset -> (paper preset, C, D)
    "cocostuff27_dinov2": ("cocostuff27", 768, 90), "cocostuff27_dinov3": ("cocostuff27", 768, 90),
    "cityscapes_dinov2": ("cityscapes", 768, 100), "cityscapes_dinov3": ("cityscapes", 768, 100),
    "potsdam_dinov2": ("potsdam", 384, 70), "potsdam_dinov3": ("potsdam", 384, 70),
    "potsdam_dinov3_sat": ("potsdam", 1024, 187),
}
STUDY_DIMS.update({preset: dimension_ladder(c, d) for preset, (_, c, d) in _EXTENDED_STUDY.items()})
STUDY_METHODS.update({preset: STUDY_METHODS[paper] for preset, (paper, _, _) in _EXTENDED_STUDY.items()})


@dataclass
class RunSpec:
    """One run of a sweep: the preset, the resolved training config and how to get its feature stores."""

    preset: str  # training preset it was built from (training.PRESETS)
    config: dict  # the resolved TrainConfig as a dict (dataset, backbone, method, code_dim, seed, protocol, ...)
    train_cache: dict = field(default_factory=dict)  # keyword options for cache_features of the training split
    val_cache: dict = field(default_factory=dict)  # keyword options for cache_features of the validation split
    logger: str = "none"  # live logs while it trains ("none", "tensorboard"; stego_core.runlog); not in the key

    @property
    def method(self) -> str:
        return self.config["method"]

    @property
    def code_dim(self) -> int | None:
        """None for the DINO baseline (its code has the backbone's C channels)."""
        return None if self.method == "dino" else int(self.config["code_dim"])

    @property
    def seed(self) -> int:
        return int(self.config["seed"])

    @property
    def name(self) -> str:
        dim = "C" if self.code_dim is None else self.code_dim
        return f"{self.config['dataset']}-{self.method}-d{dim}-s{self.seed}"

    def key(self) -> dict:
        return {"preset": self.preset, "config": self.config, "train_cache": self.train_cache,
                "val_cache": self.val_cache}

    @property
    def config_hash(self) -> str:
        return config_hash(self.key())

    def run_dir(self, root=None) -> Path:
        """``<root>/sweeps/<name>-<hash>``: where the sweep keeps this run's spec and DONE marker."""
        return artifact_dir("sweeps", self.name, self.key(), root)

    def train_config(self):
        """The ``stego_core.training.TrainConfig`` of this run."""
        return TrainConfig(**self.config)


def _resolve_config(preset: str, overrides: Mapping[str, Any]) -> dict:
    return make_config(preset, **overrides).to_dict()


@dataclass
class SweepGrid:
    """A grid of runs: every preset x seed x method x dim (the DINO baseline once per preset and seed).

    ``dims`` may be one list for every preset, a mapping preset -> list, or None (``STUDY_DIMS`` of the preset, else
    the preset's own code_dim). ``overrides`` are TrainConfig fields applied to every run (e.g. ``steps``);
    ``train_cache`` / ``val_cache`` are ``cache_features`` options (e.g. ``res``, ``crop``, ``dataset_options``)
    for the two splits, so a preset's cached features are found again.
    """

    presets: Sequence[str] = ("demo",)  # training presets (datasets): "demo", "cocostuff27", "cityscapes", "potsdam"
    methods: Sequence[str] = ("stego", "dino", "pca", "rp")  # any of SWEEP_METHODS
    dims: Sequence[int] | Mapping[str, Sequence[int]] | None = None  # code dims (ignored for "dino")
    seeds: Sequence[int] = (0,)  # one run per seed; the study used one, the demo needs a few
    protocol: str = "original"  # "original" reproduces the study's quirks, "corrected" fixes them
    overrides: Mapping[str, Any] = field(default_factory=dict)  # TrainConfig fields for every run
    train_cache: Mapping[str, Any] = field(default_factory=dict)  # cache_features options, training split
    val_cache: Mapping[str, Any] = field(default_factory=dict)  # cache_features options, validation split

    def _dims_for(self, preset: str) -> list[int]:
        if self.dims is None:
            if preset in STUDY_DIMS:
                return list(STUDY_DIMS[preset])
            return [int(PRESETS[preset].get("code_dim", 70))]
        if isinstance(self.dims, Mapping):
            if preset not in self.dims:
                raise StegoError(f"dims: no dimensions given for preset {preset!r}; expected a key per preset")
            dims = self.dims[preset]
        else:
            dims = self.dims
        dims = list(dims)
        for d in dims:
            check_int("dims", d, minimum=1)
        if len(set(dims)) != len(dims):
            raise StegoError(f"dims: duplicate dimensions in {dims}")
        return dims

    def runs(self) -> list[RunSpec]:
        """Expand into RunSpecs (order: preset, seed, method, dim), each config validated."""
        if isinstance(self.presets, str) or isinstance(self.methods, str) or isinstance(self.seeds, (str, int)):
            raise StegoError("presets / methods / seeds: expected lists (e.g. presets=['demo'], seeds=[0, 1])")
        for preset in self.presets:
            check_choice("presets", preset, PRESETS)
        for method in self.methods:
            check_choice("methods", method, SWEEP_METHODS)
        for seed in self.seeds:
            check_int("seeds", seed, minimum=0)
        check_choice("protocol", self.protocol, PROTOCOLS)
        for name in ("method", "code_dim", "seed", "protocol"):
            if name in self.overrides:
                raise StegoError(f"overrides: {name!r} is set by the grid itself; use the grid's own field")
        specs: list[RunSpec] = []
        for preset in self.presets:
            dims = self._dims_for(preset)
            for seed in self.seeds:
                for method in self.methods:
                    for dim in ([None] if method == "dino" else dims):
                        over = {**self.overrides, "method": method, "seed": int(seed), "protocol": self.protocol}
                        if dim is not None:
                            over["code_dim"] = int(dim)
                        specs.append(RunSpec(preset, _resolve_config(preset, over), dict(self.train_cache),
                                             dict(self.val_cache)))
        return specs

    def __len__(self) -> int:
        return len(self.runs())


def study_grid(preset: str, *, seeds: Sequence[int] = (0,), methods: Sequence[str] | None = None,
               **kw: Any) -> SweepGrid:
    """The paper's grid for one preset (spec §8.6/§9.3); ``kw`` go to SweepGrid (overrides, caches, protocol)."""
    check_choice("preset", preset, STUDY_DIMS)
    return SweepGrid(presets=(preset,), methods=tuple(methods or STUDY_METHODS[preset]), dims=STUDY_DIMS[preset],
                     seeds=tuple(seeds), **kw)


# ----------------------------------------------------------------------------------------------------------------------
# running


@dataclass
class _RunOne:
    """One pending run of ``run_sweep``: the run, then its DONE marker. A module-level class rather than a closure
    so that a process executor can send it to its workers."""

    root: Any
    run_fn: Callable[..., Any]
    run_progress: bool
    on_error: str

    def __call__(self, spec: RunSpec) -> tuple[str, str | None]:
        run_dir = spec.run_dir(self.root)
        with artifact_lock(run_dir, f"the sweep run {spec.name}"):  # a second sweep waits for this run
            if (run_dir / "DONE").exists():
                return spec.name, None  # finished by another process while we waited
            write_json_atomic(run_dir / "spec.json", {"name": spec.name, **spec.key()})
            try:
                self.run_fn(spec, run_dir=run_dir, root=self.root, progress=self.run_progress)
            except Exception as exc:  # noqa: BLE001 - reported per run, re-raised below unless on_error="continue"
                if self.on_error == "raise":
                    raise
                return spec.name, f"{type(exc).__name__}: {exc}"
            write_json_atomic(run_dir / "DONE", {"finished": time.strftime("%Y-%m-%dT%H:%M:%S")})  # marker last
        return spec.name, None


def train_run(spec: RunSpec, *, run_dir: Path, root=None, progress: bool = False) -> Any:
    """The default run: open/build the train and val feature stores, then ``training.train`` (which resumes)."""
    cfg = spec.train_config()
    train_store = cache_features(cfg.dataset, "train", cfg.backbone, root=root, progress=progress,
                                 **spec.train_cache)
    val_store = cache_features(cfg.dataset, "val", cfg.backbone, root=root, progress=progress, **spec.val_cache)
    result = train(cfg, train_store=train_store, val_store=val_store, root=root, progress=progress,
                   logger=spec.logger,
                   **{k: v for k, v in spec.train_cache.items() if k == "device"})  # caches' device also trains
    write_json_atomic(Path(run_dir) / "run.json", {"train_run_dir": str(result.run_dir), "best": result.best})
    return result


def serial_executor(fn: Callable[[RunSpec], Any], specs: Sequence[RunSpec]) -> Iterator[Any]:
    """Run the specs one after the other in this process, yielding each outcome as it finishes."""
    for spec in specs:
        yield fn(spec)


def _limit_threads(threads: int, owner: int) -> None:
    pool_worker(owner)  # a worker never outlives the process that started the pool (stego_core.guards)
    torch.set_num_threads(threads)


class ProcessExecutor:
    """Run ``workers`` pending runs at once, each in its own local process with ``threads`` torch threads.

    A demo run is many small tensor operations that one thread serves about as fast as two; on a 2-core machine two
    single-threaded runs side by side finish the STEGO runs about 1.9x and the probe-only runs about 1.25x faster
    than one two-threaded run after the other (measured, see the dimension-study chapter). Workers start with
    "forkserver" (as the CRF pool), so a notebook kernel's threads are never forked. ``threads`` None shares this
    machine's cores among the workers. A failing run cancels the runs that have not started yet and re-raises.
    """

    def __init__(self, workers: int = 2, threads: int | None = None):
        self.workers = check_int("workers", workers, minimum=1)
        cores = os.cpu_count() or 1
        self.threads = check_int("threads", threads, minimum=1) if threads is not None else max(1, cores // workers)

    def __call__(self, fn: Callable[[RunSpec], Any], specs: Sequence[RunSpec]) -> Iterator[Any]:

        if not specs:
            return
        ctx = multiprocessing.get_context(start_method())
        pool = ProcessPoolExecutor(max_workers=min(self.workers, len(specs)), mp_context=ctx,
                                   initializer=_limit_threads, initargs=(self.threads, os.getpid()))
        try:
            futures = [pool.submit(fn, spec) for spec in specs]
            for future in as_completed(futures):
                yield future.result()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


def local_executor(workers: int = 1, threads: int | None = None) -> Callable[..., Iterator[Any]]:
    """``serial_executor`` for one worker, else a ``ProcessExecutor`` (the dimension-study chapter's ``workers``)."""
    return serial_executor if check_int("workers", workers, minimum=1) == 1 else ProcessExecutor(workers, threads)


def is_done(spec: RunSpec, root=None) -> bool:
    """True when the sweep has recorded this run as finished."""
    return (spec.run_dir(root) / "DONE").exists()


@dataclass
class SweepResult:
    """What a sweep call did, and the result rows of its runs."""

    specs: list[RunSpec]
    skipped: list[str]  # already finished before this call
    ran: list[str]  # finished by this call
    failed: dict[str, str]  # name -> error (only with on_error="continue")
    results: pd.DataFrame  # tidy rows (stego_core.results) of the sweep's runs

    @property
    def summary(self) -> pd.DataFrame:
        """Mean / std over seeds at each run's best step (results.summarise)."""
        return summarise(self.results)


def _trained_run_id(sweep_run_dir: Path) -> str | None:
    """The training run a sweep run recorded in its ``run.json`` (written by ``train_run``), else None."""
    record = sweep_run_dir / "run.json"
    if not record.exists():
        return None
    return Path(json.loads(record.read_text())["train_run_dir"]).name


def sweep_run_ids(root=None) -> set[str]:
    """The training runs of every finished sweep under ``<root>/sweeps`` (their ``run_id`` in the results store)."""
    base = stage_root("sweeps", root)
    done = sorted(marker.parent for marker in base.glob("*/DONE")) if base.exists() else []
    return {run_id for run_id in map(_trained_run_id, done) if run_id is not None}


def load_sweep_results(root=None) -> pd.DataFrame:
    """The results store restricted to the runs of finished sweeps: what the study's figures show. Other training
    runs on the same artifacts (chapter 02's untrained-head control, chapter 07's protocol variants) share a
    method, dimension and seed with sweep runs but are not part of the comparison."""
    df = load_results(root)
    return df[df["run_id"].isin(sweep_run_ids(root))].reset_index(drop=True)


def _rows_of(df: pd.DataFrame, specs: Sequence[RunSpec], root=None) -> pd.DataFrame:
    """The rows of ``df`` that belong to the given runs: by the training run each recorded when it finished, else
    (a custom ``run_fn`` that records none) matched on dataset, backbone, method, dim, seed and protocol."""
    if df.empty or not specs:
        return empty_results() if df.empty else df.iloc[0:0]
    recorded = {s.name: _trained_run_id(s.run_dir(root)) for s in specs}
    by_id = df[df["run_id"].isin({r for r in recorded.values() if r is not None})]
    specs = [s for s in specs if recorded[s.name] is None]
    if not specs:
        return by_id.reset_index(drop=True)
    keys = pd.DataFrame([{"dataset": s.config["dataset"], "backbone": s.config["backbone"], "method": s.method,
                          "seed": s.seed, "protocol": s.config["protocol"], "_dim": s.code_dim} for s in specs])
    keys = keys.drop_duplicates()
    merged = df.reset_index().merge(keys.astype({"seed": "Int64"}).astype(
        {c: "string" for c in ("dataset", "backbone", "method", "protocol")}),
        on=["dataset", "backbone", "method", "seed", "protocol"], how="inner")
    dim_ok = merged["_dim"].isna() | (merged["code_dim"].astype("float64") == merged["_dim"].astype("float64"))
    idx = set(merged.loc[dim_ok.fillna(False).astype(bool), "index"].unique()) | set(by_id.index)
    return df.loc[sorted(idx)].reset_index(drop=True)


def run_sweep(grid: SweepGrid | Iterable[RunSpec], *, root=None, run_fn: Callable[..., Any] | None = None,
              executor: Callable[[Callable[[RunSpec], Any], Sequence[RunSpec]], Iterable[Any]] | None = None,
              progress: bool = True, run_progress: bool = False, on_error: str = "raise",
              fused: bool = True, logger: str | None = None) -> SweepResult:
    """Run every unfinished run of ``grid`` and return a ``SweepResult`` with the rows of all its runs.

    root: artifacts root (markers, stores, runs, results). run_fn: see the module docstring (default ``train_run``).
    executor: see the module docstring (default ``serial_executor``). progress: a bar over runs; run_progress:
    the runs' own bars. on_error: "raise" stops at the first failing run (call again to resume), "continue"
    records the failure, runs the rest and reports failures in ``SweepResult.failed``.
    fused: train the runs that share a store and a batch schedule together (``stego_core.fused``: one pass over the
    batches per group; each run keeps its own folder, generators and checkpoints, and trains on the batches it
    would see alone); the executor then runs groups. False (or a custom ``run_fn``) trains each run on its own.
    logger: live logs of every run that trains ("none", "tensorboard": event files in each run's folder,
    ``stego_core.runlog``); None keeps each spec's own ``logger``.
    """
    check_choice("on_error", on_error, ON_ERROR)
    specs = grid.runs() if isinstance(grid, SweepGrid) else list(grid)
    if not all(isinstance(s, RunSpec) for s in specs):
        raise StegoError("grid: expected a SweepGrid or a list of RunSpec")
    if logger is not None:
        check_choice("logger", logger, LOGGERS)
        specs = [dataclasses.replace(s, logger=logger) for s in specs]
    seen: dict[str, str] = {}
    for s in specs:
        h = s.config_hash
        if h in seen:
            raise StegoError(f"grid: run {s.name} appears twice; expected distinct runs")
        seen[h] = s.name
    fuse = fused and run_fn is None
    run_fn = run_fn or train_run
    executor = executor or serial_executor

    skipped = [s.name for s in specs if is_done(s, root)]
    pending = [s for s in specs if not is_done(s, root)]
    ran: list[str] = []
    failed: dict[str, str] = {}

    if fuse:  # one unit per fused group, outcomes per run
        units, fn = group_specs(pending), RunGroup(root=root, run_progress=run_progress, on_error=on_error)
    else:
        units, fn = pending, _RunOne(root=root, run_fn=run_fn, run_progress=run_progress, on_error=on_error)
    with tqdm(total=len(specs), initial=len(skipped), desc="sweep", unit="run", disable=not progress) as bar:
        for outcome in executor(fn, units):
            for name, error in (outcome if fuse else [outcome]):
                if error is None:
                    ran.append(name)
                else:
                    failed[name] = error
                bar.set_postfix_str(name)
                bar.update(1)
    return SweepResult(specs=specs, skipped=skipped, ran=ran, failed=failed,
                       results=_rows_of(load_results(root), specs, root))

