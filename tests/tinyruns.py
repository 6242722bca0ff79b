"""Tiny finished runs for tests that need an artifacts folder with runs in it (the explorer's): random-weight
EfficientNet features of a few 64 px mosaic scenes, and a 4-step run per (method, dim) — what the feature stage and
chapters 02 / 03 would have made, in seconds."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from stego_core import runs, training
from stego_core.cache import cache_features
from stego_core.knn import build_knn

OPTS = {"n_images": 8, "scene_size": 96}
RUNS = (("stego", 6), ("stego", 12), ("pca", 6))


def make_tiny_runs(root: str | Path, requests=RUNS) -> dict[str, Any]:
    """Stores and finished runs under ``root``; returns dict(train=store, val=store, run_dirs={(method, dim): dir})."""
    kw = dict(res=64, weights="random", dataset_options=OPTS, root=root, progress=False, batch_size=8)
    train = cache_features("mosaic", "train", "efficientnet_lite0", **kw)
    val = cache_features("mosaic", "val", "efficientnet_lite0", **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # k=30 neighbours on 8 images
        build_knn(train, protocol="original", progress=False)
    run_dirs = {}
    for method, dim in requests:
        cfg = runs.run_config("demo", train_store=train, method=method, code_dim=dim, steps=4, batch_size=4,
                              val_freq=2)
        result = training.train(cfg, train_store=train, val_store=val, root=root, progress=False)
        run_dirs[(method, cfg.code_dim)] = Path(result.run_dir)
    return dict(train=train, val=val, run_dirs=run_dirs)
