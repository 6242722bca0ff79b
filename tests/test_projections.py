"""Projections against scikit-learn: PCA/RP maths, the two standardisation protocols, h-NNE shapes, store helpers."""
import itertools
import json
import pickle

import numpy as np
import pytest
import torch
from sklearn.decomposition import PCA
from sklearn.preprocessing import StandardScaler
from sklearn.random_projection import GaussianRandomProjection

from stego_core.config import StegoError
from stego_core.projections import (
    HNNEProjection,
    IdentityProjection,
    PCAProjection,
    RandomProjection,
    fit_projection,
    make_projection,
    open_projected_store,
    project_store,
)


def _tokens(n=600, c=12, seed=0):
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((c, c))
    scales = np.linspace(0.5, 4.0, c)
    return (rng.standard_normal((n, c)) @ mix * scales + rng.normal(0, 3, c)).astype(np.float64)


def _as_feats(X, b, h, w):
    """tokens [b*h*w, C] (row = (image, y, x)) -> feats [b, C, h, w]."""
    return torch.from_numpy(X.reshape(b, h, w, -1)).permute(0, 3, 1, 2).contiguous()


def _code_tokens(code):
    """code [b, k, h, w] -> [b*h*w, k] in the same token order."""
    return code.permute(0, 2, 3, 1).reshape(-1, code.shape[1]).numpy()


# ----------------------------------------------------------------------------------------------------------------------
# PCA


def test_pca_fit_matches_sklearn_on_standardised_data():
    X = _tokens()
    proj = PCAProjection(4).fit(X)
    scaler = StandardScaler().fit(X)
    ref = PCA().fit(scaler.transform(X))
    np.testing.assert_allclose(proj.explained_variance_ratio_, ref.explained_variance_ratio_, rtol=1e-10)
    assert proj.explained_variance_ratio_.shape == (12,)  # all components, as the study logs
    np.testing.assert_allclose(proj.components_, ref.components_[:4], rtol=1e-6, atol=1e-7)
    assert proj.components_.shape == (4, 12) and proj.components_.dtype == np.float32
    np.testing.assert_allclose(proj.mean_, scaler.mean_, rtol=1e-6)
    np.testing.assert_allclose(proj.scale_, scaler.scale_, rtol=1e-6)  # population std


@pytest.mark.parametrize("standardize", ["per_batch", "train"])
def test_pca_transform_of_training_data_matches_sklearn(standardize):
    X = _tokens(n=2 * 10 * 15)
    proj = PCAProjection(5, standardize=standardize).fit(X)
    ref = PCA().fit(StandardScaler().fit_transform(X))
    expected = ref.transform(StandardScaler().fit_transform(X))[:, :5]  # the batch is the whole training set
    code = proj.transform(_as_feats(X, 2, 10, 15))
    assert code.shape == (2, 5, 10, 15) and code.dtype == torch.float32
    np.testing.assert_allclose(_code_tokens(code), expected, rtol=1e-4, atol=1e-4)


def test_pca_transform_other_batch_matches_formula_for_both_protocols():
    X = _tokens(seed=1)
    batch = _tokens(n=3 * 4 * 5, seed=2) * 2.0 + 1.5  # different statistics than the training data
    pca = PCAProjection(3, standardize="per_batch").fit(X)
    ref = PCA().fit(StandardScaler().fit_transform(X))
    axes = ref.components_[:3]
    feats = _as_feats(batch, 3, 4, 5)
    # per batch: the batch's own mean / population std, then the axes (no PCA centring)
    own = (batch - batch.mean(0)) / batch.std(0)
    np.testing.assert_allclose(_code_tokens(pca.transform(feats)), own @ axes.T, rtol=1e-4, atol=1e-4)
    # train: the fitted statistics
    pca.set_params(standardize="train")
    fitted = StandardScaler().fit(X).transform(batch)
    np.testing.assert_allclose(_code_tokens(pca.transform(feats)), fitted @ axes.T, rtol=1e-4, atol=1e-4)


