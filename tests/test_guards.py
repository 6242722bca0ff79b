"""Two processes on one artifact, stale locks, a full disk, workers that die with their parent (stego_core.guards)."""
from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from stego_core.config import StegoError
from stego_core.guards import artifact_lock, die_with_parent, disk_full_guard, lock_holder

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent

_HOLD = """
import sys, time
sys.path.insert(0, {repo!r})
from stego_core.guards import artifact_lock
with artifact_lock({folder!r}, "the test artifact"):
    print("locked", flush=True)
    time.sleep({seconds})
print("released", flush=True)
"""


def _holder(folder: Path, seconds: float) -> subprocess.Popen:
    code = _HOLD.format(repo=str(REPO), folder=str(folder), seconds=seconds)
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "locked"
    return child


def busy_lock_message(tmp_path: Path) -> str:
    """A second process asking without waiting: the message names the artifact and the holder's pid."""
    child = _holder(tmp_path / "art", 30)
    try:
        with pytest.raises(StegoError) as err, artifact_lock(tmp_path / "art", "the test artifact", wait=False):
            pass
        assert str(child.pid) in str(err.value) and str(tmp_path / "art") in str(err.value)
        return str(err.value)
    finally:
        child.kill()
        child.wait()


def waiting_lock_message(tmp_path: Path) -> str:
    """A second process that waits: it gets the lock once the holder is done, and said whom it waited for."""
    child = _holder(tmp_path / "art", 1.5)
    logs: list[str] = []
    t0 = time.monotonic()
    with artifact_lock(tmp_path / "art", "the test artifact", log=logs.append):
        waited = time.monotonic() - t0
        assert child.stdout.readline().strip() == "released"  # the holder finished before we got in
    child.wait()
    assert waited > 0.5 and len(logs) == 1 and str(child.pid) in logs[0]
    return logs[0]


def stale_lock_message(tmp_path: Path) -> str:
    """A holder killed with SIGKILL: the OS frees its lock; the next process takes over at once and says so."""
    child = _holder(tmp_path / "art", 30)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert lock_holder(tmp_path / "art")["pid"] == child.pid  # its record is left behind
    logs: list[str] = []
    with artifact_lock(tmp_path / "art", "the test artifact", wait=False, log=logs.append):
        assert lock_holder(tmp_path / "art")["pid"] == os.getpid()
    assert lock_holder(tmp_path / "art") is None  # released cleanly: no record left
    assert len(logs) == 1 and str(child.pid) in logs[0] and "no longer running" in logs[0]
    return logs[0]


def test_lock_is_reentrant_and_released(tmp_path):
    with artifact_lock(tmp_path / "a", "a"), artifact_lock(tmp_path / "a", "a"):
        assert lock_holder(tmp_path / "a")["pid"] == os.getpid()
    assert lock_holder(tmp_path / "a") is None


_CACHE_TWICE = """
import sys
sys.path[:0] = [{repo!r}, {tests!r}]
from test_cache import FakeDataset, FakeBackbone, _cache
_cache({root!r}, FakeDataset(n=16, delay=0.02, log={log!r}), FakeBackbone(), chunk_size=4, batch_size=2)
print("finished", flush=True)
"""


def two_feature_caches(tmp_path: Path) -> str:
    """Two processes cache the same feature store at once: each item is computed once, both end with the store."""
    from test_cache import FakeBackbone, FakeDataset, _assert_same_store, _cache

    from stego_core.cache import open_store

    log = tmp_path / "served.txt"
    code = _CACHE_TWICE.format(repo=str(REPO), tests=str(TESTS), root=str(tmp_path / "root"), log=str(log))
    children = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 text=True) for _ in range(2)]
    outputs = [c.communicate(timeout=300)[0] for c in children]
    assert all(c.returncode == 0 for c in children), outputs
    served = sorted(int(x) for x in log.read_text().split())
    assert served == list(range(16))  # never two writers: every item computed exactly once
    waited = [o for o in outputs if "is being written by process" in o]
    assert len(waited) == 1, outputs
    store = open_store(next(p for p in (tmp_path / "root" / "features").iterdir() if p.is_dir()))
    _assert_same_store(store, _cache(tmp_path / "ref", FakeDataset(n=16), FakeBackbone()))
    return next(line for line in waited[0].splitlines() if "being written" in line)


