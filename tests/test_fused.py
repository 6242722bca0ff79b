"""The fused sweep trainer: training.train_group, projections.transform_many, run_sweep(fused=True).

A group of one is today's run bit for bit; STEGO runs trained side by side equal their independent runs bit for bit
(own generators, shared batch); projection runs projected together agree with their independent runs up to float
rounding; a group stopped mid-way resumes (also with one run ahead of the others) to the uninterrupted result.
"""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from test_training import FakeStore, _cfg, _synthetic, _weights, _with_knn

import stego_core.fused as fused_mod
import stego_core.sweep as sweep
from stego_core.config import StegoError
from stego_core.projections import PCAProjection, RandomProjection, transform_many
from stego_core.results import load_results
from stego_core.sweep import SweepGrid, load_sweep_results, run_sweep
from stego_core.training import train, train_group


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)
    yield


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    base = tmp_path_factory.mktemp("fused-stores")
    tr = _with_knn(FakeStore(base / "train", *_synthetic(48, 5), split="train"))
    va = FakeStore(base / "val", *_synthetic(16, 6), split="val")
    return tr, va


def _same(a, b, *, exact=True, atol=1e-4):
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        ok = torch.equal(wa[k], wb[k]) if exact else torch.allclose(wa[k], wb[k], atol=atol, rtol=1e-3)
        assert ok, (a.run_dir.name, k, (wa[k] - wb[k]).abs().max())


def _ck(result):
    return torch.load(result.run_dir / "last.pt", weights_only=False)


CFGS = dict(stego3=dict(code_dim=3), stego5=dict(code_dim=5), pca3=dict(method="pca", code_dim=3),
            pca6=dict(method="pca", code_dim=6), rp4=dict(method="rp", code_dim=4), dino=dict(method="dino"))


@pytest.mark.parametrize("name", ["stego3", "pca3"])
def test_a_group_of_one_is_todays_run_bit_for_bit(tmp_path, stores, name):
    cfg = _cfg(steps=24, val_freq=12, **CFGS[name])
    alone = train(cfg, train_store=stores[0], val_store=stores[1], root=tmp_path / "a", progress=False)
    [grouped] = train_group([cfg], train_store=stores[0], val_store=stores[1], root=tmp_path / "b", progress=False)
    assert grouped.run_dir.name == alone.run_dir.name
    _same(alone, grouped)
    assert grouped.best == alone.best and grouped.history.equals(alone.history)
    a, b = _ck(alone), _ck(grouped)
    assert torch.equal(a["rng_torch"], b["rng_torch"]) and torch.equal(a["rng_partner"], b["rng_partner"])
    assert (alone.run_dir / "results.csv").read_text() == (grouped.run_dir / "results.csv").read_text()
    if alone.code_corr is not None:
        assert np.array_equal(alone.code_corr["neg"], grouped.code_corr["neg"])


def test_fused_runs_equal_their_independent_runs(tmp_path, stores):
    cfgs = [_cfg(steps=24, val_freq=12, **kw) for kw in CFGS.values()]
    fused = train_group(cfgs, train_store=stores[0], val_store=stores[1], root=tmp_path / "f", progress=False)
    alone = [train(c, train_store=stores[0], val_store=stores[1], root=tmp_path / "i", progress=False)
             for c in cfgs]
    for f, a in zip(fused, alone):
        assert f.run_dir.name == a.run_dir.name and f.completed
        assert set(p.name for p in f.run_dir.iterdir()) == set(p.name for p in a.run_dir.iterdir())
        assert list(f.history.columns) == list(a.history.columns) and len(f.history) == len(a.history)
        assert f.best["step"] == a.best["step"] or abs(f.best["cluster/mIoU"] - a.best["cluster/mIoU"]) < 1.0
        if f.config.method in ("stego", "dino"):  # nothing is computed jointly: bit for bit
            _same(f, a)
            assert f.best == a.best and f.history.equals(a.history)
        else:  # PCA / RP projected in one matmul: equal up to float rounding
            _same(f, a, exact=False)
    got = load_results(tmp_path / "f").drop(columns="value")
    want = load_results(tmp_path / "i").drop(columns="value")
    assert got.sort_values(list(got.columns)).reset_index(drop=True).equals(
        want.sort_values(list(want.columns)).reset_index(drop=True))