def test_per_batch_and_train_standardisation_differ_on_shifted_batch():
    X = _tokens(n=400, seed=3)
    sub = X[:4 * 5 * 5]
    shifted = sub + 7.0  # the same tokens with a shifted mean
    per_batch = PCAProjection(4, standardize="per_batch").fit(X)
    train = PCAProjection(4, standardize="train").fit(X)
    f_sub, f_shift = _as_feats(sub, 4, 5, 5), _as_feats(shifted, 4, 5, 5)
    # the study's protocol is blind to the shift, the corrected one is not
    np.testing.assert_allclose(per_batch.transform(f_shift), per_batch.transform(f_sub), atol=1e-4)
    assert (train.transform(f_shift) - train.transform(f_sub)).abs().max() > 0.5
    assert (per_batch.transform(f_shift) - train.transform(f_shift)).abs().max() > 0.5
    # on the training data itself both protocols agree
    f_all = _as_feats(X, 4, 10, 10)
    np.testing.assert_allclose(per_batch.transform(f_all), train.transform(f_all), atol=1e-4)


def test_per_batch_depends_on_batch_composition():
    X = _tokens(n=400, seed=4)
    proj = PCAProjection(3).fit(X)
    feats = _as_feats(X[:200], 8, 5, 5)
    alone = proj.transform(feats[:2])
    together = proj.transform(feats)[:2]
    assert (alone - together).abs().max() > 1e-3  # quirk 15: the batch's statistics matter


def test_zero_variance_channel_per_batch_replicates_nan_and_train_is_finite():
    X = _tokens(n=300, seed=5)
    proj = PCAProjection(2).fit(X)
    batch = X[:2 * 3 * 3].copy()
    batch[:, 0] = 1.0  # constant channel inside the batch
    feats = _as_feats(batch, 2, 3, 3)
    assert not torch.isfinite(proj.transform(feats)).all()  # no epsilon, as the original
    proj.set_params(standardize="train")
    assert torch.isfinite(proj.transform(feats)).all()


def test_transform_accepts_ndarray_and_tokens_and_keeps_layout():
    X = _tokens(n=2 * 3 * 4, seed=6)
    proj = PCAProjection(3).fit(X)
    feats = _as_feats(X, 2, 3, 4)
    out_np = proj.transform(feats.numpy())
    assert isinstance(out_np, np.ndarray) and out_np.dtype == np.float32 and out_np.shape == (2, 3, 3, 4)
    tok = proj.transform_tokens(X)
    assert tok.shape == (24, 3) and tok.dtype == np.float32
    np.testing.assert_allclose(_code_tokens(torch.from_numpy(out_np)), tok, atol=1e-5)


def test_pca_with_components_and_pickle_roundtrip():
    X = _tokens(seed=7)
    proj = PCAProjection(6).fit(X)
    small = proj.with_components(2)
    np.testing.assert_array_equal(small.components_, proj.components_[:2])
    assert proj.components_.shape == (6, 12)  # the original is untouched
    again = pickle.loads(pickle.dumps(proj))
    feats = _as_feats(X[:50], 2, 5, 5)
    torch.testing.assert_close(again.transform(feats), proj.transform(feats))


def test_bad_input_raises_stego_errors():
    X = _tokens(n=50, c=6)
    with pytest.raises(StegoError, match="n_components"):
        PCAProjection(7).fit(X)
    with pytest.raises(StegoError, match="standardize"):
        PCAProjection(2, standardize="whatever").fit(X)
    with pytest.raises(StegoError, match="not fitted"):
        PCAProjection(2).transform(torch.zeros(1, 6, 2, 2))
    proj = PCAProjection(2).fit(X)
    with pytest.raises(StegoError, match="channels"):
        proj.transform(torch.zeros(1, 5, 2, 2))
    with pytest.raises(StegoError, match="feats"):
        proj.transform(torch.zeros(6, 2, 2))
    with pytest.raises(StegoError, match="X"):
        PCAProjection(2).fit(np.zeros((4, 3, 2)))
    with pytest.raises(StegoError, match="method"):
        make_projection("umap", 3)


# ----------------------------------------------------------------------------------------------------------------------
# random projection


