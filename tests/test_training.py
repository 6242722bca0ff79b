"""Tests of stego_core.training: presets, config validation, learning, checkpoints/resume, baselines, live source.

The stores are tiny synthetic ones that follow the FeatureStore contract (features, labels, images, files beside
them for the kNN table): 4 classes, 32-d token features = class prototype + per-image offset + noise on an 8x8
grid, labels at 16x16. At code dim 3 a randomly initialised head loses most of the class structure; STEGO's
correspondence loss recovers it, which is what the learning test checks.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from stego_core.config import StegoError
from stego_core.evaluation import evaluate_store
from stego_core.heads import STEGOHead
from stego_core.knn import build_knn
from stego_core.segmenter import ProjectionCode, Segmenter
from stego_core.training import PRESETS, TrainConfig, make_config, train


@pytest.fixture(autouse=True)
def _one_thread():
    # these tensors are tiny: extra threads only add contention on the shared 2-core machine
    torch.set_num_threads(1)
    yield


class FakeStore:
    """In-memory store with the FeatureStore contract (read / iter_batches / meta / files beside it)."""

    def __init__(self, path: Path, feats: torch.Tensor, label: torch.Tensor, image: np.ndarray, split: str):
        self._path = Path(path)
        self._path.mkdir(parents=True, exist_ok=True)
        self.feats, self.label, self.image = feats.float(), label.long(), image
        n, c, h, w = feats.shape
        k = int(label.max()) + 1
        self.meta = dict(dataset="synthetic", split=split, backbone="fakenet", res=int(label.shape[-1]),
                         crop="center", n_classes=k, dim=c, grid=[h, w], n_items=n,
                         class_names=[f"class{i}" for i in range(k)])

    path = property(lambda self: self._path)
    dim = property(lambda self: self.meta["dim"])
    n_classes = property(lambda self: self.meta["n_classes"])

    def __len__(self):
        return self.feats.shape[0]

    def read(self, indices):
        idx = torch.as_tensor(np.asarray(indices)).long()
        return dict(feats=self.feats[idx].clone(), label=self.label[idx].clone(), image=self.image[idx.numpy()],
                    index=idx)

    def iter_batches(self, batch_size, *, shuffle=False, seed=0):
        for s in range(0, len(self), batch_size):
            yield self.read(np.arange(s, min(s + batch_size, len(self))))

    def has_file(self, name):
        return (self._path / name).exists()

    def save_array(self, name, arr):
        np.save(self._path / name, arr)

    def load_array(self, name):
        return np.load(self._path / name)

    def write_json(self, name, obj):
        (self._path / name).write_text(json.dumps(obj))

    def read_json(self, name):
        return json.loads((self._path / name).read_text())

    def remove_file(self, name):
        (self._path / name).unlink(missing_ok=True)


def _synthetic(n: int, seed: int, *, k: int = 4, c: int = 32, grid: int = 8, up: int = 2):
    protos = torch.randn(k, c, generator=torch.Generator().manual_seed(1234))  # shared by train and val
    g = torch.Generator().manual_seed(seed)
    tokens = torch.empty(n, grid, grid, dtype=torch.long)
    for i in range(n):  # two classes per image, split at a random column
        a, b = torch.randperm(k, generator=g)[:2]
        cut = int(torch.randint(2, grid - 1, (1,), generator=g))
        tokens[i, :, :cut], tokens[i, :, cut:] = a, b
    feats = protos[tokens].permute(0, 3, 1, 2)  # [n,g,g,c] -> [n,c,g,g]
    feats = feats + 0.5 * torch.randn(n, c, 1, 1, generator=g) + 0.5 * torch.randn(n, c, grid, grid, generator=g)
    label = tokens.repeat_interleave(up, 1).repeat_interleave(up, 2)  # [n,16,16]
    label[:, 0, 0] = -1  # an ignored pixel
    image = np.zeros((n, grid * up, grid * up, 3), np.uint8)
    return feats, label, image


def _with_knn(store):
    """The kNN tables of both protocols beside a training store, as the feature stage (01_features) builds them."""
    for protocol in ("original", "corrected"):
        build_knn(store, protocol=protocol, seed=0, progress=False)
    return store


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    base = tmp_path_factory.mktemp("stores")
    tr = _with_knn(FakeStore(base / "train", *_synthetic(64, 0), split="train"))
    va = FakeStore(base / "val", *_synthetic(32, 1), split="val")
    return tr, va


def _cfg(**kw) -> TrainConfig:
    base = dict(dataset="synthetic", backbone="fakenet", code_dim=3, steps=40, batch_size=8, val_freq=20,
                pos_intra_weight=0.1, pos_inter_weight=1.0, neg_inter_weight=0.15, pos_intra_shift=0.12,
                pos_inter_shift=0.2, neg_inter_shift=1.0, lr=5e-3, feature_samples=7, neg_samples=3)
    return TrainConfig(**{**base, **kw})


def _weights(result) -> dict[str, torch.Tensor]:
    seg = result.segmenter
    out = {f"cluster.{k}": v for k, v in seg.cluster_probe.state_dict().items()}
    out.update({f"linear.{k}": v for k, v in seg.linear_probe.state_dict().items()})
    if isinstance(seg.code_map, STEGOHead):
        out.update({f"head.{k}": v for k, v in seg.code_map.state_dict().items()})
    return out


# ---------------------------------------------------------------------------------------------------------------
# configuration


def test_presets_carry_the_reference_values():
    # spec §9.1 (README commands of the released checkpoints)
    table = {
        "cocostuff27": ("dino_vitb8", 90, 7000, 32, True, 0.1, 1.0, 0.1538476246415498, 0.12, 0.2, 1.0),
        "cityscapes": ("dino_vitb8", 100, 7000, 32, False, 1.0, 0.577453483136995, 0.9058762625226623,
                       0.45828472207, 0.1754346515479633, 0.31361241889448443),
        "potsdam": ("dino_vits8", 70, 5000, 16, True, 0.67, 0.25, 0.63, 0.08, 0.02, 0.76),
    }
    for name, values in table.items():
        cfg = make_config(name)
        got = (cfg.backbone, cfg.code_dim, cfg.steps, cfg.batch_size, cfg.pointwise, cfg.pos_intra_weight,
               cfg.pos_inter_weight, cfg.neg_inter_weight, cfg.pos_intra_shift, cfg.pos_inter_shift,
               cfg.neg_inter_shift)
        assert got == values, name
        assert cfg.dataset == name and cfg.correspondence_weight == 1.0
        # shared defaults (§9.2)
        assert (cfg.lr, cfg.probe_lr, cfg.n_neighbors, cfg.feature_samples, cfg.neg_samples, cfg.val_freq,
                cfg.zero_clamp, cfg.stabilize, cfg.extra_clusters, cfg.val_batch_size) == (
            5e-4, 5e-3, 7, 11, 5, 100, True, False, 0, 8)
    demo = make_config("demo", code_dim=6, seed=3)
    assert (demo.dataset, demo.backbone, demo.code_dim, demo.seed) == ("mosaic", "efficientnet_lite0", 6, 3)
    assert set(PRESETS) >= {"cocostuff27", "cityscapes", "potsdam", "demo"}


def test_baselines_need_no_correspondence_weight():
    assert make_config("potsdam", method="pca", code_dim=6).correspondence_weight == 0.0


@pytest.mark.parametrize("call, param", [
    (lambda: make_config("nope"), "preset"),
    (lambda: make_config("demo", code_dim=0), "code_dim"),
    (lambda: make_config("demo", methd="pca"), "overrides"),
    (lambda: make_config("demo", method="umap"), "method"),
    (lambda: make_config("demo", protocol="fixed"), "protocol"),
    (lambda: make_config("demo", feature_source="disk"), "feature_source"),
    (lambda: make_config("demo", steps=2.5), "steps"),
    (lambda: make_config("demo", lr=0), "lr"),
    (lambda: make_config("demo", pointwise="yes"), "pointwise"),
])
def test_bad_config_gives_one_clear_line(call, param):
    with pytest.raises(StegoError) as info:
        call()
    msg = str(info.value)
    assert msg.startswith(param + ":") and "\n" not in msg


def test_missing_feature_cache_names_the_fix(tmp_path, stores):
    with pytest.raises(StegoError, match=r"^train_store: .*cache_features"):
        train(_cfg(), train_store=tmp_path / "no-such-store", val_store=stores[1], root=tmp_path, progress=False)


def test_knn_table_of_wrong_length_is_refused(tmp_path, stores):
    tr = FakeStore(tmp_path / "tr", *_synthetic(12, 5), split="train")
    tr.save_array("knn-original.npy", np.zeros((11, 30), np.int64))
    with pytest.raises(StegoError, match="wrong length") as info:
        train(_cfg(), train_store=tr, val_store=stores[1], root=tmp_path, progress=False)
    assert "\n" not in str(info.value)


def test_store_of_another_dataset_is_refused(tmp_path, stores):
    with pytest.raises(StegoError, match="^train_store: .*dataset"):
        train(_cfg(dataset="mosaic"), train_store=stores[0], val_store=stores[1], root=tmp_path, progress=False)


# ---------------------------------------------------------------------------------------------------------------
# training


@pytest.fixture(scope="module")
def stego_and_untrained(stores, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    tr, va = stores
    stego = train(_cfg(steps=60, val_freq=30), train_store=tr, val_store=va, root=root, progress=False)
    frozen = train(_cfg(steps=60, val_freq=30, correspondence_weight=0.0), train_store=tr, val_store=va,
                   root=root, progress=False)
    return stego, frozen, root


def test_stego_learns_and_beats_the_untrained_head(stego_and_untrained):
    stego, frozen, _ = stego_and_untrained
    h = stego.history
    total = h[h.metric == "loss/total"].value.to_numpy()
    assert len(total) == 6 and total[-2:].mean() < total[:2].mean() - 0.3
    inter = h[h.metric == "loss/pos_inter"].value.to_numpy()
    assert np.isfinite(inter).all()
    # same probe schedule, only the correspondence loss differs: STEGO separates the classes at D=3
    assert stego.best["cluster/mIoU"] > frozen.best["cluster/mIoU"] + 15
    assert stego.best["linear/mIoU"] > frozen.best["linear/mIoU"] + 15
    # frozen head stayed at its initialisation (same seed -> same init as the STEGO run's head before training)
    head = stego.segmenter.code_map
    assert isinstance(head, STEGOHead) and not head.training


def test_run_folder_checkpoints_rows_and_histograms(stego_and_untrained):
    stego, _, root = stego_and_untrained
    run_dir = stego.run_dir
    assert run_dir.parent == Path(root) / "runs" and run_dir.name.startswith("synthetic-stego-d3-s0-")
    for name in ("meta.json", "best.pt", "last.pt", "results.csv", "DONE", "code_corr.npz"):
        assert (run_dir / name).exists(), name
    meta = json.loads((run_dir / "meta.json").read_text())
    assert meta["status"] == "done" and meta["config"]["code_dim"] == 3 and meta["best"] == stego.best
    val = stego.history[stego.history.split == "val"]
    # PyTorch Lightning 1.x: 64 items / batch 8 = 8 batches per epoch < val_freq 30, so once per epoch at its last
    # batch (STEGO's fallback), and nothing extra at step 60 (max_steps)
    assert sorted(val.step.unique()) == [8, 16, 24, 32, 40, 48, 56]
    assert torch.load(run_dir / "last.pt", weights_only=False)["step"] == 60  # the final weights are kept anyway
    assert stego.best["cluster/mIoU"] == val[val.metric == "cluster/mIoU"].value.max()

    rows = pd.read_csv(run_dir / "results.csv")
    assert set(rows.stage) == {"train", "best"} and set(rows.probe) == {"cluster", "linear"}
    assert set(rows.metric) == {"mIoU", "Accuracy"} and (rows.method == "stego").all() and (~rows.crf).all()
    best = rows[(rows.stage == "best") & (rows.probe == "cluster") & (rows.metric == "mIoU")]
    assert best.value.item() == pytest.approx(stego.best["cluster/mIoU"]) and best.step.item() == stego.best["step"]

    corr = stego.code_corr
    assert set(corr) == {"intra", "inter", "neg"}
    assert all(v.ndim == 1 and v.size > 100 and np.all(np.abs(v) <= 1 + 1e-5) for v in corr.values())
    # a trained STEGO code: an image agrees with itself more than with random images
    assert corr["intra"].mean() > corr["neg"].mean()


def test_segmenter_from_run_reproduces_the_best_validation(stego_and_untrained, stores):
    stego, _, _ = stego_and_untrained
    run = Segmenter.from_run(stego.run_dir)
    assert run.info["step"] == stego.best["step"] and isinstance(run.code_map, STEGOHead)
    assert not run.code_map.training
    assert run.code_dim == 3
    again = evaluate_store(run, stores[1], batch_size=stego.config.val_batch_size, progress=False)
    for key in ("cluster/mIoU", "cluster/Accuracy", "linear/mIoU", "linear/Accuracy"):
        assert again[key] == pytest.approx(stego.best[key])
    code = run.code(stores[1].feats[:2])
    assert code.shape == (2, 3, 8, 8)
    last = Segmenter.from_run(stego.run_dir, which="last")
    for k, v in last.cluster_probe.state_dict().items():
        assert torch.equal(v, stego.segmenter.cluster_probe.state_dict()[k])


def test_finished_run_is_loaded_not_retrained(stego_and_untrained, stores):
    stego, _, root = stego_and_untrained
    calls = []
    again = train(_cfg(steps=60, val_freq=30), train_store=stores[0], val_store=stores[1], root=root,
                  progress=False, callback=lambda step, logs: calls.append(step))
    assert calls == [] and again.run_dir == stego.run_dir and again.best == stego.best
    for k, v in _weights(stego).items():
        assert torch.equal(v, _weights(again)[k]), k
    assert again.history.equals(stego.history)


def test_resume_after_interrupt_gives_identical_weights(tmp_path, stores):
    tr, va = stores
    cfg = _cfg(steps=30, val_freq=10)
    whole = train(cfg, train_store=tr, val_store=va, root=tmp_path / "a", progress=False)

    # (1) stop cleanly after 13 steps, then resume
    part = train(cfg, train_store=tr, val_store=va, root=tmp_path / "b", progress=False, max_steps_this_call=13)
    assert not part.completed and not (part.run_dir / "DONE").exists()
    seen = []
    rest = train(cfg, train_store=tr, val_store=va, root=tmp_path / "b", progress=False,
                 callback=lambda step, logs: seen.append(step))
    assert seen[0] == 14 and seen[-1] == 30 and rest.completed

    # (2) crash in the middle (exception from the callback): resume replays from the last checkpoint (step 20)
    def crash(step, logs):
        if step == 25:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, train_store=tr, val_store=va, root=tmp_path / "c", progress=False, callback=crash)
    crashed = train(cfg, train_store=tr, val_store=va, root=tmp_path / "c", progress=False)

    ref = _weights(whole)
    for other in (rest, crashed):
        got = _weights(other)
        assert ref.keys() == got.keys()
        for k in ref:
            assert torch.equal(ref[k], got[k]), k
        assert other.best == whole.best
        assert other.history.equals(whole.history)
        assert np.array_equal(other.code_corr["inter"], whole.code_corr["inter"])


def test_resume_false_starts_over(tmp_path, stores):
    cfg = _cfg(steps=10, val_freq=10)
    first = train(cfg, train_store=stores[0], val_store=stores[1], root=tmp_path, progress=False)
    calls = []
    second = train(cfg, train_store=stores[0], val_store=stores[1], root=tmp_path, progress=False, resume=False,
                   callback=lambda step, logs: calls.append(step))
    assert calls == list(range(1, 11))
    for k, v in _weights(first).items():
        assert torch.equal(v, _weights(second)[k])  # seeded: the same run again


def test_partner_is_drawn_from_ranks_one_to_n_neighbors(tmp_path, stores, monkeypatch):
    """The kNN partner of item i is nns[i, r] with r in 1..n_neighbors, drawn afresh at every access."""
    import stego_core.training as training

    tr, va = stores
    table = (np.arange(64)[:, None] + np.arange(30)[None, :]) % 64  # rank r of item i is item i + r (mod 64)
    tr.save_array("knn-corrected.npy", table.astype(np.int64))
    seen = []
    real_get = training._Features.get

    def spy(self, idx):
        seen.append(torch.as_tensor(idx).clone())
        return real_get(self, idx)

    monkeypatch.setattr(training._Features, "get", spy)
    try:
        train(_cfg(steps=16, val_freq=16, protocol="corrected", n_neighbors=3), train_store=tr, val_store=va,
              root=tmp_path, progress=False)
    finally:
        tr.remove_file("knn-corrected.npy")
        build_knn(tr, protocol="corrected", seed=0, progress=False)  # the real table again, for the other tests
    pairs = list(zip(seen[0:32:2], seen[1:32:2]))  # (batch, partners) per training step
    ranks = set()
    for items, partners in pairs:
        ranks.update(((partners - items) % 64).tolist())
    assert ranks <= {1, 2, 3} and len(ranks) == 3


# ---------------------------------------------------------------------------------------------------------------
# baselines and live features


@pytest.mark.parametrize("method", ["dino", "pca", "rp", pytest.param("hnne", marks=pytest.mark.slow)])
def test_baselines_train_probes_only(tmp_path, stores, method):
    cfg = _cfg(method=method, code_dim=3, steps=20, val_freq=20, correspondence_weight=1.0)
    res = train(cfg, train_store=stores[0], val_store=stores[1], root=tmp_path, progress=False)
    assert not isinstance(res.segmenter.code_map, STEGOHead) and res.code_corr is None
    assert res.config.correspondence_weight == 0.0
    assert res.config.code_dim == (32 if method == "dino" else 3)
    assert res.run_dir.name.startswith(f"synthetic-{method}-d{res.config.code_dim}-s0-")
    h = res.history
    assert "loss/pos_inter" not in set(h.metric)
    assert res.best["cluster/mIoU"] > 0 and math.isfinite(res.best["linear/mIoU"])
    loaded = Segmenter.from_run(res.run_dir)
    if method == "dino":  # the DINO baseline's code map is the identity, the same module everywhere
        assert isinstance(loaded.code_map, torch.nn.Identity) and isinstance(res.segmenter.code_map, torch.nn.Identity)
        assert torch.equal(loaded.code(stores[1].feats[:1]), stores[1].feats[:1])
    else:
        assert isinstance(loaded.code_map, ProjectionCode) and loaded.code(stores[1].feats[:2]).shape == (2, 3, 8, 8)


@pytest.mark.parametrize("method, expected", [("hnne", 150), ("pca", None), ("rp", None)])
def test_hnne_tokens_reach_the_fit(tmp_path, stores, monkeypatch, method, expected):
    """hnne_tokens sets h-NNE's token sample (the demo fits on fewer than the study's 1e6); PCA and RP fit on
    every token of the n_fit_images images."""
    from stego_core import projections, train_features

    seen = {}
    real_fit = projections.fit_projection

    def spy(method_, k, store, **kw):
        seen.update(kw)
        return real_fit("pca" if method_ == "hnne" else method_, k, store, **kw)  # hnne itself is slow

    monkeypatch.setattr(train_features, "fit_projection", spy)
    cfg = _cfg(method=method, code_dim=3, steps=2, val_freq=2, hnne_tokens=150, n_fit_images=5)
    train(cfg, train_store=stores[0], val_store=stores[1], root=tmp_path, progress=False)
    assert seen["n_tokens"] == expected and seen["n_images"] == 5


def test_hnne_tokens_is_checked():
    with pytest.raises(StegoError, match="hnne_tokens"):
        _cfg(hnne_tokens=1)


class _PoolNet(torch.nn.Module):
    """A stand-in backbone made of elementwise maps and 2x2 average pooling only (batch-independent, exact)."""

    name, dim, stride = "fakenet", 12, 2

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()), requires_grad=False)
        self.images_seen = 0

    def forward(self, img):
        self.images_seen += img.shape[0]
        maps = torch.cat([img, img ** 2, torch.sin(2 * img), torch.cos(3 * img)], dim=1) * self.scale  # [B,12,H,W]
        return torch.nn.functional.avg_pool2d(maps, 2)


def test_live_features_match_cached_features(tmp_path):
    """feature_source="live" runs the backbone on the stored images every step; with a store whose features
    are exactly that backbone's output, both sources train the same weights."""
    from stego_core.backbones import extract_features
    from stego_core.data import normalize

    net = _PoolNet()
    stores = []
    for split, n, seed in (("train", 24, 0), ("val", 8, 1)):
        _, label, _ = _synthetic(n, seed)
        g = torch.Generator().manual_seed(seed + 10)
        colour = torch.randint(0, 256, (4, 3), generator=g)  # one colour per class, plus noise
        img = (colour[label.clamp(min=0)] + torch.randint(0, 40, (n, 16, 16, 3), generator=g)).clamp(0, 255)
        image = img.to(torch.uint8).numpy()  # [n,16,16,3]
        feats = extract_features(net, normalize(torch.from_numpy(image).permute(0, 3, 1, 2).float() / 255.0))
        stores.append(FakeStore(tmp_path / split, feats, label, image, split=split))
    _with_knn(stores[0])
    cfg = _cfg(steps=12, val_freq=6, code_dim=4)
    cached = train(cfg, train_store=stores[0], val_store=stores[1], root=tmp_path, progress=False)
    net.images_seen = 0
    live = train(dataclasses.replace(cfg, feature_source="live"), train_store=stores[0], val_store=stores[1],
                 root=tmp_path, progress=False, backbone=net)
    assert live.run_dir != cached.run_dir
    for k, v in _weights(cached).items():
        assert torch.equal(v, _weights(live)[k]), k
    assert live.best == cached.best
    # 12 steps x 8 images x (batch + partner) + 4 validations x 8 images (24 items / batch 8 = 3 batches per
    # epoch < val_freq 6: once per epoch, after steps 3, 6, 9, 12)
    assert net.images_seen == 12 * 8 * 2 + 4 * 8


