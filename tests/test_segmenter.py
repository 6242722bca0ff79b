"""The Segmenter, the one prediction path: identical predictions from the explorer, the evaluation and ``segment``
for the same run and image; every module and input on the chosen device (checked on the "meta" device, no GPU
needed) for chapter-04-style evaluation, ``segment --run`` and ``segment --checkpoint``; released checkpoints
checked against the evaluation they are loaded for."""
from __future__ import annotations

import contextlib
import itertools
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from stego_core import cache, data, evaluation, explorer, knn, runs, training
from stego_core.backbones import extract_features, load_backbone
from stego_core.config import StegoError
from stego_core.probes import ClusterProbe
from stego_core.segment import segment_images
from stego_core.segmenter import Segmenter

OPTS = {"n_images": 8, "scene_size": 96}
META = torch.device("meta")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Mosaic stores at 64 px with the bundled EfficientNet-Lite0 weights (so that ``segment`` rebuilds the very
    same backbone), the feature stage's kNN table, and a 4-step STEGO run and DINO baseline run."""
    root = tmp_path_factory.mktemp("segmenter-art")
    kw = dict(res=64, dataset_options=OPTS, root=root, progress=False, batch_size=8)
    train = cache.cache_features("mosaic", "train", "efficientnet_lite0", **kw)
    val = cache.cache_features("mosaic", "val", "efficientnet_lite0", **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # k=30 neighbours of 8 images
        knn.build_knn(train, protocol="original", progress=False)
    for method, dim in (("stego", 6), ("dino", None)):
        cfg = runs.run_config("demo", train_store=train, method=method, code_dim=dim, steps=4, batch_size=4,
                              val_freq=2)
        training.train(cfg, train_store=train, val_store=val, root=root, progress=False)
    return dict(root=root, train=train, val=val)


class _LiveStore:
    """A one-item store whose features are computed now, in float32, from the image (as the live explorer does)."""

    def __init__(self, backbone, image, label, class_names, palette):
        self.image, self.label = image[None], label[None]
        self.feats = extract_features(backbone, data.normalize_uint8(self.image))
        self.class_names, self.palette, self.n_classes = class_names, palette, len(class_names)

    def __len__(self):
        return 1

    def read(self, idx):
        return {"feats": self.feats, "label": self.label, "image": self.image, "index": torch.as_tensor(idx)}


@pytest.mark.parametrize("crf", [False, True])
def test_explorer_evaluation_and_segment_predict_the_same(trained, tmp_path, crf):
    val = trained["val"]
    run_dir = runs.find_runs(trained["root"], method="stego")["run_dir"][0]
    seg = Segmenter.from_run(run_dir)
    backbone = load_backbone("efficientnet_lite0")  # the bundled weights the run's features were computed with
    rec = val.read(np.array([5]))
    image, label = np.asarray(rec["image"][0], dtype=np.uint8), torch.as_tensor(rec["label"][0])
    names = list(val.class_names)

    # the paper's evaluation (chapter 04), one image, no flip
    batch = {"img": data.normalize_uint8(image[None]), "label": label[None], "index": torch.tensor([5])}
    ev = evaluation.evaluate(seg.with_backbone(backbone), iter([batch]), flip=False, crf=crf, workers=1,
                             class_names=names, keep_predictions=1, progress=False)["predictions"]
    # the explorer (chapter 05) on the same image's features
    store = _LiveStore(backbone, image, label, names, val.palette)
    ex = explorer.precompute({("stego", 6): seg}, store, [0], crf=(crf,), workers=1, batch_size=1, progress=False)
    # segment (stego-study segment --run) on the image written as a file
    path = tmp_path / "scene.png"
    Image.fromarray(image).save(path)
    out = {probe: np.asarray(Image.open(segment_images([path], run=run_dir, out_dir=tmp_path / probe, res=64,
                                                       probe=probe, crf=crf, flip=False, progress=False)[0]
                                        .label_path)).astype(np.int64) for probe in ("cluster", "linear")}

    np.testing.assert_array_equal(ev["linear"][0], ex.predictions[(0, "stego", 6, crf, "linear")])
    np.testing.assert_array_equal(ev["linear"][0], out["linear"])
    np.testing.assert_array_equal(ev["cluster"][0], ex.predictions[(0, "stego", 6, crf, "cluster")])  # matched
    np.testing.assert_array_equal(ev["cluster_raw"][0], out["cluster"])  # segment has no labels: raw cluster ids
    assert len(np.unique(out["cluster"])) > 1  # a real segmentation, not a constant map


# ---------------------------------------------------------------------------------------------------------------
# devices
class _DeviceLog:
    """Records, for every module call (and every ``ClusterProbe.cosine``, the cluster probe's scoring), the devices
    of the module's own tensors and of its tensor inputs."""

    def __enter__(self):
        self.calls = []
        self._handle = torch.nn.modules.module.register_module_forward_pre_hook(self._hook)
        self._cosine = ClusterProbe.cosine

        def cosine(probe, code):
            self._hook(probe, (code,))
            return self._cosine(probe, code)

        ClusterProbe.cosine = cosine
        return self

    def _hook(self, module, args):
        own = {t.device for t in itertools.chain(module.parameters(recurse=False), module.buffers(recurse=False))}
        inputs = {a.device for a in args if isinstance(a, torch.Tensor)}
        self.calls.append((type(module).__name__, own, inputs))

    def __exit__(self, *exc):
        self._handle.remove()
        ClusterProbe.cosine = self._cosine

    def check(self, device, expect=("STEGOHead", "ClusterProbe", "LinearProbe")):
        """Every module called with tensors on ``device`` and living there; the modules in ``expect`` were called."""
        wrong = [(name, own, inputs) for name, own, inputs in self.calls if (own | inputs) - {device}]
        assert not wrong, f"modules or inputs off {device}: {wrong[:5]}"
        called = {name for name, _, _ in self.calls}
        assert set(expect) <= called, called


def _on(seg, device):
    return {t.device for t in itertools.chain(seg.parameters(), seg.buffers())} == {device}


def _until_host(fn):
    """Run ``fn`` on the meta device: it must get as far as copying a result to the host (which meta can't)."""
    with pytest.raises((NotImplementedError, TypeError), match="meta"):
        fn()


def test_chapter04_evaluation_places_everything_on_the_device(trained):
    """Chapter 04's path (runs of chapters 02/03 with the live backbone, the paper's evaluation) on "meta": the run's
    head and probes follow the backbone's device (they used to stay on the CPU, 12§4.1)."""
    train, val = trained["train"], trained["val"]
    backbone = load_backbone("efficientnet_lite0", device=META)
    models = runs.require_runs("demo", [("stego", 6), ("dino", None)], train_store=train, val_store=val,
                               root=trained["root"], device=META, backbone=backbone, steps=4, batch_size=4,
                               val_freq=2, progress=False)
    ds = data.load_dataset("mosaic", "val", res=64, **OPTS)
    for (method, _), seg in models.items():
        assert _on(seg, META), method
        with _DeviceLog() as log:
            _until_host(lambda s=seg: evaluation.evaluate(s, ds, crf=False, progress=False))
        log.check(META, ("EfficientNetBackbone", "ClusterProbe") + (("STEGOHead",) if method == "stego" else ()))


def test_segment_with_a_run_places_everything_on_the_device(trained, tmp_path, monkeypatch):
    """``segment --run ... --device D``: backbone, head and probes on D, the features never moved back (12§4.1)."""
    run_dir = runs.find_runs(trained["root"], method="stego")["run_dir"][0]
    path = tmp_path / "x.png"
    Image.fromarray(np.full((40, 56, 3), 90, np.uint8)).save(path)
    placed = []
    real = Segmenter.to

    def spy(self, *args, **kw):
        out = real(self, *args, **kw)
        placed.append(out)
        return out

    monkeypatch.setattr(Segmenter, "to", spy)
    with _DeviceLog() as log:
        _until_host(lambda: segment_images([path], run=run_dir, out_dir=tmp_path / "o", res=32, device="meta",
                                           progress=False))
    log.check(META, ("EfficientNetBackbone", "STEGOHead", "ClusterProbe"))
    assert placed and _on(placed[-1], META) and placed[-1].backbone is not None


def _released_checkpoint(path, *, dataset="cocostuff27", n_classes=27, code_dim=5, seed=0):
    """A checkpoint in the released layout (net.model.* = a whole random ViT-S/8, head, probes, plain config)."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(seed)
    vit = timm.create_model("vit_small_patch8_224.dino", pretrained=False)
    width = 384
    g = torch.Generator().manual_seed(seed)
    sd = {f"net.model.{k}": v for k, v in vit.state_dict().items() if not k.startswith("head.")}
    sd.update({"net.cluster1.0.weight": torch.randn(code_dim, width, 1, 1, generator=g) * 0.05,
               "net.cluster1.0.bias": torch.zeros(code_dim),
               "net.cluster2.0.weight": torch.randn(width, width, 1, 1, generator=g) * 0.05,
               "net.cluster2.0.bias": torch.zeros(width),
               "net.cluster2.2.weight": torch.randn(code_dim, width, 1, 1, generator=g) * 0.05,
               "net.cluster2.2.bias": torch.zeros(code_dim),
               "cluster_probe.clusters": torch.randn(n_classes, code_dim, generator=g),
               "linear_probe.weight": torch.randn(n_classes, code_dim, 1, 1, generator=g),
               "linear_probe.bias": torch.zeros(n_classes)})
    cfg = {"dataset_name": dataset, "model_type": "vit_small", "dino_patch_size": 8, "dim": code_dim,
           "extra_clusters": 0}
    torch.save({"state_dict": sd, "hyper_parameters": {"n_classes": n_classes, "cfg": cfg}}, path)
    return path


def test_segment_with_a_checkpoint_places_everything_on_the_device(tmp_path, monkeypatch):
    real_autocast = torch.autocast  # the ViT turns autocast off around its attention; meta has no autocast state
    monkeypatch.setattr(torch, "autocast", lambda device_type, **kw: contextlib.nullcontext()
                        if device_type == "meta" else real_autocast(device_type, **kw))
    ckpt = _released_checkpoint(tmp_path / "cocostuff27_test.ckpt")
    path = tmp_path / "x.png"
    Image.fromarray(np.full((24, 40, 3), 90, np.uint8)).save(path)
    with _DeviceLog() as log:
        _until_host(lambda: segment_images([path], checkpoint=ckpt, out_dir=tmp_path / "o", res=16, device="meta",
                                           probe="linear", progress=False))
    log.check(META, ("DinoViTBackbone", "STEGOHead", "LinearProbe"))
    seg = Segmenter.from_checkpoint(ckpt, device="meta")
    assert _on(seg, META) and seg.backbone is not None and seg.device == META


def test_checkpoints_are_checked_against_the_evaluation_before_any_work(tmp_path, monkeypatch):
    """A Cityscapes checkpoint evaluated as CocoStuff, or a 27-class one on Potsdam, stops at once (12§4.5)."""
    ckpt = _released_checkpoint(tmp_path / "cityscapes_test.ckpt", dataset="cityscapes")
    built = []
    monkeypatch.setattr("stego_core.checkpoints.LoadedCheckpoint.build_backbone",
                        lambda self, **kw: built.append(kw))
    cases = [(dict(expected_dataset="cocostuff27"), "dataset 'cityscapes'"),
             (dict(expected_classes=6), "classes 27"),
             (dict(expected_backbone="dino_vitb8"), "backbone 'dino_vits8'"),
             (dict(expected_code_dim=90), "code dim 5")]
    for expected, words in cases:
        with pytest.raises(StegoError) as info:
            Segmenter.from_checkpoint(ckpt, **expected)
        msg = str(info.value)
        assert msg.startswith("checkpoint: cityscapes_test.ckpt") and words in msg and "\n" not in msg, msg
    assert built == []  # refused before the backbone is built
    ok = Segmenter.from_checkpoint(ckpt, expected_dataset="cityscapes", expected_classes=27,
                                   expected_backbone="dino_vits8", expected_code_dim=5, with_backbone=False)
    assert ok.n_classes == 27 and ok.info["class_names"][0] == "road" and ok.method == "stego"


def test_the_dino_baseline_is_the_identity_everywhere(trained, tmp_path):
    """A run of the DINO baseline, a trained one in memory and a headless checkpoint all carry nn.Identity."""
    dino = runs.find_runs(trained["root"], method="dino")["run_dir"][0]
    assert isinstance(Segmenter.from_run(dino).code_map, torch.nn.Identity)
    cfg = runs.run_config("demo", train_store=trained["train"], method="dino", steps=4, batch_size=4, val_freq=2)
    done = training.train(cfg, train_store=trained["train"], val_store=trained["val"], root=trained["root"],
                          progress=False)
    assert isinstance(done.segmenter.code_map, torch.nn.Identity) and done.segmenter.method == "dino"
