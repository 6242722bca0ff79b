"""Run configuration plumbing: clear errors, config hashing, artifact folders, devices and atomic writes.

Every stage of the study writes a keyed artifact ``<root>/<stage>/<name>-<hash>/`` with the resolved
configuration beside it in ``meta.json``; this module owns the table of stage folders (``STAGES``), the hashing,
the root folder, device resolution and the small validation helpers that turn bad input into one readable line.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import shlex
import tempfile
import uuid
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import torch
from fsspec.implementations.local import LocalFileSystem


class StegoError(ValueError):
    """A user-facing error: one line that names the culprit and what was expected."""


PROTOCOLS = ("original", "corrected")

#: The ways of computing codes that the study compares: a trained STEGO head, the raw backbone features (the DINO
#: baseline), and the dimension reductions PCA, random projection and h-NNE.
METHODS = ("stego", "dino", "pca", "rp", "hnne")
#: The methods' names in tables, the explorer and model labels ("STEGO d=24", "DINO (C=768)").
METHOD_LABELS: dict[str, str] = {"stego": "STEGO", "pca": "PCA", "rp": "RP", "hnne": "h-NNE", "dino": "DINO"}
#: The names of the methods' series in the figures, where the DINO baseline is a reference line, not a curve.
SERIES_LABELS: dict[str, str] = {**METHOD_LABELS, "dino": "DINO baseline"}

#: The stage folders under the artifacts root, in the order data flows through them (``artifact_dir``'s ``stage``).
#: The writers (``cache``, ``projections``, ``training``, ``sweep``, ``evaluation``) and the readers (``runs``,
#: ``figures``, ``results``) all name their folder through this table.
STAGES: dict[str, str] = {
    "features": "features",  # feature stores (stego_core.cache), with their kNN tables (stego_core.knn) beside them
    "projections": "projections",  # fitted PCA / RP / h-NNE estimators (projections.fit_projection)
    "projected": "projected",  # features precomputed through a fitted projection (projections.project_store, h-NNE)
    "runs": "runs",  # training runs (stego_core.training.train): checkpoints, history, results.csv
    "sweeps": "sweeps",  # the dimension study's run markers (stego_core.sweep)
    "evaluations": "evaluations",  # final evaluations (Table 2's rows, stage "final" of the results store)
}


def repo_root() -> Path:
    """The checkout that holds this package (or the current folder for an installed copy)."""
    here = Path(__file__).resolve().parent.parent
    return here if (here / "pyproject.toml").exists() else Path.cwd()


def artifacts_root(root: str | os.PathLike | None = None) -> Path:
    """Where caches, checkpoints and results go: ``root``, else ``$STEGO_ARTIFACTS``, else ``<repo>/artifacts``."""
    if root is not None:
        return Path(root)
    env = os.environ.get("STEGO_ARTIFACTS")
    return Path(env) if env else repo_root() / "artifacts"


def _jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _jsonable(dataclasses.asdict(obj))
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item") and callable(obj.item):  # numpy / torch scalars
        return obj.item()
    return obj


def config_hash(cfg: Any, length: int = 10) -> str:
    """A short, stable hash of a configuration (dict or dataclass); key order does not matter."""
    text = json.dumps(_jsonable(cfg), sort_keys=True, separators=(",", ":"))
    return hashlib.sha1(text.encode()).hexdigest()[:length]


@functools.cache
def code_hash(length: int = 10) -> str:
    """A short hash of this ``stego_core``'s Python sources: training checkpoints record it, so a run resumed by
    other code says so."""
    digest = hashlib.sha1()
    package = Path(__file__).resolve().parent
    for path in sorted(package.rglob("*.py")):
        digest.update(path.relative_to(package).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:length]


def stage_root(stage: str, root: str | os.PathLike | None = None) -> Path:
    """``<root>/<folder of stage>``: where the keyed artifacts of one stage of ``STAGES`` live."""
    return artifacts_root(root) / STAGES[check_choice("stage", stage, STAGES)]


def artifact_dir(stage: str, name: str, cfg: Any, root: str | os.PathLike | None = None) -> Path:
    """``<root>/<stage>/<name>-<hash(cfg)>``: the folder of one keyed artifact (not created here)."""
    return stage_root(stage, root) / f"{name}-{config_hash(cfg)}"


def stage_command(notebook: str, parameters: Mapping[str, Any], *, workdir: str | None = None) -> str:
    """The command line that runs one stage (notebook) with these parameters, for messages that say how to make a
    missing artifact: ``stego-study run NAME [--workdir DIR] -p NAME VALUE ...`` (values as YAML literals; None
    entries are left out). ``workdir``: a scratch book folder, so the run does not replace the book's chapter."""
    parts = ["stego-study", "run", notebook] + (["--workdir", str(workdir)] if workdir else [])
    for name, value in parameters.items():
        if value is None:
            continue
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, (dict, list, tuple)):
            text = json.dumps(_jsonable(value))
        else:
            text = str(value)
        parts += ["-p", name, shlex.quote(text)]
    return " ".join(parts)


