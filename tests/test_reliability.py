"""Every case of stego_core.reliability.CASES (the book's reliability page) is run here and must still behave as
the page says: each check produces the message or summary that the case's ``expect`` pattern must match."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import test_guards as guards

from stego_core.config import StegoError, resolve_device
from stego_core.reliability import CASES, FAULTS, cases_table

TESTS = Path(__file__).resolve().parent


def _error(fn, *args, **kw) -> str:
    with pytest.raises(StegoError) as err:
        fn(*args, **kw)
    return str(err.value)


# ------------------------------------------------------------------------------------------------ kill anywhere
def _kill(stage: str, trials: int = 3):
    def check(tmp_path, monkeypatch) -> str:
        from faults import STAGES, Zygote, run_stage

        zygote = Zygote()
        try:
            counts = run_stage(zygote, STAGES[stage], tmp_path, seed=7, trials=trials, log=lambda msg: None)
        finally:
            zygote.close()
        assert counts["trials"] == trials
        return (f"{counts['trials']} trials, {counts['killed']} killed, {counts['corrupt']} corrupt, "
                f"{counts['lost']} lost, {counts['recomputed']} recomputed; {counts['problems']}")
    return check


# ------------------------------------------------------------------------------------------- corrupt / mislabeled
def _store(tmp_path):
    from test_cache import FakeDataset, _cache

    return _cache(tmp_path, FakeDataset(n=10))


def resume_note(tmp_path, monkeypatch, capsys) -> str:
    from test_cache import FakeDataset, _cache

    store = _store(tmp_path)
    (Path(store.path) / "COMPLETE").unlink()
    for f in Path(store.path).glob("chunks/000002-*"):
        f.unlink()
    _cache(tmp_path, FakeDataset(n=10))
    return capsys.readouterr().out


def incomplete_store(tmp_path, monkeypatch) -> str:
    from stego_core.cache import open_store

    store = _store(tmp_path)
    (Path(store.path) / "COMPLETE").unlink()
    for f in Path(store.path).glob("chunks/000002-*"):
        f.unlink()
    return _error(open_store, store.path)


def store_version(tmp_path, monkeypatch) -> str:
    from stego_core.cache import open_store

    store = _store(tmp_path)
    meta = json.loads((Path(store.path) / "meta.json").read_text())
    (Path(store.path) / "meta.json").write_text(json.dumps({**meta, "store_version": 0}))
    return _error(open_store, store.path)


def knn_wrong_length(tmp_path, monkeypatch) -> str:
    from stego_core.knn import load_knn

    store = _store(tmp_path)
    store.save_array("knn-original.npy", np.zeros((3, 2), dtype=np.int64))
    return _error(load_knn, store)


def knn_out_of_range(tmp_path, monkeypatch) -> str:
    from stego_core.knn import load_knn

    store = _store(tmp_path)
    store.save_array("knn-original.npy", np.full((10, 2), 99, dtype=np.int64))
    return _error(load_knn, store)


def _checkpoint(tmp_path, **kw) -> Path:
    from test_checkpoints import save_synthetic_checkpoint

    path = tmp_path / "x.ckpt"
    save_synthetic_checkpoint(path, **kw)
    return path


def truncated_checkpoint(tmp_path, monkeypatch) -> str:
    from stego_core.checkpoints import load_stego_checkpoint

    path = _checkpoint(tmp_path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return _error(load_stego_checkpoint, path)


def mislabeled_checkpoint(tmp_path, monkeypatch) -> str:
    from stego_core.checkpoints import load_stego_checkpoint

    return _error(load_stego_checkpoint, _checkpoint(tmp_path, dataset="potsdam"), expected_dataset="cocostuff27")


def wrong_code_dim_checkpoint(tmp_path, monkeypatch) -> str:
    from stego_core.checkpoints import load_stego_checkpoint

    return _error(load_stego_checkpoint, _checkpoint(tmp_path, code_dim=16), expected_code_dim=70)


def unsafe_checkpoint(tmp_path, monkeypatch) -> str:
    from stego_core.checkpoints import load_stego_checkpoint

    return _error(load_stego_checkpoint, _checkpoint(tmp_path, extra_global=True))


# ------------------------------------------------------------------------------------------------ wrong devices
def _no_cuda(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


def cuda_missing(tmp_path, monkeypatch) -> str:
    _no_cuda(monkeypatch)
    return _error(resolve_device, "cuda")


def cuda_index(tmp_path, monkeypatch) -> str:
    import torch

    if torch.cuda.is_available() and torch.cuda.device_count() > 7:
        pytest.skip("this machine has 8 GPUs")
    return _error(resolve_device, "cuda:7")


def device_typo(tmp_path, monkeypatch) -> str:
    return _error(resolve_device, "gpu")


# ------------------------------------------------------------------------------------------- runner and parameters
_TINY = '''# %% tags=["parameters"]
code_dim: int | None = None  # an optional integer
steps: int = 10  # an integer
device: str = "cpu"  # where to run
pause: float = 0.0  # seconds to sleep
pid_file: str = ""  # where the kernel writes its pid ("" = nowhere)
workers: int = 0  # process-pool workers to start and keep busy (0 = none)

# %%
import os
import time

from ipykernel.connect import get_connection_info

from stego_core.sweep import ProcessExecutor

print("transport", get_connection_info(unpack=True)["transport"])
if pid_file:
    open(pid_file, "w").write(str(os.getpid()))
if workers:
    next(ProcessExecutor(workers=workers, threads=1)(time.sleep, [600] * workers))
time.sleep(pause)
'''


def _tiny(tmp_path) -> Path:
    path = tmp_path / "tiny_nb.py"
    path.write_text(_TINY)
    return path


def _runner(tmp_path, *params: str) -> subprocess.Popen:
    """``stego-study run`` of the tiny notebook in its own process (the CLI's entry point)."""
    code = ("import sys; from stego_core.book.cli import main; "
            f"sys.exit(main(['run', {str(_tiny(tmp_path))!r}, '--workdir', {str(tmp_path / 'wd')!r}, "
            + ", ".join(repr(x) for x in params) + "]))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS.parent), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1"}
    with open(tmp_path / "runner.out", "w") as out, open(tmp_path / "runner.err", "w") as err:  # not pipes: a
        return subprocess.Popen([sys.executable, "-c", code], stdout=out, stderr=err, env=env)  # survivor holds them


def _session(sid: int) -> list[int]:
    """Live (not zombie) processes of session ``sid``: the kernel leads its own session (jupyter_client)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(") ", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":  # fields: state ppid pgrp session ...
            out.append(int(stat.parent.name))
    return out


def _wait_for(predicate, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def runner_killed(tmp_path, monkeypatch) -> str:
    if not sys.platform.startswith("linux"):
        pytest.skip("reads /proc")
    pid_file = tmp_path / "kernel.pid"
    runner = _runner(tmp_path, "-p", "pid_file", str(pid_file), "-p", "workers", "2")
    try:
        kernel = int(_wait_for(lambda: pid_file.exists() and pid_file.read_text(), 120, "the kernel's pid"))
        started = _wait_for(lambda: len(_session(kernel)) >= 4 and _session(kernel), 60,
                            "the kernel, the forkserver and two workers")
    finally:
        runner.kill()  # SIGKILL, as the OOM killer or a closed terminal
        runner.wait()
    try:
        _wait_for(lambda: not _session(kernel), 20, "the kernel and its workers to die")
    except AssertionError:
        survivors = _session(kernel)
        for pid in survivors:
            os.kill(pid, signal.SIGKILL)
        return f"{len(survivors)} survivors of {len(started)}: {survivors}"
    return f"no survivors ({len(started)} processes ended with the runner)"


def chapter_twice(tmp_path, monkeypatch) -> str:
    from stego_core.book.runner import run_notebook

    first = _runner(tmp_path, "-p", "pause", "60")
    holder = tmp_path / "wd" / "book" / "chapters" / ".chapter-tiny_nb.holder.json"
    try:
        _wait_for(holder.exists, 60, "the first runner to hold the chapter")
        message = _error(run_notebook, _tiny(tmp_path), {"pause": 60.0}, workdir=tmp_path / "wd")
        assert str(first.pid) in message
    finally:
        first.kill()
        first.wait()
    return message


def kernel_transport(tmp_path, monkeypatch) -> str:
    import nbformat

    runner = _runner(tmp_path)
    runner.wait(timeout=300)
    err = (tmp_path / "runner.err").read_text()
    assert runner.returncode == 0, err
    nb = nbformat.read(tmp_path / "wd" / "book" / "chapters" / "tiny_nb.ipynb", as_version=4)
    printed = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    transport = printed.split("transport ", 1)[1].split()[0]
    return f"transport {transport}, " + ("TCP warning: " + err if "without encryption" in err else "no TCP warning")


def _cli_params(tmp_path, *pairs) -> str:
    from stego_core.book.parameters import check_parameters, parse_cli_parameters

    nb = _tiny(tmp_path)
    return _error(lambda: check_parameters(nb, parse_cli_parameters(nb, list(pairs))))


def param_device_precheck(tmp_path, monkeypatch) -> str:
    """The chapter is current for device cuda (its key matches): the device is refused all the same."""
    import nbformat

    from stego_core.book.runner import run_key, run_notebook

    _no_cuda(monkeypatch)
    nb = _tiny(tmp_path)
    chapters = tmp_path / "wd" / "book" / "chapters"
    chapters.mkdir(parents=True)
    done = nbformat.v4.new_notebook()
    done.metadata["stego_study"] = {"key": run_key(nb, {"device": "cuda"}), "parameters": {"device": "cuda"}}
    nbformat.write(done, chapters / "tiny_nb.ipynb")
    return _error(run_notebook, nb, {"device": "cuda"}, workdir=tmp_path / "wd", log=lambda msg: None)


CHECKS = {
    "runner_killed": runner_killed,
    "chapter_twice": chapter_twice,
    "kernel_transport": kernel_transport,
    "param_int_as_text": lambda tmp_path, monkeypatch: _cli_params(tmp_path, ("code_dim", "abc")),
    "param_float_for_int": lambda tmp_path, monkeypatch: _cli_params(tmp_path, ("steps", "1.5")),
    "param_unknown": lambda tmp_path, monkeypatch: _cli_params(tmp_path, ("stepz", "10")),
    "param_device_precheck": param_device_precheck,
    **{f"kill_{s}": _kill(s) for s in ("features", "knn", "fivecrop", "training", "sweep", "projected",
                                        "evaluation", "explorer", "book")},
    "busy_lock_message": lambda tmp_path, monkeypatch: guards.busy_lock_message(tmp_path),
    "waiting_lock_message": lambda tmp_path, monkeypatch: guards.waiting_lock_message(tmp_path),
    "stale_lock_message": lambda tmp_path, monkeypatch: guards.stale_lock_message(tmp_path),
    "two_feature_caches": lambda tmp_path, monkeypatch: guards.two_feature_caches(tmp_path),
    "full_disk_feature_store": guards.full_disk_feature_store,
    "full_disk_knn": guards.full_disk_knn,
    "incomplete_store": incomplete_store,
    "store_version": store_version,
    "knn_wrong_length": knn_wrong_length,
    "knn_out_of_range": knn_out_of_range,
    "truncated_checkpoint": truncated_checkpoint,
    "mislabeled_checkpoint": mislabeled_checkpoint,
    "wrong_code_dim_checkpoint": wrong_code_dim_checkpoint,
    "unsafe_checkpoint": unsafe_checkpoint,
    "cuda_missing": cuda_missing,
    "cuda_index": cuda_index,
    "device_typo": device_typo,
}
NEEDS_CAPSYS = {"resume_note": resume_note}


def _params():
    for case in CASES:
        yield pytest.param(case, id=case.id, marks=[pytest.mark.slow] if case.slow else [])


@pytest.mark.parametrize("case", list(_params()))
def test_case_behaves_as_the_page_says(case, tmp_path, monkeypatch, capsys, request):
    if case.id in NEEDS_CAPSYS:
        produced = NEEDS_CAPSYS[case.id](tmp_path, monkeypatch, capsys)
    else:
        produced = CHECKS[case.id](tmp_path, monkeypatch)
    assert re.search(case.expect, produced, re.MULTILINE), f"{case.id}: {produced!r} !~ {case.expect!r}"


def test_every_case_has_a_check_and_the_page_enough_cases():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))
    assert set(ids) == set(CHECKS) | set(NEEDS_CAPSYS)
    assert {c.fault for c in CASES} == set(FAULTS)
    table = cases_table()
    assert len(table) >= 30 and list(table.columns) == ["Fault", "Hits", "What the test does", "What happens"]


def test_kill_cases_cover_every_harness_stage():
    from faults import STAGES

    assert {c.id.removeprefix("kill_") for c in CASES if c.fault == "killed mid-write" and c.id.startswith("kill_")} \
        == set(STAGES)


def test_cases_table_filters_by_fault_and_the_page_reads_its_parameter():
    from stego_core.book.parameters import read_parameters

    disk = cases_table("full disk")
    assert set(disk["Fault"]) == {"full disk"} and len(disk) == sum(c.fault == "full disk" for c in CASES)
    with pytest.raises(StegoError, match="fault: unknown kind of fault 'disk'"):
        cases_table("disk")
    (param,) = read_parameters("10_reliability")
    assert (param.name, param.default, param.annotation) == ("fault", "", "str")