def test_validation_steps_follow_lightning_1x_under_original():
    from stego_core.training import validation_steps

    # 10 items / batch 4 = 3 batches per epoch (the last one short); val_freq 2: batch 2 of every epoch
    assert validation_steps(12, 2, 10, 4) == [2, 5, 8, 11]
    assert validation_steps(12, 2, 10, 4, "corrected") == [2, 4, 6, 8, 10, 12]
    # val_freq above the batches of an epoch (PL 1.x would refuse): once per epoch, at its last batch
    assert validation_steps(12, 5, 10, 4) == [3, 6, 9, 12]
    assert validation_steps(10, 5, 10, 4, "corrected") == [5, 10]
    # a run too short for any of those validates once, after its last step
    assert validation_steps(2, 5, 10, 4) == [2] and validation_steps(2, 5, 10, 4, "corrected") == [2]
    # Cityscapes: 2,975 x 5 crops / batch 32 = 465 batches per epoch; validations at 100..400 of each epoch,
    # 15 whole epochs in 7000 steps (the 16th has 25 steps): 60 validations, the last at 14 x 465 + 400 = 6910
    city = validation_steps(7000, 100, 14_875, 32)
    assert len(city) == 60 and city[:5] == [100, 200, 300, 400, 565] and city[-1] == 6910
    # COCO-Stuff: one epoch is 7,755 batches, longer than the run: every 100 steps, 7000 included
    assert validation_steps(7000, 100, 248_145, 32) == list(range(100, 7001, 100))
    with pytest.raises(StegoError, match="protocol"):
        validation_steps(10, 5, 10, 4, "pl2")