def _enospc_after(n_ok: int):
    """A ``numpy.save`` that writes ``n_ok`` files, then half a file and raises ENOSPC (a full disk)."""
    calls = {"n": 0}
    real = np.save

    def save(fh, arr, **kw):
        calls["n"] += 1
        if calls["n"] > n_ok:
            fh.write(b"\x93NUMPY half")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fh, arr, **kw)

    return save


def full_disk_feature_store(tmp_path: Path, monkeypatch) -> str:
    """ENOSPC while writing chunk 2: the finished chunks stay, no temporary file is left, one line names the
    folder, the need from the cost model and STEGO_ARTIFACTS; a rerun with space resumes and completes."""
    from test_cache import FakeBackbone, FakeDataset, _assert_same_store, _cache

    from stego_core import cache
    from stego_core.costs import store_item_bytes

    monkeypatch.setattr(cache.np, "save", _enospc_after(8))  # chunks 0 and 1 (4 arrays each) fit
    with pytest.raises(StegoError) as err:
        _cache(tmp_path / "root", FakeDataset(n=12), FakeBackbone())
    monkeypatch.undo()
    msg = str(err.value)
    store_dir = next(p for p in (tmp_path / "root" / "features").iterdir() if p.is_dir())
    assert "\n" not in msg and str(store_dir) in msg and "STEGO_ARTIFACTS" in msg
    need = 12 * store_item_bytes(8, 16, 16)  # 8 channels, 4x4 tokens, 16 px
    assert f"{need / 1000:.1f} KB" in msg
    assert sorted(p.name for p in store_dir.glob("chunks/*")) == sorted(
        f"{c:06d}-{a}.npy" for c in (0, 1) for a in ("feats", "label", "image", "index"))
    assert not list(store_dir.rglob("*.tmp"))
    resumed = _cache(tmp_path / "root", FakeDataset(n=12), FakeBackbone())
    _assert_same_store(resumed, _cache(tmp_path / "ref", FakeDataset(n=12), FakeBackbone()))
    return msg


def full_disk_knn(tmp_path: Path, monkeypatch) -> str:
    """ENOSPC while saving the kNN table: no table, no temporary file, the one-line message."""
    from test_cache import FakeDataset, _cache

    from stego_core import cache
    from stego_core.knn import build_knn, load_knn

    store = _cache(tmp_path / "root", FakeDataset(n=8))
    monkeypatch.setattr(cache.np, "save", _enospc_after(0))
    with pytest.raises(StegoError) as err:
        build_knn(store, k=3, progress=False)
    monkeypatch.undo()
    assert not list(Path(store.path).glob("knn-*")) and not list(Path(store.path).rglob("*.tmp"))
    with pytest.raises(StegoError, match="no kNN table"):
        load_knn(store)
    assert "kNN table" in str(err.value) and "STEGO_ARTIFACTS" in str(err.value)
    return str(err.value)


def test_disk_full_guard_passes_other_errors(tmp_path):
    with pytest.raises(PermissionError), disk_full_guard(tmp_path, 10, "x"):
        raise PermissionError(errno.EACCES, "denied")


_PDEATH = """
import os, sys, time
sys.path.insert(0, {repo!r})
from stego_core.guards import die_with_parent
pid = os.fork()
if pid == 0:
    die_with_parent()
    time.sleep(60)
    os._exit(0)
print(pid, flush=True)
time.sleep(60)
"""


def test_die_with_parent_kills_the_worker_when_its_parent_dies():
    if not sys.platform.startswith("linux"):
        pytest.skip("PR_SET_PDEATHSIG is Linux only")
    assert die_with_parent.__doc__
    parent = subprocess.Popen([sys.executable, "-c", _PDEATH.format(repo=str(REPO))], stdout=subprocess.PIPE,
                              text=True)
    worker = int(parent.stdout.readline())
    time.sleep(0.3)  # the worker has set its parent-death signal
    parent.kill()
    parent.wait()
    for _ in range(100):
        if not _alive(worker):
            break
        time.sleep(0.05)
    assert not _alive(worker)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still answers kill(0); /proc says what it is
    with open(f"/proc/{pid}/stat") as fh:
        return fh.read().split(") ")[1][0] != "Z"