def test_random_projection_is_gaussian_with_variance_one_over_k():
    k, c = 200, 500
    X = np.random.default_rng(0).standard_normal((20, c))
    rp = RandomProjection(k, random_state=3).fit(X)
    R = rp.components_
    assert R.shape == (k, c) and R.dtype == np.float32
    assert abs(R.mean()) < 0.01 / np.sqrt(k) * 10
    assert R.var() == pytest.approx(1.0 / k, rel=0.03)
    # it is scikit-learn's matrix
    ref = GaussianRandomProjection(k, random_state=3).fit(StandardScaler().fit_transform(X))
    np.testing.assert_allclose(R, ref.components_, rtol=1e-6)


def test_random_projection_seeds_and_transform():
    X = _tokens(n=120, c=10, seed=8)
    a = RandomProjection(4, random_state=0).fit(X)
    b = RandomProjection(4, random_state=0).fit(X)
    c = RandomProjection(4, random_state=1).fit(X)
    np.testing.assert_array_equal(a.components_, b.components_)
    assert np.abs(a.components_ - c.components_).max() > 0.1
    feats = _as_feats(X, 2, 6, 10)
    code = a.transform(feats)
    assert code.shape == (2, 4, 6, 10) and code.dtype == torch.float32
    own = (X - X.mean(0)) / X.std(0)
    np.testing.assert_allclose(_code_tokens(code), own @ a.components_.T.astype(np.float64), rtol=1e-4, atol=1e-4)


def test_random_projection_allows_more_components_than_channels():
    X = _tokens(n=40, c=5, seed=9)
    code = RandomProjection(8).fit(X).transform(_as_feats(X, 1, 5, 8))
    assert code.shape == (1, 8, 5, 8)


# ----------------------------------------------------------------------------------------------------------------------
# h-NNE and identity


@pytest.mark.parametrize("k", [2, 5])
def test_hnne_fit_transform_shapes_and_dtype(k):
    rng = np.random.default_rng(10)
    centres = rng.normal(0, 4, (6, 16))
    X = (centres[rng.integers(0, 6, 300)] + rng.standard_normal((300, 16))).astype(np.float32)
    proj = HNNEProjection(k).fit(X)
    assert proj.hnne_.hnne_version == "v1"  # the study's algorithm by default
    feats = _as_feats(X[:2 * 6 * 5].astype(np.float64), 2, 6, 5)
    code = proj.transform(feats)
    assert code.shape == (2, k, 6, 5) and code.dtype == torch.float32
    assert proj.get_params()["metric"] == "cosine"
    # the same numbers from the hnne package called directly: the study's v1 settings on standardised tokens
    # (population std), the transformed batch standardised with its own statistics (quirk 15)
    from hnne import HNNE

    ref = HNNE(n_components=k, metric="cosine", radius=0.45, ann_threshold=40_000, preliminary_embedding="pca",
               random_state=0, hnne_version="v1")
    ref.fit((X - X.mean(0)) / X.std(0))
    batch = X[:2 * 6 * 5].astype(np.float64)
    expected = ref.transform((batch - batch.mean(0)) / batch.std(0))  # [60, k]
    got = code.permute(0, 2, 3, 1).reshape(-1, k).numpy()  # [2,k,6,5] -> [60,k]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_identity_is_the_raw_features():
    X = _tokens(n=30, c=7, seed=11)
    feats = _as_feats(X, 1, 5, 6).float()
    proj = make_projection("identity", None).fit(X)
    assert isinstance(proj, IdentityProjection) and proj.n_components_out == 7
    torch.testing.assert_close(proj.transform(feats), feats)


# ----------------------------------------------------------------------------------------------------------------------
# feature-store helpers


class FakeStore:
    """The reading side of the FeatureStore contract (stego_core.cache) over an in-memory tensor."""

    def __init__(self, feats, path="fake-store"):
        self.feats = feats  # [N, C, h, w]
        self.path = path
        n, c, h, w = feats.shape
        self.meta = {"dataset": "toy", "split": "train", "backbone": "none", "dim": c, "grid": [h, w],
                     "n_items": n, "n_classes": 3}
        self.reads = 0
        self.fail_after = None

    def __len__(self):
        return self.feats.shape[0]

    @property
    def n_classes(self):
        return 3

    def read(self, indices):
        if self.fail_after is not None and self.reads >= self.fail_after:
            raise RuntimeError("simulated interruption")
        self.reads += 1
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        return {"feats": self.feats[idx].clone(), "label": torch.zeros(len(idx), 4, 4, dtype=torch.long),
                "image": np.zeros((len(idx), 4, 4, 3), np.uint8), "index": idx}


