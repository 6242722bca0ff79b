"""Pair statistics of the loss's three pair types (knn.pair_statistics) and the demo scenes' class structure."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from stego_core import knn
from stego_core.book import viz
from stego_core.config import StegoError
from stego_core.data import MOSAIC_SOURCES, load_dataset


class OneHotStore:
    """n images of 4 x 4 tokens (16 px each side, 4 px per token); each token's feature is the one-hot of its class."""

    def __init__(self, n=8, classes=3, seed=0):
        rng = np.random.default_rng(seed)
        self.tokens = rng.integers(0, classes, size=(n, 4, 4))
        self.classes = classes

    def __len__(self):
        return len(self.tokens)

    def read(self, indices):
        idx = np.asarray(indices)
        tok = torch.from_numpy(self.tokens[idx])  # [n,4,4]
        feats = torch.nn.functional.one_hot(tok, self.classes).permute(0, 3, 1, 2).float()  # [n,C,4,4]
        label = tok.repeat_interleave(4, 1).repeat_interleave(4, 2)  # [n,16,16]
        return {"feats": feats, "label": label.long()}


def test_pair_statistics_read_labels_at_token_centres_and_F_is_the_cosine():
    store = OneHotStore()
    table = np.stack([np.roll(np.arange(8), -s) for s in range(4)], axis=1)  # neighbours: the next images
    pairs = knn.pair_statistics(store, table, n_neighbors=3, n_images=8, points=50, pointwise=False, seed=1)
    assert set(pairs["pair"]) == set(knn.PAIR_TYPES) and len(pairs) == 3 * 8 * 50
    # one-hot features: the cosine is 1 exactly where the two tokens share a class, else 0
    np.testing.assert_array_equal(pairs["F"].to_numpy(), pairs["same_class"].to_numpy().astype(float))
    again = knn.pair_statistics(store, table, n_neighbors=3, n_images=8, points=50, pointwise=False, seed=1)
    pd.testing.assert_frame_equal(pairs, again)  # seeded


def test_pair_statistics_pointwise_centres_each_anchor_row():
    store = OneHotStore()
    table = np.stack([np.roll(np.arange(8), -s) for s in range(4)], axis=1)
    flat = knn.pair_statistics(store, table, n_neighbors=3, pointwise=False, points=200, seed=2)
    centred = knn.pair_statistics(store, table, n_neighbors=3, pointwise=True, points=200, seed=2)
    # centring keeps the global mean of each pair type's full tensor, so same-class pairs stay above the others
    for frame in (flat, centred):
        same = frame[frame["same_class"]]["F"].mean()
        other = frame[~frame["same_class"]]["F"].mean()
        assert same > other
    assert not np.allclose(flat["F"], centred["F"])


def test_pair_statistics_errors():
    store = OneHotStore()
    with pytest.raises(StegoError, match="table"):
        knn.pair_statistics(store, np.zeros((8, 2), dtype=int), n_neighbors=3)
    with pytest.raises(StegoError, match="n_images"):
        knn.pair_statistics(store, np.zeros((8, 5), dtype=int), n_images=0)


def test_pair_correlation_chart_marks_the_shifts():
    store = OneHotStore()
    table = np.stack([np.roll(np.arange(8), -s) for s in range(4)], axis=1)
    pairs = knn.pair_statistics(store, table, n_neighbors=3, seed=0)
    spec = viz.pair_correlation_chart(pairs, {"self": 0.12, "knn": 0.1, "random": 1.0}).to_dict()
    rules = [layer for layer in spec["layer"] if layer["mark"]["type"] == "rule"]
    assert len(rules) == 1
    values = [d for ds in spec["datasets"].values() for d in ds if "shift" in d]
    assert sorted(d["shift"] for d in values) == [0.1, 0.12, 1.0]
    with pytest.raises(ValueError, match="pairs"):
        viz.pair_correlation_chart(pd.DataFrame({"x": [1]}))


def test_mosaic_scenes_hold_one_or_two_stuff_classes_and_at_most_one_thing():
    ds = load_dataset("mosaic", "train", n_images=40, scene_size=96, res=96)
    kinds = np.array([s[2] for s in MOSAIC_SOURCES])
    n_stuff, n_thing = [], []
    for i in range(len(ds)):
        present = np.unique(ds.raw(i)[1])
        n_stuff.append(int((kinds[present] == "stuff").sum()))
        n_thing.append(int((kinds[present] == "thing").sum()))
    assert max(n_thing) <= 1 and 0 in n_thing and 1 in n_thing
    # a thing blob can cover a whole stuff class, so a scene shows 0-2 of them; never more than two
    assert max(n_stuff) <= 2 and sum(s == 2 for s in n_stuff) >= 5 and sum(s == 1 for s in n_stuff) >= 5


def test_the_mosaic_generator_version_is_part_of_the_store_key(tmp_path, monkeypatch):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_cache import FakeBackbone

    from stego_core import data
    from stego_core.cache import cache_features

    opts = {"n_images": 2, "scene_size": 32}
    a = cache_features("mosaic", "val", FakeBackbone(), res=32, dataset_options=opts, root=tmp_path, progress=False)
    assert a.meta["data_version"] == data.MosaicDataset.version
    monkeypatch.setattr(data.MosaicDataset, "version", data.MosaicDataset.version + 1)
    b = cache_features("mosaic", "val", FakeBackbone(), res=32, dataset_options=opts, root=tmp_path, progress=False)
    assert b.path != a.path  # scenes from a changed generator never reuse the old features
