"""End to end on real photographs: a `directory` dataset of scikit-image's photos (JPEG) with labels derived by
Otsu thresholding (dark / bright) runs through caching (EfficientNet-Lite0 with its real ImageNet weights),
STEGO training, the paper's evaluation and segment_images; the same without labels; and the paper profiles."""
from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from stego_core import cache, data, evaluation, knn, study, training
from stego_core.config import StegoError
from stego_core.segment import segment_images
from stego_core.segmenter import Segmenter

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field")
CLASSES = ["dark", "bright"]
RES = 64


def _write_photos(root: Path, *, labels: bool) -> None:
    """imgs/train: every photo and its mirror image (12); imgs/val: three photos, downscaled to <= 160 px."""
    import skimage.data
    from skimage.filters import threshold_otsu

    for split, items in (("train", [(n, f) for n in PHOTOS for f in (0, 1)]), ("val", [(n, 0) for n in PHOTOS[:3]])):
        (root / "imgs" / split).mkdir(parents=True)
        if labels:
            (root / "labels" / split).mkdir(parents=True)
        for name, flipped in items:
            im = Image.fromarray(getattr(skimage.data, name)())
            im.thumbnail((160, 160))
            rgb = np.asarray(im)[:, ::-1] if flipped else np.asarray(im)
            Image.fromarray(np.ascontiguousarray(rgb)).save(root / "imgs" / split / f"{name}_{flipped}.jpg",
                                                           quality=90)
            if labels:
                grey = rgb.mean(-1)
                Image.fromarray((grey > threshold_otsu(grey)).astype(np.uint8)).save(
                    root / "labels" / split / f"{name}_{flipped}.png")