def test_a_run_without_a_validation_step_validates_after_its_last(tmp_path, stores):
    tr, va = stores  # 64 items / batch 8 = 8 batches per epoch; 5 steps: no epoch end, no val_freq multiple
    res = train(_cfg(steps=5, val_freq=30), train_store=tr, val_store=va, root=tmp_path, progress=False)
    assert sorted(res.history[res.history.split == "val"].step.unique()) == [5] and res.best["step"] == 5
    assert (res.run_dir / "best.pt").exists() and (res.run_dir / "DONE").exists()


# ---------------------------------------------------------------------------------------------------------------
# device and validation resolution


def test_device_cpu_trains_like_the_default_and_checkpoints_hold_cpu_tensors(tmp_path, stores):
    tr, va = stores
    cfg = _cfg(steps=10, val_freq=5)
    default = train(cfg, train_store=tr, val_store=va, root=tmp_path / "a", progress=False)
    on_cpu = train(cfg, train_store=tr, val_store=va, root=tmp_path / "b", progress=False,
                   device=torch.device("cpu"))
    assert on_cpu.run_dir.name == default.run_dir.name  # the device is not part of the run's key
    for k, v in _weights(default).items():
        assert torch.equal(v, _weights(on_cpu)[k]), k
    ck = torch.load(on_cpu.run_dir / "last.pt", weights_only=False)  # no map_location: tensors must be CPU ones
    assert all(t.device.type == "cpu" for t in ck["head"].values())
    assert ck["opt_head"]["state"] and all(t.device.type == "cpu" for s in ck["opt_head"]["state"].values()
                                           for t in s.values() if isinstance(t, torch.Tensor))
    run = Segmenter.from_run(on_cpu.run_dir, device="cpu")
    assert run.device.type == "cpu" and run.code(va.feats[:1]).device.type == "cpu"
    # a finished run asked for again on "cpu" is loaded, not retrained
    again = train(cfg, train_store=tr, val_store=va, root=tmp_path / "b", progress=False, device="cpu")
    assert again.best == on_cpu.best


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_unavailable_device_is_one_clear_line(tmp_path, stores):
    tr, va = stores
    for device in ("cuda", "cuda:1", "banana"):
        with pytest.raises(StegoError) as info:
            train(_cfg(steps=2, val_freq=2), train_store=tr, val_store=va, root=tmp_path, progress=False,
                  device=device)
        msg = str(info.value)
        assert msg.startswith("device:") and "\n" not in msg and device in msg, msg
    assert not (tmp_path / "runs").exists()  # refused before any work
    done = train(_cfg(steps=2, val_freq=2), train_store=tr, val_store=va, root=tmp_path, progress=False)
    with pytest.raises(StegoError, match=r"^device: 'cuda' is not available"):
        Segmenter.from_run(done.run_dir, device="cuda")
    with pytest.raises(StegoError, match="device is an argument of train"):
        make_config("demo", device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_training_resumes_and_loads_on_the_cpu(tmp_path, stores):
    tr, va = stores
    cfg = _cfg(steps=20, val_freq=10)
    whole = train(cfg, train_store=tr, val_store=va, root=tmp_path / "a", progress=False, device="cuda")
    assert next(whole.segmenter.code_map.parameters()).device.type == "cuda"
    train(cfg, train_store=tr, val_store=va, root=tmp_path / "b", progress=False, device="cuda",
          max_steps_this_call=7)
    rest = train(cfg, train_store=tr, val_store=va, root=tmp_path / "b", progress=False, device="cuda")
    for k, v in _weights(whole).items():
        assert torch.equal(v, _weights(rest)[k]), k
    run = Segmenter.from_run(whole.run_dir, which="last")  # a GPU run loads on a CPU
    assert run.device.type == "cpu" and next(run.code_map.parameters()).device.type == "cpu"
    for k, v in run.code_map.state_dict().items():
        assert torch.equal(v, whole.segmenter.code_map.state_dict()[k].cpu()), k
    cpu = train(cfg, train_store=tr, val_store=va, root=tmp_path / "c", progress=False)
    assert abs(cpu.best["cluster/mIoU"] - whole.best["cluster/mIoU"]) < 30  # same recipe, other RNG streams


def test_validation_store_at_another_resolution(tmp_path, stores):
    """The paper trains at 224 px and validates at 320 px: a val store with a larger token grid and larger labels
    (12x12 tokens, 24x24 labels against 8x8 / 16x16) validates with the code upsampled to its own label size."""
    tr, _ = stores
    big = FakeStore(tmp_path / "val-24", *_synthetic(16, 7, grid=12), split="val")
    assert big.meta["res"] == 24 and tr.meta["res"] == 16
    res = train(_cfg(steps=40, val_freq=20), train_store=tr, val_store=big, root=tmp_path, progress=False)
    assert res.completed and res.best["cluster/mIoU"] > 40 and res.best["linear/mIoU"] > 40
    run = Segmenter.from_run(res.run_dir)
    again = evaluate_store(run, big, batch_size=res.config.val_batch_size, progress=False)
    assert again["cluster/mIoU"] == pytest.approx(res.best["cluster/mIoU"])
    # the same weights score the same classes at the training resolution too (the code is resolution-free)
    small = evaluate_store(run, stores[1], batch_size=res.config.val_batch_size, progress=False)
    assert small["linear/mIoU"] > 40


def test_sweep_default_run_trains_on_the_caches_device(tmp_path, monkeypatch):
    """stego_core.sweep.train_run hands the feature caches' ``device`` (notebook 03's parameter) to train()."""
    import stego_core.sweep as sweep
    from stego_core.sweep import SweepGrid, run_sweep, train_run

    seen = []

    class Result:
        run_dir, best = tmp_path / "runs" / "x", {"step": 1}

    def fake_train(cfg, *, train_store, val_store, root, progress, device="cpu", logger="none"):
        seen.append(device)
        return Result()

    monkeypatch.setattr(sweep, "cache_features", lambda *a, **kw: seen.append(("cache", kw.get("device"))))
    monkeypatch.setattr(sweep, "train", fake_train)
    grid = SweepGrid(presets=["demo"], methods=["pca"], dims=[3], seeds=[0], train_cache={"device": "cuda:1"},
                     val_cache={"device": "cuda:1", "res": 320})
    run_sweep(grid, root=tmp_path, run_fn=train_run, progress=False)
    assert seen == [("cache", "cuda:1"), ("cache", "cuda:1"), "cuda:1"]


def test_training_requires_the_knn_table_and_names_the_feature_stage(tmp_path):
    """The feature stage builds kNN tables; training only reads them (it used to build a missing one itself)."""
    tr = FakeStore(tmp_path / "train", *_synthetic(16, 3), split="train")
    va = FakeStore(tmp_path / "val", *_synthetic(8, 4), split="val")
    with pytest.raises(StegoError) as info:
        train(_cfg(steps=2, val_freq=2), train_store=tr, val_store=va, root=tmp_path, progress=False)
    msg = str(info.value)
    assert msg.startswith("knn:") and "\n" not in msg, msg
    assert "stego-study run 01_features" in msg and "-p dataset synthetic" in msg and "-p protocol original" in msg
    assert not tr.has_file("knn-original.npy")  # nothing was built behind the user's back
    # the baselines need no kNN table
    assert train(_cfg(method="pca", steps=2, val_freq=2), train_store=tr, val_store=va, root=tmp_path,
                 progress=False).completed


# ---------------------------------------------------------------------------------------------------------------
# the protocols' wiring, checked against independent computations


@pytest.mark.parametrize("protocol, drops_per_step", [("original", 6), ("corrected", 4)])
def test_loss_features_get_the_third_dropout_only_under_original(tmp_path, stores, monkeypatch, protocol,
                                                                  drops_per_step):
    """Quirk 2 (spec §1.3): per training step the reference draws channel dropout three times for the batch (linear
    branch, nonlinear branch, the loss features F) and three times for the kNN partners; "corrected" keeps the two
    branch draws and hands the loss the clean features."""
    calls = []
    real = torch.nn.Dropout2d.forward

    def spy(module, x):
        if module.training:
            calls.append(tuple(x.shape))
        return real(module, x)

    monkeypatch.setattr(torch.nn.Dropout2d, "forward", spy)
    steps = 3
    train(_cfg(steps=steps, val_freq=steps, protocol=protocol), train_store=stores[0], val_store=stores[1],
          root=tmp_path, progress=False)
    assert len(calls) == drops_per_step * steps
    assert all(shape == (8, 32, 8, 8) for shape in calls)  # all on [batch, C, h, w] features


def _independent_projection(tokens: np.ndarray, method: str, k: int) -> np.ndarray:
    """The first k axes [k, C]: numpy's SVD of the standardised tokens (PCA, up to sign) or scikit-learn's seeded
    Gaussian random matrix (it depends only on C and the seed)."""
    z = (tokens - tokens.mean(0)) / tokens.std(0)
    if method == "pca":
        return np.linalg.svd(z, full_matrices=False)[2][:k]
    from sklearn.random_projection import GaussianRandomProjection

    return GaussianRandomProjection(k, random_state=0).fit(np.zeros((2, tokens.shape[1]))).components_


@pytest.mark.parametrize("protocol", ["original", "corrected"])
@pytest.mark.parametrize("method", ["pca", "rp"])
def test_baseline_code_is_the_standardised_projection(tmp_path, stores, method, protocol):
    """The PCA / RP baselines' code of a validation batch: tokens standardised with the batch's own statistics
    ("original", quirk 15) or the training tokens' ("corrected"), times the first k axes — computed here with
    numpy's SVD / a seeded Gaussian matrix on every training token (n_fit_images covers the whole store)."""
    tr, va = stores
    cfg = _cfg(method=method, code_dim=3, steps=2, val_freq=2, n_fit_images=len(tr), protocol=protocol)
    res = train(cfg, train_store=tr, val_store=va, root=tmp_path, progress=False)
    train_tokens = tr.feats.permute(0, 2, 3, 1).reshape(-1, 32).double().numpy()  # [n,C,h,w] -> [n*h*w, C]
    axes = _independent_projection(train_tokens, method, 3)  # [k, C]
    batch = va.feats[:8]
    tokens = batch.permute(0, 2, 3, 1).reshape(-1, 32).double().numpy()
    stats = tokens if protocol == "original" else train_tokens
    expected = ((tokens - stats.mean(0)) / stats.std(0)) @ axes.T  # [N, k]
    code = Segmenter.from_run(res.run_dir).code(batch)  # [8,k,h,w]
    got = code.permute(0, 2, 3, 1).reshape(-1, 3).double().numpy()
    if method == "pca":  # principal axes are defined up to sign
        expected = expected * np.sign((expected * got).sum(0))
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-3)
    # training validated the very same code: its best metrics are the loaded segmenter's on the validation store
    again = evaluate_store(Segmenter.from_run(res.run_dir), va, batch_size=8, progress=False)
    for key in ("cluster/mIoU", "linear/mIoU", "cluster/Accuracy", "linear/Accuracy"):
        assert res.best[key] == pytest.approx(again[key], abs=1e-6)
