"""Every case of stego_core.reliability.CASES (the book's reliability page) is run here and must still behave as
the page says: each check produces the message or summary that the case's ``expect`` pattern must match."""
from __future__ import annotations

import json
import re
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


CHECKS = {
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
    assert len(table) >= 25 and list(table.columns) == ["Fault", "Hits", "What the test does", "What happens"]


def test_kill_cases_cover_every_harness_stage():
    from faults import STAGES

    assert {c.id.removeprefix("kill_") for c in CASES if c.fault == "killed mid-write" and c.id.startswith("kill_")} \
        == set(STAGES)