def test_a_group_killed_mid_way_resumes_to_the_uninterrupted_result(tmp_path, stores):
    tr, va = stores
    cfgs = [_cfg(steps=30, val_freq=10, protocol="corrected", **CFGS[n]) for n in ("stego3", "stego5", "pca3", "rp4")]
    whole = train_group(cfgs, train_store=tr, val_store=va, root=tmp_path / "a", progress=False)

    kept = {}

    def crash(step, logs):
        if step == 10:  # keep the step-10 checkpoint of one run, to put it back behind the others
            run = next(p for p in (tmp_path / "b" / "runs").iterdir() if "-stego-d5-" in p.name)
            kept["path"], kept["copy"] = run / "last.pt", tmp_path / "last-10.pt"
            shutil.copy(kept["path"], kept["copy"])
        if step == 25:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_group(cfgs, train_store=tr, val_store=va, root=tmp_path / "b", progress=False, callback=crash)
    shutil.copy(kept["copy"], kept["path"])  # killed between two runs' checkpoints: this run is 10 steps behind
    steps = []
    resumed = train_group(cfgs, train_store=tr, val_store=va, root=tmp_path / "b", progress=False,
                          callback=lambda step, logs: steps.append((step, sorted(logs))))
    assert steps[0][0] == 11 and len(steps[0][1]) == 1  # only the run behind trains until the others' step
    assert steps[10][0] == 21 and len(steps[10][1]) == 4
    for r, w in zip(resumed, whole):
        assert r.completed
        _same(r, w)
        assert r.best == w.best and r.history.equals(w.history)

    # a clean stop (max_steps_this_call) resumes the same way
    part = train_group(cfgs, train_store=tr, val_store=va, root=tmp_path / "c", progress=False, max_steps_this_call=7)
    assert not any(p.completed for p in part)
    rest = train_group(cfgs, train_store=tr, val_store=va, root=tmp_path / "c", progress=False)
    for r, w in zip(rest, whole):
        _same(r, w)


def test_train_group_refuses_bad_input(tmp_path, stores):
    with pytest.raises(StegoError, match="^cfgs:"):
        train_group([], train_store=stores[0], val_store=stores[1], root=tmp_path, progress=False)
    cfg = _cfg(steps=2, val_freq=2)
    with pytest.raises(StegoError, match="^cfgs:"):
        train_group([cfg, cfg], train_store=stores[0], val_store=stores[1], root=tmp_path, progress=False)


def test_transform_many_equals_the_separate_transforms():
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(400, 12, generator=gen).numpy()
    feats = torch.randn(3, 12, 4, 5, generator=gen)
    for standardize in ("per_batch", "train"):
        pca = PCAProjection(8, standardize=standardize).fit(X)
        projs = [pca.with_components(k) for k in (2, 8, 5)]
        projs += [RandomProjection(k, standardize=standardize, random_state=k).fit(X) for k in (3, 16)]
        got = transform_many(projs, feats)
        for p, g in zip(projs, got):
            want = p.transform(feats)
            assert g.shape == want.shape == (3, p.n_components, 4, 5)
            assert torch.allclose(g, want, atol=1e-5), (type(p).__name__, standardize)


def test_fused_sweep_matches_the_independent_sweep(tmp_path, stores, monkeypatch):
    """run_sweep(fused=True) groups the runs, writes every run's markers and run.json, and gives the same rows."""
    tr, va = stores
    for module in (sweep, fused_mod):  # both open the stores through cache_features
        monkeypatch.setattr(module, "cache_features", lambda dataset, split, *a, **kw: tr if split == "train" else va)
    over = dict(dataset="synthetic", backbone="fakenet", steps=12, batch_size=8, val_freq=6, feature_samples=5,
                neg_samples=2, n_fit_images=16)
    grid = SweepGrid(presets=["demo"], methods=["stego", "dino", "pca", "rp"], dims=[3, 5], seeds=[0, 1],
                     overrides=over)
    fused = run_sweep(grid, root=tmp_path / "f", progress=False)
    alone = run_sweep(grid, root=tmp_path / "i", progress=False, fused=False)
    assert sorted(fused.ran) == sorted(alone.ran) and len(fused.ran) == 14 and not fused.failed
    a, b = load_sweep_results(tmp_path / "f"), load_sweep_results(tmp_path / "i")
    assert sorted(a["run_id"].unique()) == sorted(b["run_id"].unique())
    key = ["run_id", "probe", "metric", "step", "stage"]
    a, b = a.sort_values(key).reset_index(drop=True), b.sort_values(key).reset_index(drop=True)
    assert a[key].equals(b[key])
    stego = a["method"] == "stego"
    assert np.array_equal(a.loc[stego, "value"], b.loc[stego, "value"])
    assert np.allclose(a["value"], b["value"], atol=2.0)  # projections: float rounding, probes follow closely
    again = run_sweep(grid, root=tmp_path / "f", progress=False)
    assert again.ran == [] and len(again.skipped) == 14
