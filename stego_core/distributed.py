"""Distributed sweeps: run the sweep's independent runs as Ray tasks, on one machine or a cluster.

``RayExecutor`` plugs into ``stego_core.sweep.run_sweep(..., executor=RayExecutor(...))``. The sweep keeps every
decision of the serial path: it expands the grid, skips runs whose ``DONE`` marker exists, writes the markers and
collects the results table; the executor only decides *where* each pending run executes. Each run becomes one Ray
remote task with the resources it needs (``num_cpus``, ``num_gpus`` — fractional values put several small runs on
one GPU); outcomes are yielded as tasks finish (``ray.wait``), so the sweep's progress bar and error handling work
unchanged (in a fused sweep, ``stego_core.fused``, each task is one fused group of runs rather than one run). An
exception inside a run surfaces as that same exception in the driver (``on_error="raise"``, the
remaining tasks are cancelled) or as a recorded failure (``on_error="continue"``, handled by ``run_sweep``).

Shared storage. Workers write the sweep markers and run folders under the sweep's ``root``, so on a multi-machine
cluster that root must be a shared file system (NFS, a mounted bucket). The feature stores are read through fsspec
(``stego_core.cache.open_store`` accepts ``s3://``, ``gs://``, ... URLs with the matching fsspec driver installed), so
one store built once can feed every worker: ``store_run_fn({"cocostuff27": (train_url, val_url)})`` makes a
``run_fn`` that opens the stores by URL instead of building them on every worker.

Why Ray (and not Dask, joblib, Slurm arrays or our own pool):
- GPU-aware scheduling is built in: a task declares ``num_gpus`` (also fractions such as 0.25 for four small probe
  trainings per GPU) and Ray sets ``CUDA_VISIBLE_DEVICES`` for it; Dask only has abstract "resources" that one must
  declare per worker by hand, joblib/concurrent.futures know nothing about GPUs.
- The same code runs on a laptop (``ray.init()`` starts a local cluster; the tests do exactly that with 2 CPUs) and
  on a cluster (``address="auto"`` or ``"ray://head:10001"``), including cloud autoscaling and Kubernetes (KubeRay).
- Failed tasks come back as exceptions with their traceback; a worker process that dies (e.g. out of memory) can be
  retried (``max_retries``), and ``ray.cancel`` stops what is left.
- It is an existing engine with its own dashboard; the design forbids a home-made scheduler. Slurm arrays would
  also fit a batch cluster, but they cannot run inside a notebook or give results back as Python objects.

``ray`` is an optional dependency (the ``distributed`` extra): it is imported only when a ``RayExecutor`` runs, so
the package works without it.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from .cache import open_store
from .config import StegoError, check_float, check_int
from .training import train

__all__ = ["RayExecutor", "store_run_fn"]


def _import_ray():
    try:
        import ray
    except ImportError:  # pragma: no cover - depends on the environment
        raise StegoError("executor: RayExecutor needs the 'ray' package; install it with "
                         "pip install 'stego-study[distributed]' (or pip install ray)") from None
    return ray


def _call(fn: Callable[[Any], Any], spec: Any) -> Any:
    """What one Ray task runs: the sweep's per-run function on one spec (module level, so workers import it)."""
    return fn(spec)