def resolve_device(device: Any) -> Any:
    """``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"`` or a ``torch.device`` -> ``torch.device``, checked to exist on
    this machine (a one-line StegoError naming ``device`` otherwise). ``"meta"`` (tensors without data) is accepted
    for placement checks: the tests run a stage there to see that every module and input follows the device."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise StegoError(f"device: expected 'cpu', 'cuda', 'cuda:N' or 'mps', got {device!r}") from None
    if dev.type in ("cpu", "meta"):
        return dev
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise StegoError(f"device: {str(device)!r} is not available here (torch.cuda.is_available() is False); "
                             f"use device 'cpu' or run on a machine with a CUDA GPU")
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise StegoError(f"device: {str(device)!r} does not exist; this machine has {n} CUDA device(s) "
                             f"(cuda:0 .. cuda:{n - 1})")
        return dev
    if dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise StegoError(f"device: {str(device)!r} is not available here (torch.backends.mps.is_available() "
                             f"is False); use device 'cpu'")
        return dev
    raise StegoError(f"device: {str(device)!r} is not supported; expected 'cpu', 'cuda', 'cuda:N' or 'mps'")


def _temporary_name(name: str) -> str:
    """``.<name>.<random>.tmp``: hidden, unique per writer, recognisable as a leftover of an interrupted write."""
    return f".{name}.{uuid.uuid4().hex[:12]}.tmp"


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", *, newline: str | None = None) -> Iterator[IO[Any]]:
    """The project's one atomic writer for local files: ``with atomic_write(path) as fh: torch.save(obj, fh)``.

    Writes go to a temporary file in ``path``'s folder (created if needed); on a clean exit it is renamed over
    ``path`` (atomic on one filesystem), on an error it is removed and ``path`` keeps its old content or stays
    absent. ``mode`` is ``"wb"`` (bytes) or ``"w"`` (text, with ``newline`` as for ``open``)."""
    check_choice("mode", mode, ("wb", "w"))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(_temporary_name(path.name))
    try:
        with open(tmp, mode.replace("w", "x"), newline=newline) as fh:  # exclusive: never reuse another's file
            yield fh
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_write_fs(fs: Any, path: str) -> Iterator[IO[bytes]]:
    """``atomic_write`` for an fsspec filesystem (feature stores on any URL): bytes go to a temporary file beside
    ``path``, which is moved over ``path`` on a clean exit (``os.replace`` on the local filesystem, ``fs.mv``
    elsewhere, where object stores have no atomic rename but never show a half-written object) and removed on an
    error."""
    parent, _, name = path.rpartition("/")
    fs.makedirs(parent, exist_ok=True)
    tmp = f"{parent}/{_temporary_name(name)}"
    try:
        with fs.open(tmp, "wb") as fh:
            yield fh
        if isinstance(fs, LocalFileSystem):
            os.replace(tmp, path)
        else:
            fs.mv(tmp, path)
    except BaseException:
        try:
            if fs.exists(tmp):
                fs.rm(tmp)
        except Exception:  # noqa: BLE001 - best effort cleanup, the original error matters
            pass
        raise


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON (sorted keys, indented) to ``path`` through ``atomic_write``."""
    with atomic_write(path, "w") as fh:
        json.dump(_jsonable(obj), fh, indent=2, sort_keys=True)
        fh.write("\n")


def ensure_writable(folder: str | os.PathLike, param: str = "root") -> Path:
    """Create ``folder`` if needed and prove it is writable, or raise a StegoError naming ``param``."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-", delete=True)
        probe.close()
    except OSError as exc:
        raise StegoError(f"{param}: cannot write to {folder} ({exc.strerror or exc}); "
                         f"pass a writable folder or set STEGO_ARTIFACTS") from None
    return folder


def check_choice(param: str, value: Any, choices: Iterable[Any]) -> Any:
    """Raise a StegoError unless ``value`` is one of ``choices``."""
    choices = list(choices)
    if value not in choices:
        raise StegoError(f"{param}: unknown value {value!r}; expected one of {', '.join(map(repr, choices))}")
    return value


def check_int(param: str, value: Any, *, minimum: int | None = None) -> int:
    """Raise a StegoError unless ``value`` is an int (not a bool) of at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise StegoError(f"{param}: expected an integer, got {type(value).__name__} {value!r}")
    if minimum is not None and value < minimum:
        raise StegoError(f"{param}: expected an integer >= {minimum}, got {value}")
    return value


def check_float(param: str, value: Any) -> float:
    """Raise a StegoError unless ``value`` is a real number (ints are accepted)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise StegoError(f"{param}: expected a number, got {type(value).__name__} {value!r}")
    return float(value)
