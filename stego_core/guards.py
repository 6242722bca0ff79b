"""Keeping keyed artifacts whole when processes die, run twice at once or fill the disk.

- ``artifact_lock(folder, what)``: one writer per keyed artifact. A second process asking for the same artifact
  waits for the first (and then finds it complete) or, with ``wait=False``, stops with a message naming the
  artifact and the process that holds it. The lock is an OS file lock (``filelock``; ``flock`` on Linux) on
  ``<folder>/.write.lock``, so the kernel releases it when its holder dies, even by ``kill -9``; the holder's pid
  and command line are kept beside it in ``.write.holder.json``, and a process that takes the lock over from a
  dead holder says so.
- ``disk_full_guard(folder, need_bytes, what)``: an ``ENOSPC`` / ``EDQUOT`` raised inside becomes one line naming
  the folder, the free space, what the stage needs by the cost model (``stego_core.costs``) and ``STEGO_ARTIFACTS``.
  The writers remove their temporary file before the error leaves them, so the previous state stays as it was.
- ``die_with_parent()``: a child process (a sweep worker, a CRF worker) is killed when its parent dies
  (``PR_SET_PDEATHSIG`` through ctypes on Linux); ``watch_parent()`` is the same for a process group (the chapter's
  kernel and everything it started): when the parent is gone, the whole group is killed.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import filelock

from .config import StegoError, write_json_atomic

__all__ = [
    "artifact_lock",
    "die_with_parent",
    "disk_full_guard",
    "disk_full_message",
    "lock_holder",
    "note",
    "watch_parent",
]

_held: dict[str, list] = {}  # lock file -> [FileLock, depth]: re-entrant within one process
_held_guard = threading.Lock()
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def note(msg: str) -> None:
    """One line for the user (the notebook's output or the terminal)."""
    print(f"[stego] {msg}", flush=True)


def _paths(folder: str | os.PathLike, name: str) -> tuple[Path, Path]:
    folder = Path(folder)
    return folder / f".{name}.lock", folder / f".{name}.holder.json"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def lock_holder(folder: str | os.PathLike, name: str = "write") -> dict | None:
    """The record of the process that holds (or last held without releasing) ``folder``'s lock, or None."""
    _, holder = _paths(folder, name)
    with contextlib.suppress(OSError, ValueError):
        return json.loads(holder.read_text())
    return None


def _describe(info: dict | None) -> str:
    if not info:
        return "another process"
    cmd = " ".join(info.get("argv", []))[:120]
    return f"process {info.get('pid')} (started {info.get('since', '?')}: {cmd})"


@contextlib.contextmanager
def artifact_lock(folder: str | os.PathLike, what: str, *, name: str = "write", wait: bool = True,
                  timeout: float | None = None, log: Callable[[str], None] = note) -> Iterator[Path]:
    """Hold the write lock ``name`` of the keyed artifact ``folder`` (created if needed) while the block runs; the
    lock files are ``<folder>/.<name>.lock`` and ``<folder>/.<name>.holder.json``.

    what: the artifact in words for messages ("the feature store", "chapter 03_dimension_study").
    wait: True waits for a holder to finish (logging who it is); False raises a StegoError naming the artifact and
    the holder at once. timeout: seconds to wait at most (None: as long as it takes); then the same StegoError.
    Re-entrant within one process.
    """
    lock_file, holder = _paths(folder, name)
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    key = str(lock_file.resolve())
    with _held_guard:
        if key in _held:
            _held[key][1] += 1
            mine = None
        else:
            mine = filelock.FileLock(str(lock_file), is_singleton=False)
    if mine is None:
        try:
            yield Path(folder)
        finally:
            with _held_guard:
                _held[key][1] -= 1
        return
    try:
        mine.acquire(timeout=0)
    except filelock.Timeout:
        info = lock_holder(folder, name)
        busy = f"{what} at {folder} is being written by {_describe(info)}"
        if not wait:
            raise StegoError(f"{busy}; wait for it to finish (or stop it) and run again") from None
        log(f"{busy}; waiting for it to finish")
        try:
            mine.acquire(timeout=-1 if timeout is None else timeout)
        except filelock.Timeout:
            raise StegoError(f"{busy}; gave up after {timeout:g} s") from None
    try:
        stale = lock_holder(folder, name)
        if stale and stale.get("pid") != os.getpid():
            gone = "no longer running" if not _alive(int(stale.get("pid", 0))) else "it released no record"
            log(f"taking over {what} at {folder} from {_describe(stale)}, which died while writing it ({gone})")
        write_json_atomic(holder, {"pid": os.getpid(), "argv": sys.argv[:8],
                                   "since": time.strftime("%Y-%m-%dT%H:%M:%S")})
        with _held_guard:
            _held[key] = [mine, 1]
        try:
            yield Path(folder)
        finally:
            with _held_guard:
                _held.pop(key, None)
            holder.unlink(missing_ok=True)
    finally:
        mine.release()


# ------------------------------------------------------------------------------------------------------ full disk
def _fmt(n: float | None) -> str:
    if n is None:
        return "an unknown amount"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"  # pragma: no cover


def disk_full_message(folder: str | os.PathLike, need_bytes: float | None, what: str) -> str:
    """The one line a full disk gives: folder, free space, the stage's need (cost model), STEGO_ARTIFACTS."""
    free = None
    probe = Path(folder)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    with contextlib.suppress(OSError):
        free = shutil.disk_usage(probe).free
    root = os.environ.get("STEGO_ARTIFACTS") or "unset"
    return (f"{what}: the disk is full writing {folder} ({_fmt(free)} free; this stage needs about "
            f"{_fmt(need_bytes)} by the cost model); free space there or point STEGO_ARTIFACTS at a larger disk "
            f"(STEGO_ARTIFACTS is {root}); the artifact's finished parts are kept and a rerun resumes")


@contextlib.contextmanager
def disk_full_guard(folder: str | os.PathLike, need_bytes: float | None, what: str) -> Iterator[None]:
    """Turn ``ENOSPC``/``EDQUOT`` inside the block into a StegoError with ``disk_full_message``."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in DISK_FULL:
            raise
        raise StegoError(disk_full_message(folder, need_bytes, what)) from None


# ------------------------------------------------------------------------------------------------ child processes
_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGKILL) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent dies (Linux; False elsewhere). Meant for a
    worker's initializer; a worker whose parent is already gone exits at once."""
    if not sys.platform.startswith("linux"):
        return False
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if parent == 1 or not _alive(parent):
        os._exit(1)
    return True


def watch_parent(interval: float = 0.5, parent: int | None = None) -> threading.Thread:
    """Start a daemon thread that kills this process's whole process group once ``parent`` (default: the current
    parent) has died: a chapter's kernel runs in a session of its own with the workers it starts, so killing the
    runner (``kill -9``, the OOM killer, a closed terminal) takes the kernel and every worker with it."""
    parent = os.getppid() if parent is None else parent

    def poll() -> None:
        while True:
            if os.getppid() != parent:
                with contextlib.suppress(OSError):
                    if os.getpgrp() == os.getpid():  # we lead our group: take every member with us
                        os.killpg(os.getpgrp(), signal.SIGKILL)
                os._exit(1)
            time.sleep(interval)

    thread = threading.Thread(target=poll, name="stego-watch-parent", daemon=True)
    thread.start()
    return thread