def _stores(data_root: Path, art: Path, options: dict):
    """The feature stage (01_features): both stores and the training store's kNN table."""
    stores = [cache.cache_features("directory", split, "efficientnet_lite0", res=RES, dataset_options=options,
                                   data_root=data_root, root=art, chunk_size=8, progress=False)
              for split in ("train", "val")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # k=30 neighbours asked of 12 images: the kNN table uses 12
        knn.build_knn(stores[0], protocol="original", progress=False)
    return stores


def _config():
    return training.make_config("demo", dataset="directory", code_dim=8, steps=12, batch_size=4, val_freq=6,
                                n_neighbors=3)


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    base = tmp_path_factory.mktemp("photos")
    _write_photos(base / "data", labels=True)
    train_store, val_store = _stores(base / "data", base / "artifacts",
                                     {"n_classes": 2, "class_names": CLASSES})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # k=30 neighbours asked of 12 images: the kNN table uses 12
        result = training.train(_config(), train_store=train_store, val_store=val_store, root=base / "artifacts",
                                progress=False)
    return base, train_store, val_store, result


def test_real_photos_cache_train_evaluate_segment(labelled):
    base, train_store, val_store, result = labelled
    # caching: real ImageNet features of the photos, stride 16 -> 4x4 tokens at 64 px
    assert len(train_store) == 12 and len(val_store) == 3
    assert train_store.meta["class_names"] == CLASSES and tuple(train_store.meta["grid"]) == (4, 4)
    feats = train_store.read([0, 1])["feats"]
    assert torch.isfinite(feats).all() and feats.abs().sum() > 0
    labels = train_store.read(range(12))["label"]
    assert set(torch.unique(labels).tolist()) == {0, 1}  # both Otsu classes occur
    # training: finished, with validation metrics and a results table
    assert result.completed and (result.run_dir / "DONE").exists() and (result.run_dir / "results.csv").exists()
    assert result.best["step"] in result.history["step"].tolist()
    # the paper's evaluation on the cached validation features with the trained modules
    run = Segmenter.from_run(result.run_dir)
    metrics = evaluation.evaluate_batches(run, val_store.iter_batches(2), class_names=CLASSES, progress=False)
    assert metrics["n_images"] == 3
    # the linear probe's numbers written out: upsampled code, argmax, confusion, IoU and accuracy by hand
    rec = val_store.read(range(3))
    with torch.no_grad():
        code = run.code(rec["feats"])  # [3,D,h,w]
        up = torch.nn.functional.interpolate(code, size=rec["label"].shape[-2:], mode="bilinear", align_corners=False)
        pred = run.linear_probe(up).argmax(1).numpy()
    label = np.asarray(rec["label"])
    keep = (label >= 0) & (label < 2)
    conf = np.zeros((2, 2), dtype=np.int64)
    np.add.at(conf, (pred[keep], label[keep]), 1)
    np.testing.assert_array_equal(metrics["linear"]["confusion"], conf)
    tp = np.diag(conf).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = tp / (conf.sum(0) + conf.sum(1) - tp)
    assert metrics["linear/mIoU"] == pytest.approx(100 * np.nanmean(iou))
    assert metrics["linear/Accuracy"] == pytest.approx(100 * tp.sum() / conf.sum())
    for key in ("cluster/mIoU", "cluster/Accuracy", "linear/mIoU", "linear/Accuracy"):
        assert math.isfinite(metrics[key]), key
        assert result.best[key] == pytest.approx(metrics[key], abs=1e-6), key  # training validated the same
    # the stored validation of the best checkpoint is the same computation (no flip, no CRF)
    assert metrics["cluster/mIoU"] == pytest.approx(run.info["metrics"]["cluster/mIoU"], abs=1e-6)
    # segmenting the original (full-size) validation photos with the trained run
    val_dir = base / "data" / "imgs" / "val"
    out = segment_images([val_dir], run=result.run_dir, out_dir=base / "segmented", probe="linear", progress=False)
    assert len(out) == 3
    for r in out:
        with Image.open(r.source) as src:
            assert Image.open(r.label_path).size == src.size
        assert set(r.counts) <= {0, 1}


@pytest.fixture(scope="module")
def unlabelled(tmp_path_factory):
    base = tmp_path_factory.mktemp("unlabelled")
    _write_photos(base / "data", labels=False)
    train_store, val_store = _stores(base / "data", base / "artifacts", {"n_classes": 2})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = training.train(_config(), train_store=train_store, val_store=val_store, root=base / "artifacts",
                                progress=False)
    return base, val_store, result


def test_without_labels_training_and_segmentation_still_work(unlabelled):
    base, val_store, result = unlabelled
    ds = data.load_dataset("directory", "val", res=RES, root=base / "data", n_classes=2)
    assert ds.has_labels is False and (ds[0]["label"] == -1).all()
    assert (val_store.read([0])["label"] == -1).all()
    assert result.completed  # the correspondence loss and the cluster probe need no labels
    out = segment_images([base / "data" / "imgs" / "val"], run=result.run_dir, out_dir=base / "seg", res=64,
                         progress=False)
    assert len(out) == 3 and all(r.label_path.exists() for r in out)


def test_without_labels_evaluation_says_so(unlabelled):
    _, val_store, result = unlabelled
    run = Segmenter.from_run(result.run_dir)
    raised = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            evaluation.evaluate_batches(run, val_store.iter_batches(2), progress=False)
        except StegoError as exc:
            raised = exc
    said = [str(raised)] if raised is not None else [str(w.message) for w in caught]
    assert any("label" in text.lower() for text in said), said
    assert raised is not None and str(raised).startswith("label: no labelled pixels") and "\n" not in str(raised)
    assert "segment_images" in str(raised)  # names what to do instead


def test_validation_store_at_a_larger_resolution(labelled):
    """The paper's split of resolutions: train features at one size, validation at a larger one (224 / 320 px
    there, 64 / 96 px here); training validates at the val store's label size and the evaluation agrees."""
    base, train_store, _, _ = labelled
    val_big = cache.cache_features("directory", "val", "efficientnet_lite0", res=96, crop="center",
                                   dataset_options={"n_classes": 2, "class_names": CLASSES}, data_root=base / "data",
                                   root=base / "artifacts", chunk_size=8, progress=False)
    assert tuple(val_big.meta["grid"]) == (6, 6) and val_big.read([0])["label"].shape[-2:] == (96, 96)
    result = training.train(_config(), train_store=train_store, val_store=val_big, root=base / "artifacts",
                            progress=False, device="cpu")
    assert result.completed and math.isfinite(result.best["cluster/mIoU"])
    run = Segmenter.from_run(result.run_dir, device="cpu")
    metrics = evaluation.evaluate_batches(run, val_big.iter_batches(2), progress=False)
    assert metrics["cluster/mIoU"] == pytest.approx(run.info["metrics"]["cluster/mIoU"], abs=1e-6)
    assert metrics["cluster"]["confusion"].sum() == int((val_big.read(range(3))["label"] >= 0).sum())


# ---------------------------------------------------------------------------------------------------------------
# the paper profiles
PAPER = {  # stego-spec §9.1
    "cocostuff27": dict(backbone="dino_vitb8", code_dim=90, crop="five", steps=7000, batch_size=32),
    "cityscapes": dict(backbone="dino_vitb8", code_dim=100, crop="five", steps=7000, batch_size=32),
    "potsdam": dict(backbone="dino_vits8", code_dim=70, crop="center", steps=5000, batch_size=16),
}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_profiles(name):
    runs = study.load_profile(name)  # every parameter exists in its notebook with the right type
    demo = [nb for nb, _ in study.load_profile("demo")]
    assert [nb for nb, _ in runs] == demo, "the paper profiles list the demo profile's notebooks"
    values = dict(runs)
    paper = PAPER[name]
    shared = yaml.safe_load(study.profile_path(name).read_text())["parameters"]
    assert shared["dataset"] == name and shared["backbone"] == paper["backbone"] and shared["preset"] == name
    assert "weights" in shared and shared["device"] == "cuda"
    features = values["01_features"]
    assert features["backbone"] == paper["backbone"] and features["crop"] == paper["crop"] and features["res"] == 224
    preset = training.make_config(shared["preset"])
    assert (preset.dataset, preset.backbone, preset.code_dim, preset.steps, preset.batch_size) == \
        (name, paper["backbone"], paper["code_dim"], paper["steps"], paper["batch_size"])
    for nb, params in runs:  # notebooks that take a preset get the paper's one
        names = {p.name for p in study.read_parameters(nb)}
        if "preset" in names:
            assert params.get("preset") == name, nb
        # train at 224 px (five-crop or whole tiles), validate on the uncropped val split at 320 px (§1.4, §6.4, §8.2)
        if "val_res" in names:
            assert params.get("val_res") == 320 and params.get("val_crop") == "center", nb
            assert params.get("res") == 224 and params.get("crop") == paper["crop"], nb
        if "device" in names:
            assert params.get("device") == "cuda", nb
    for nb in ("01_features", "03_dimension_study", "05_explorer", "07_quirks"):
        assert values[nb]["val_res"] == 320 and values[nb]["val_crop"] == "center", nb
    # the evaluation chapter finds the runs trained on 01's training cache
    assert (values["04_evaluate"]["cache_res"], values["04_evaluate"]["cache_crop"]) == (224, paper["crop"])
