"""kNN table: golden g, chunking, brute force, the channel-dropout protocol, saving and loading beside a store."""
from __future__ import annotations

import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

from stego_core.config import StegoError
from stego_core.knn import build_knn, load_knn, nearest_neighbors, pooled_descriptors

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_cache import FakeBackbone, FakeDataset  # noqa: E402


def _store(root, n=12):
    from stego_core.cache import cache_features

    return cache_features(FakeDataset(n=n), None, FakeBackbone(), root=root, chunk_size=5, batch_size=4,
                          progress=False)


def test_golden_g(golden):
    want = golden["g_knn"]["results"]
    rng = np.random.default_rng(9)
    featmaps = rng.standard_normal((64, 16, 3, 3)).astype(np.float32)
    nns = nearest_neighbors(torch.from_numpy(featmaps), 30)
    assert nns.dtype == torch.long and nns.shape == (64, 30)
    assert nns[:3].tolist() == want["nns_rows_0_2"]
    assert bool((nns[:, 0] == torch.arange(64)).all()) == want["self_first_all"]
    assert int(nns[:, 1:8].sum()) == want["sum_of_nns_cols_1_to_7"]


def test_chunked_equals_unchunked_and_brute_force():
    feats = torch.randn(203, 12, 2, 3, generator=torch.Generator().manual_seed(3))
    full = nearest_neighbors(feats, 10, chunk_size=10_000)
    for chunk in (1, 7, 64, 202):
        assert torch.equal(nearest_neighbors(feats, 10, chunk_size=chunk), full)
    # brute force in float64 numpy: cosine of the spatial means, sorted descending
    pooled = feats.double().mean(dim=(2, 3)).numpy()
    unit = pooled / np.linalg.norm(pooled, axis=1, keepdims=True)
    brute = np.argsort(-(unit @ unit.T), axis=1, kind="stable")[:, :10]
    assert np.array_equal(full.numpy(), brute)
    # already pooled descriptors give the same table
    assert torch.equal(nearest_neighbors(feats.mean(dim=(2, 3)), 10), full)


def test_nearest_neighbors_input_checks():
    feats = torch.randn(5, 4, 2, 2)
    with pytest.warns(UserWarning, match="only 5 items"):
        capped = nearest_neighbors(feats, 30)
    assert capped.shape == (5, 5) and sorted(capped[0].tolist()) == list(range(5))
    with pytest.raises(StegoError, match="^feats"):
        nearest_neighbors(torch.randn(5, 4, 2), 3)
    with pytest.raises(StegoError, match="^k"):
        nearest_neighbors(feats, 0)
    with pytest.raises(StegoError, match="^chunk_size"):
        nearest_neighbors(feats, 2, chunk_size=0)


def test_pooled_descriptors_channel_dropout():
    feats = torch.rand(40, 500, 2, 2) + 0.5  # positive, so a dropped channel is exactly 0
    mean = feats.mean(dim=(2, 3))
    assert torch.allclose(pooled_descriptors(feats, protocol="corrected", progress=False), mean, rtol=1e-6, atol=0)
    orig = pooled_descriptors(feats, protocol="original", seed=4, batch_size=7, progress=False)
    ratio = orig / mean
    dropped = ratio == 0
    assert torch.allclose(ratio[~dropped], torch.full_like(ratio[~dropped], 1 / 0.9))  # spec §4: p = 0.1
    assert abs(dropped.float().mean().item() - 0.1) < 0.01  # 20,000 channel draws
    assert dropped.any(dim=1).all() and not torch.equal(dropped[0], dropped[1])  # masks differ per image
    # deterministic, independent of the batch size, different for another seed
    assert torch.equal(orig, pooled_descriptors(feats, protocol="original", seed=4, batch_size=40, progress=False))
    assert not torch.equal(orig, pooled_descriptors(feats, protocol="original", seed=5, progress=False))
    with pytest.raises(StegoError, match="^protocol"):
        pooled_descriptors(feats, protocol="fixed")


def test_build_and_load_beside_store(tmp_path):
    store = _store(tmp_path)
    feats = store.feats_all()
    corrected = build_knn(store, 8, protocol="corrected", progress=False)
    assert torch.equal(corrected, nearest_neighbors(feats, 8))
    assert (Path(store.path) / "knn-corrected.npy").exists()
    assert torch.equal(load_knn(store, "corrected"), corrected)

    original = build_knn(store, 8, protocol="original", seed=1, progress=False)
    want = nearest_neighbors(pooled_descriptors(store, protocol="original", seed=1, progress=False), 8)
    assert torch.equal(original, want)
    assert torch.equal(load_knn(store), original)  # "original" is the default protocol

    # a second call with the same settings loads the file instead of recomputing
    npy = Path(store.path) / "knn-original.npy"
    stamp = npy.stat().st_mtime_ns
    assert torch.equal(build_knn(store, 8, protocol="original", seed=1, progress=False), original)
    assert npy.stat().st_mtime_ns == stamp
    # other settings rebuild it
    assert build_knn(store, 4, protocol="original", seed=1, progress=False).shape == (12, 4)
    assert load_knn(store).shape == (12, 4)

    # k above N is capped and recorded
    with pytest.warns(UserWarning, match="only 12 items"):
        capped = build_knn(store, 30, protocol="corrected", progress=False)
    assert capped.shape == (12, 12) and store.read_json("knn-corrected.json")["k"] == 12


def test_load_knn_errors(tmp_path):
    store = _store(tmp_path)
    with pytest.raises(StegoError, match="no kNN table"):
        load_knn(store, "original")
    store.save_array("knn-original.npy", np.zeros((7, 3), dtype=np.int64))
    with pytest.raises(StegoError, match="kNN table of the wrong length.*7 rows.*12 items"):
        load_knn(store, "original")
    store.save_array("knn-original.npy", np.full((12, 3), 12, dtype=np.int64))
    with pytest.raises(StegoError, match="outside"):
        load_knn(store, "original")
    with pytest.raises(StegoError, match="^protocol"):
        load_knn(store, "bogus")


def test_knn_on_fsspec_store():
    store = _store(f"memory://stego-knn-{uuid.uuid4().hex}", n=9)
    nns = build_knn(store, 5, protocol="corrected", progress=False)
    assert torch.equal(load_knn(store, "corrected"), nns)
    assert torch.equal(nns, nearest_neighbors(store.feats_all(), 5))