class RayExecutor:
    """A sweep executor that runs each pending RunSpec as one Ray task; use as ``run_sweep(..., executor=...)``.

    address: the Ray cluster to join when Ray is not yet initialised in this process: None starts a local
      cluster (all CPUs/GPUs of this machine), "auto" joins the cluster this machine belongs to, "ray://host:10001"
      a remote one. When ``ray.init`` was already called, that session is used and ``address`` is ignored.
    num_gpus_per_run: GPUs each run reserves (0 = CPU-only runs; 0.25 = four runs share one GPU; 1 = one each).
      Ray limits each task to its share via CUDA_VISIBLE_DEVICES; the share is not enforced on memory.
    num_cpus_per_run: CPU cores each run reserves (how many runs go in parallel on a machine without GPUs).
    max_retries: how often Ray reruns a task whose worker process died (not a task that raised; a raising run
      is reported, never retried). The sweep's runs resume from their checkpoints, so a retry loses little.
    init_kwargs: extra ``ray.init`` keyword arguments when this executor starts Ray (e.g. ``num_cpus``,
      ``runtime_env``, ``include_dashboard``).
    check_resources: refuse (StegoError) a per-run request that no node of the cluster can hold, which Ray would
      otherwise keep waiting for; pass False on an autoscaling cluster whose GPU nodes start on demand.
    """

    def __init__(self, address: str | None = None, *, num_gpus_per_run: float = 0, num_cpus_per_run: float = 1,
                 max_retries: int = 0, init_kwargs: Mapping[str, Any] | None = None, check_resources: bool = True):
        if address is not None and not isinstance(address, str):
            raise StegoError(f"address: expected None, 'auto' or a ray:// address string, got {address!r}")
        gpus = check_float("num_gpus_per_run", num_gpus_per_run)
        if gpus < 0 or (gpus > 1 and not float(gpus).is_integer()):
            raise StegoError(f"num_gpus_per_run: expected 0, a fraction in (0, 1] or a whole number of GPUs, "
                             f"got {num_gpus_per_run}")
        cpus = check_float("num_cpus_per_run", num_cpus_per_run)
        if cpus <= 0:
            raise StegoError(f"num_cpus_per_run: expected a positive number of CPU cores, got {num_cpus_per_run}")
        self.address = address
        self.num_gpus_per_run = gpus
        self.num_cpus_per_run = cpus
        self.max_retries = check_int("max_retries", max_retries, minimum=0)
        self.init_kwargs = dict(init_kwargs or {})
        self.check_resources = bool(check_resources)

    def __repr__(self) -> str:
        return (f"RayExecutor(address={self.address!r}, num_gpus_per_run={self.num_gpus_per_run}, "
                f"num_cpus_per_run={self.num_cpus_per_run})")

    def _ensure_ray(self):
        ray = _import_ray()
        if not ray.is_initialized():
            ray.init(address=self.address, **self.init_kwargs)
        if self.check_resources:
            # A task that no node can hold waits forever ("infeasible"): refuse it here instead.
            nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive", True)]
            for param, key, want, hint in (
                    ("num_gpus_per_run", "GPU", self.num_gpus_per_run, "use 0 for CPU-only runs or add GPU nodes"),
                    ("num_cpus_per_run", "CPU", self.num_cpus_per_run, "ask for fewer cores per run")):
                best = max((float(r.get(key, 0)) for r in nodes), default=0.0)
                if want > best:
                    raise StegoError(f"{param}: each run asks for {want:g} {key} but the largest node of the Ray "
                                     f"cluster has {best:g}; {hint}")
        return ray

    def __call__(self, fn: Callable[[Any], Any], specs: Sequence[Any]) -> Iterator[Any]:
        """Submit ``fn(spec)`` for every spec as a Ray task and yield the outcomes in the order they finish.

        An exception raised by ``fn`` is re-raised here as the original exception type (the remaining tasks are
        cancelled first); ``run_sweep`` passes an ``fn`` that catches errors itself when ``on_error="continue"``.
        """
        specs = list(specs)
        if not specs:
            return
        ray = self._ensure_ray()
        task = ray.remote(_call).options(num_cpus=self.num_cpus_per_run, num_gpus=self.num_gpus_per_run,
                                         max_retries=self.max_retries, retry_exceptions=False)
        fn_ref = ray.put(fn)  # shipped once, shared by every task
        pending = [task.remote(fn_ref, spec) for spec in specs]
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                try:
                    outcome = ray.get(done[0])
                except ray.exceptions.RayTaskError as exc:
                    cause = exc.cause if isinstance(getattr(exc, "cause", None), BaseException) else None
                    if cause is not None:
                        raise cause from None
                    raise
                yield outcome
        finally:
            for ref in pending:  # an error or an abandoned generator: stop what has not finished
                ray.cancel(ref, force=False)


def store_run_fn(stores: Mapping[str, tuple[str, str]], *, train_fn: Callable[..., Any] | None = None,
                 **train_kwargs: Any) -> Callable[..., Any]:
    """A sweep ``run_fn`` that trains on feature stores opened by path or fsspec URL (no caching on the workers).

    stores: dataset name (the runs' ``config["dataset"]``) -> (train store, validation store), each a local path or
      a URL such as ``s3://bucket/features/cocostuff27-train-dino_vitb8-224-<hash>`` that every worker can read.
    train_fn: the training function (default ``stego_core.training.train``); ``train_kwargs`` are passed on to it.
    The returned function has the sweep's ``run_fn(spec, *, run_dir, root, progress)`` signature and is picklable,
    so it travels to Ray workers.
    """
    if not isinstance(stores, Mapping) or not stores:
        raise StegoError("stores: expected a dict dataset -> (train store URL, val store URL)")
    clean: dict[str, tuple[str, str]] = {}
    for name, pair in stores.items():
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise StegoError(f"stores: entry {name!r} must be a (train store, val store) pair, got {pair!r}")
        clean[str(name)] = (str(pair[0]), str(pair[1]))
    return _StoreRun(clean, train_fn, dict(train_kwargs))


class _StoreRun:
    """The picklable run function built by ``store_run_fn``."""

    def __init__(self, stores: dict[str, tuple[str, str]], train_fn: Callable[..., Any] | None,
                 train_kwargs: dict[str, Any]):
        self.stores = stores
        self.train_fn = train_fn
        self.train_kwargs = train_kwargs

    def __call__(self, spec: Any, *, run_dir: Any, root: Any = None, progress: bool = False) -> Any:
        cfg = spec.train_config()
        if cfg.dataset not in self.stores:
            raise StegoError(f"stores: no feature stores given for dataset {cfg.dataset!r}; "
                             f"expected one of {', '.join(map(repr, self.stores))}")
        train_url, val_url = self.stores[cfg.dataset]
        train_store, val_store = open_store(train_url), open_store(val_url)
        for which, store in (("train", train_store), ("val", val_store)):
            if store.meta.get("backbone") != cfg.backbone:
                raise StegoError(f"stores: the {which} store of {cfg.dataset!r} holds {store.meta.get('backbone')} "
                                 f"features, the run expects {cfg.backbone}")
        train_fn = self.train_fn or train
        return train_fn(cfg, train_store=train_store, val_store=val_store, root=root, progress=progress,
                        **self.train_kwargs)
