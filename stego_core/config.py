"""Run configuration plumbing: clear errors, config hashing, artifact folders and atomic writes.

Every stage of the study writes a keyed artifact ``<root>/<stage>/<name>-<hash>/`` with the resolved
configuration beside it in ``meta.json``; this module owns the hashing, the root folder and the small
validation helpers that turn bad input into one readable line.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable


class StegoError(ValueError):
    """A user-facing error: one line that names the culprit and what was expected."""


PROTOCOLS = ("original", "corrected")


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


def artifact_dir(stage: str, name: str, cfg: Any, root: str | os.PathLike | None = None) -> Path:
    """``<root>/<stage>/<name>-<hash(cfg)>``: the folder of one keyed artifact (not created here)."""
    return artifacts_root(root) / stage / f"{name}-{config_hash(cfg)}"


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON to a temporary file in the same folder, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(_jsonable(obj), fh, indent=2, sort_keys=True)
            fh.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