def _store(n=12, c=8, h=3, w=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return FakeStore(torch.randn(n, c, h, w, generator=g) * torch.linspace(0.5, 3, c).view(1, c, 1, 1) + 1.0)


def _items_fitted_on(store, proj, size):
    """Brute force: the ``size`` store items whose tokens have exactly the fitted channel means."""
    import itertools

    found = []
    for items in itertools.combinations(range(len(store)), size):
        tokens = store.feats[list(items)].permute(0, 2, 3, 1).reshape(-1, store.feats.shape[1]).double()
        if np.allclose(tokens.mean(0).numpy(), proj.mean_, rtol=0, atol=1e-5):
            found.append(items)
    assert len(found) == 1, found
    return found[0]


def test_fit_projection_uses_a_seeded_random_sample_of_items_and_a_token_sample(tmp_path):
    """The study fitted on the first 5000 images of a cache written in shuffled order: a random subset, not the
    store's first items."""
    store = _store()
    proj = fit_projection("pca", 3, store, n_images=5)
    items = _items_fitted_on(store, proj, 5)
    assert items != (0, 1, 2, 3, 4)
    X = store.feats[list(items)].permute(0, 2, 3, 1).reshape(-1, 8).numpy()
    ref = PCAProjection(3).fit(X)
    np.testing.assert_allclose(proj.components_, ref.components_, rtol=1e-5, atol=1e-6)
    assert proj.pca_.n_samples_ == 5 * 12
    assert _items_fitted_on(store, fit_projection("pca", 3, store, n_images=5), 5) == items  # seeded
    assert _items_fitted_on(store, fit_projection("pca", 3, store, n_images=5, item_seed=1), 5) != items
    every = fit_projection("pca", 3, store, n_images=50)  # more than the store holds: all items
    np.testing.assert_allclose(every.mean_, store.feats.permute(0, 2, 3, 1).reshape(-1, 8).mean(0).numpy(),
                               rtol=1e-5, atol=1e-5)

    # a token sample: torch.randperm(random_state) over the tokens of the sampled items, in store order
    sampled = fit_projection("rp", 3, store, n_images=10, n_tokens=50, random_state=4)
    assert sampled.n_features_in_ == 8
    chosen = np.sort(torch.randperm(120, generator=torch.Generator().manual_seed(4))[:50].numpy())
    matches = []
    for left_out in itertools.combinations(range(12), 2):
        kept = [i for i in range(12) if i not in left_out]
        tokens = store.feats[kept].permute(0, 2, 3, 1).reshape(-1, 8).numpy()
        if np.allclose(sampled.mean_, tokens[chosen].mean(0), rtol=1e-5, atol=1e-6):
            matches.append(kept)
    assert len(matches) == 1 and matches[0] != list(range(10))


def test_fit_projection_caches_pca_once_for_every_k(tmp_path):
    store = _store()
    p4 = fit_projection("pca", 4, store, n_images=8, root=tmp_path)
    store.fail_after = 0  # any further read would fail: the cache must be used
    p2 = fit_projection("pca", 2, store, n_images=8, root=tmp_path, standardize="train")
    np.testing.assert_array_equal(p2.components_, p4.components_[:2])
    assert p2.standardize == "train" and p2.n_components == 2
    assert len(list(tmp_path.glob("projections/pca-*/projection.pkl"))) == 1


def test_project_store_matches_batched_transform_and_resumes(tmp_path):
    store = _store(n=10)
    proj = fit_projection("pca", 3, store, n_images=10)
    store.fail_after = store.reads + 2  # two batches, then an "interruption"
    with pytest.raises(RuntimeError, match="interruption"):
        project_store(proj, store, tmp_path, batch_size=3, shuffle=False, progress=False)
    folder = next(tmp_path.glob("projected/*"))
    assert json.loads((folder / "progress.json").read_text())["items_done"] == 6
    assert not (folder / "DONE").exists()
    store.fail_after = None
    reads_before = store.reads
    out = project_store(proj, store, tmp_path, batch_size=3, shuffle=False, progress=False)
    assert store.reads - reads_before == 2  # only items 6..9 (batches [6,9) and [9,10)) were projected again
    assert len(out) == 10 and out.dim == 3 and out.meta["projection"]["method"] == "pca"
    expected = torch.cat([proj.transform(store.feats[s:s + 3]) for s in range(0, 10, 3)])
    torch.testing.assert_close(out.read(list(range(10)))["feats"], expected)
    batch = out.read([4, 1])
    assert batch["feats"].shape == (2, 3, 3, 4) and batch["label"].shape == (2, 4, 4)
    assert sum(len(b["feats"]) for b in out.iter_batches(4, shuffle=True)) == 10
    # a finished store is reopened without work
    store.fail_after = store.reads
    again = open_projected_store(out.path, store)
    assert len(again) == 10
    assert project_store(proj, store, tmp_path, batch_size=3, shuffle=False, progress=False).path == out.path


def _batches_of(store, out, proj, size):
    """Brute force: the ``size``-item groups whose stored codes are exactly the per-batch projection of that group."""
    import itertools

    stored = out.read(list(range(len(store))))["feats"]
    return [items for items in itertools.combinations(range(len(store)), size)
            if torch.allclose(stored[list(items)], proj.transform(store.feats[list(items)]), atol=1e-5)]


def test_project_store_batches_are_random_mixes_stored_in_item_order(tmp_path):
    """The study projected its shuffled training cache in consecutive batches: each batch (and so each per-batch
    standardisation) was a random mix of items. Row i must still be item i."""
    store = _store(n=12)
    proj = fit_projection("rp", 3, store, n_images=12)  # per-batch standardisation: codes depend on the batch
    out = project_store(proj, store, tmp_path, batch_size=4, progress=False)
    groups = _batches_of(store, out, proj, 4)
    assert sorted(i for g in groups for i in g) == list(range(12))  # three batches that partition the items
    assert (0, 1, 2, 3) not in groups and (4, 5, 6, 7) not in groups
    again = project_store(proj, store, tmp_path / "again", batch_size=4, progress=False)
    torch.testing.assert_close(again.read(list(range(12)))["feats"], out.read(list(range(12)))["feats"])  # seeded
    ordered = project_store(proj, store, tmp_path, batch_size=4, shuffle=False, progress=False)
    assert ordered.path != out.path
    assert _batches_of(store, ordered, proj, 4) == [(0, 1, 2, 3), (4, 5, 6, 7), (8, 9, 10, 11)]


@pytest.mark.parametrize("method", ["rp", "hnne"])
def test_constant_channel_per_batch_gets_scale_one_like_standard_scaler(method):
    """The study standardised RP and h-NNE batches with StandardScaler().fit_transform: a channel constant over the
    batch gets scale 1 (so the value 0), not NaN (PCA's torch forward divides by zero instead, tested above)."""
    from sklearn.preprocessing import StandardScaler

    X = _tokens(n=600, seed=9)
    proj = (RandomProjection(3, random_state=0) if method == "rp" else HNNEProjection(2)).fit(X)
    batch = X[:4 * 3 * 3].copy()
    batch[:, 1] = 0.37  # constant over the batch
    got = proj.transform(_as_feats(batch, 4, 3, 3))
    assert torch.isfinite(got).all()
    scaled = StandardScaler().fit_transform(batch).astype(np.float32)
    assert np.abs(scaled[:, 1]).max() < 1e-6  # the constant channel becomes (about) 0, not NaN
    ref = proj.hnne_.transform(scaled) if method == "hnne" else scaled @ proj.components_.T
    torch.testing.assert_close(got, _as_feats(np.asarray(ref, np.float32), 4, 3, 3), rtol=1e-4, atol=1e-4)


def test_fit_projection_identity_records_channels():
    store = _store(c=5)
    proj = fit_projection("identity", None, store, n_images=3)
    assert proj.n_components_out == 5
    torch.testing.assert_close(proj.transform(store.feats[:2]), store.feats[:2])
