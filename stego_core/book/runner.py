"""The papermill runner: a jupytext notebook + parameters -> the executed chapter ``book/chapters/NAME.ipynb``.

The notebook runs in a kernel that is this interpreter (``sys.executable``). A chapter whose key (notebook source,
parameters and the sources of ``stego_core``, :func:`run_key`) matches the key stored in its metadata is not
executed again unless ``force``.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jupytext
import nbformat
from ipykernel.kernelspec import install
from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
from jupyter_client.manager import AsyncKernelManager
from jupyter_core.paths import jupyter_runtime_dir

from ..config import StegoError, repo_root, resolve_device
from ..guards import artifact_lock
from .parameters import check_parameters, load_profile, notebook_path, read_parameters
from .reader import reader_view

KERNEL_NAME = "stego-study"
CHAPTERS = Path("book") / "chapters"


def log(msg: str) -> None:
    print(f"[stego-study] {msg}", flush=True)


# --------------------------------------------------------------------------------------------- execution
def ensure_kernel() -> str:
    """A kernelspec named ``stego-study`` whose python is this interpreter; installed into ``sys.prefix`` if needed."""
    with contextlib.suppress(NoSuchKernel):
        spec = KernelSpecManager().get_kernel_spec(KERNEL_NAME)
        if spec.argv and spec.argv[0] == sys.executable:
            return KERNEL_NAME
    try:
        install(kernel_name=KERNEL_NAME, display_name="Python 3 (stego-study)", prefix=sys.prefix)
    except OSError:  # a read-only environment: a private kernel folder on JUPYTER_PATH
        prefix = Path(tempfile.gettempdir()) / f"stego-study-kernel-{os.getuid()}"
        install(kernel_name=KERNEL_NAME, display_name="Python 3 (stego-study)", prefix=str(prefix))
        os.environ["JUPYTER_PATH"] = os.pathsep.join(
            [str(prefix / "share" / "jupyter")] + [p for p in [os.environ.get("JUPYTER_PATH")] if p])
    return KERNEL_NAME


def library_hash(package: Path | None = None) -> str:
    """A hash of the ``.py`` sources of ``stego_core`` (or of the package folder ``package``): paths and contents.

    Part of every chapter's key, so a fix in the library re-runs the chapters (their numbers may change with it)."""
    package = Path(package) if package is not None else Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(path.relative_to(package).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def run_key(notebook: str | os.PathLike, parameters: dict[str, Any]) -> str:
    """The hash that decides whether an executed chapter is current: notebook source + parameters + the library's
    sources (:func:`library_hash`)."""
    text = notebook_path(notebook).read_text()
    blob = json.dumps({"source": text, "parameters": parameters, "library": library_hash()}, sort_keys=True,
                      default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class RunResult:
    """What ``run_notebook`` did."""

    notebook: str  # the notebook's name
    output: Path  # the executed chapter
    parameters: dict  # the parameters it ran with
    skipped: bool  # True when the chapter was current and not executed again
    wall_s: float  # seconds spent


def run_notebook(notebook: str | os.PathLike, parameters: dict[str, Any] | None = None, *,
                 workdir: str | os.PathLike | None = None, force: bool = False,
                 log: Callable[[str], None] = log) -> RunResult:
    """Execute one notebook with papermill into ``<workdir>/book/chapters/NAME.ipynb`` (skipped when current)."""
    t0 = time.perf_counter()
    src = notebook_path(notebook)
    name = src.stem
    params = check_parameters(src, parameters or {})
    _check_device(src, params)  # before anything else, also when the chapter turns out to be current
    chapters = Path(workdir or repo_root()) / CHAPTERS
    chapters.mkdir(parents=True, exist_ok=True)
    with artifact_lock(chapters, f"chapter {name}", name=f"chapter-{name}", wait=False):  # one runner per chapter
        return _run_locked(src, params, chapters, force=force, log=log, t0=t0)


def _check_device(src: Path, params: dict[str, Any]) -> None:
    """A ``device`` parameter (given or default) that this machine lacks stops the run before any work."""
    defaults = {p.name: p.default for p in read_parameters(src)}
    device = params.get("device", defaults.get("device"))
    if "device" in defaults and device is not None:
        resolve_device(device)


def _run_locked(src: Path, params: dict[str, Any], chapters: Path, *, force: bool, log: Callable[[str], None],
                t0: float) -> RunResult:
    """``run_notebook`` once the chapter is locked: skip a current chapter, else remove the old one (a killed run
    must not leave it in the book) and execute."""
    name = src.stem
    out = chapters / f"{name}.ipynb"
    key = run_key(src, params)
    if out.exists() and not force:
        with contextlib.suppress(Exception):
            meta = nbformat.read(out, as_version=4).metadata.get("stego_study", {})
            if meta.get("key") == key:
                log(f"{name}: up to date (key {key}), not executed again; --force reruns it")
                return RunResult(name, out, params, True, time.perf_counter() - t0)
    shown = ", ".join(f"{k}={v!r}" for k, v in params.items()) or "defaults"
    log(f"{name}: executing ({shown})")
    out.unlink(missing_ok=True)  # stale: the book leaves the page out until the new chapter is complete
    nb = _to_notebook(src)
    running = chapters / f".{name}.running.ipynb"
    failed = chapters / f".{name}.failed.ipynb"
    with tempfile.TemporaryDirectory() as tmp:
        nb_in = Path(tmp) / f"{name}.ipynb"
        nbformat.write(nb, nb_in)
        try:
            _execute(nb_in, running, params)
        except Exception as exc:  # noqa: BLE001 - papermill's execution error carries the cell's exception
            if running.exists():
                os.replace(running, failed)
            what = getattr(exc, "ename", type(exc).__name__)
            why = getattr(exc, "evalue", str(exc)).strip().splitlines()
            raise StegoError(f"{name}: the notebook failed ({what}: {why[-1] if why else ''}); "
                             f"the executed notebook with the traceback is {failed}") from None
    wall = time.perf_counter() - t0
    done = reader_view(nbformat.read(running, as_version=4), read_parameters(src), params)
    done.metadata["stego_study"] = {"key": key, "parameters": params, "wall_s": round(wall, 2),
                                    "source": f"notebooks/{src.name}"}
    nbformat.write(done, running)
    os.replace(running, out)
    failed.unlink(missing_ok=True)
    log(f"{name}: done in {wall:.1f} s -> {out}")
    return RunResult(name, out, params, False, wall)


def _to_notebook(src: Path):
    nb = jupytext.read(src, fmt="py:percent")
    nb.metadata["kernelspec"] = {"name": KERNEL_NAME, "display_name": "Python 3 (stego-study)",
                                 "language": "python"}
    nb.metadata.pop("jupytext", None)  # the chapter is a build product, not a paired file
    return nb


def _execute(nb_in: Path, nb_out: Path, params: dict[str, Any]) -> None:
    import papermill

    papermill.execute_notebook(str(nb_in), str(nb_out), parameters=params, kernel_name=ensure_kernel(),
                               cwd=str(repo_root()), progress_bar=False, log_output=False,
                               request_save_on_cell_execute=False, kernel_manager_class=_ipc_kernel_manager(),
                               extra_arguments=[_WATCH_PARENT])


# The kernel kills its process group (itself, the forkserver and workers it started) when the runner dies.
_WATCH_PARENT = "--IPKernelApp.exec_lines=__import__('stego_core.guards').guards.watch_parent()"


def _ipc_kernel_manager() -> type:
    """A kernel manager whose kernels listen on local IPC sockets (files in Jupyter's runtime folder) instead of
    TCP ports: nothing is reachable from the network, and ipykernel has no reason to warn about unencrypted TCP."""
    class IPCKernelManager(AsyncKernelManager):
        def __init__(self, **kw: Any):
            runtime = Path(jupyter_runtime_dir())
            runtime.mkdir(parents=True, exist_ok=True)
            kw.setdefault("transport", "ipc")
            kw.setdefault("ip", str(runtime / f"stego-{uuid.uuid4().hex[:8]}"))
            super().__init__(**kw)

    return IPCKernelManager


def run_profile(profile: str | os.PathLike, *, workdir: str | os.PathLike | None = None, force: bool = False,
                log: Callable[[str], None] = log) -> list[RunResult]:
    """Run every notebook of a profile, in order."""
    runs = load_profile(profile)
    for nb, params in runs:  # every notebook's device before the first one runs
        _check_device(notebook_path(nb), params)
    return [run_notebook(nb, params, workdir=workdir, force=force, log=log) for nb, params in runs]


