"""stego_core.runs: downstream stages require runs (they never train unless told), find them on their own stores and
protocol, and name the command that makes a missing one; the profiles only ask downstream chapters for runs that
their training chapters make."""
from __future__ import annotations

import shlex
import warnings

import pytest
import yaml
from datatrees import make_directory

from stego_core import cache, knn, runs, study, training
from stego_core.config import StegoError

OPTS = {"n_images": 8, "scene_size": 96}
SHORT = dict(steps=2, batch_size=4, val_freq=2)  # a run in about a second


def _feature_stage(dataset, root, **kw):
    """What 01_features makes: both stores (random-weight EfficientNet) and the training store's kNN tables."""
    stores = [cache.cache_features(dataset, split, "efficientnet_lite0", res=64, weights="random", root=root,
                                   progress=False, batch_size=8, **kw) for split in ("train", "val")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # k=30 neighbours of a few images
        for protocol in ("original", "corrected"):
            knn.build_knn(stores[0], protocol=protocol, progress=False)
    return stores


@pytest.fixture(scope="module")
def mosaic(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs-art")
    train, val = _feature_stage("mosaic", root, dataset_options=OPTS)
    return dict(root=root, train=train, val=val)


def _trained(stores, method="stego", dim=None, protocol="original", **kw):
    cfg = runs.run_config("demo", train_store=stores["train"], method=method, code_dim=dim, protocol=protocol,
                          **SHORT, **kw)
    return training.train(cfg, train_store=stores["train"], val_store=stores["val"], root=stores["root"],
                          progress=False)


def _no_training(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a downstream stage started a training")

    monkeypatch.setattr(runs, "train", refuse)


def test_missing_runs_stop_with_the_command_that_makes_them(mosaic, monkeypatch):
    """12§4.2 / §4.3: a chapter that needs runs nobody trained (h-NNE where the sweep has none; the DINO baseline
    beside a released checkpoint) stops at once and says how to make them, instead of training them quietly."""
    _no_training(monkeypatch)
    with pytest.raises(StegoError) as info:
        runs.require_runs("demo", [("hnne", 24), ("pca", 6), ("dino", None)], train_store=mosaic["train"],
                          val_store=mosaic["val"], root=mosaic["root"], seed=3, **SHORT)
    msg = str(info.value)
    assert msg.startswith("runs: no finished run of hnne d=24, pca d=6, dino (C)") and "\n" not in msg, msg
    assert "train_missing: true" in msg
    command = shlex.split(msg.split(" with ", 1)[1].split(" (or set", 1)[0])
    assert command[:3] == ["stego-study", "run", "03_dimension_study"] and "--workdir" in command
    params = {command[i + 1]: command[i + 2] for i in range(len(command)) if command[i] == "-p"}
    assert yaml.safe_load(params["methods"]) == ["dino", "hnne", "pca"]
    assert yaml.safe_load(params["dims"]) == [6, 24] and yaml.safe_load(params["seeds"]) == [3]
    assert params["dataset"] == "mosaic" and params["res"] == "64" and params["weights"] == "random"
    assert yaml.safe_load(params["overrides"]) == SHORT and params["protocol"] == "original"
    assert yaml.safe_load(params["dataset_options"]) == OPTS
    # every name is a parameter of that notebook, every value of its type: the command runs as given
    study.check_parameters("03_dimension_study", {k: study.parse_value(v) for k, v in params.items()})
    assert runs.find_runs(mosaic["root"], seed=3).empty  # nothing was trained


def test_train_missing_is_the_explicit_way_to_train(mosaic):
    got = runs.require_runs("demo", [("pca", 3)], train_store=mosaic["train"], val_store=mosaic["val"],
                            root=mosaic["root"], seed=4, train_missing=True, progress=False, **SHORT)
    seg = got[("pca", 3)]
    assert seg.method == "pca" and seg.info["seed"] == 4 and seg.code_dim == 3
    assert len(runs.find_runs(mosaic["root"], method="pca", seed=4)) == 1


def test_protocol_picks_the_run(mosaic, monkeypatch):
    """12§4.4: with protocol "corrected" the corrected run is used, never the original one."""
    original = _trained(mosaic, protocol="original", seed=5)
    args = dict(train_store=mosaic["train"], val_store=mosaic["val"], root=mosaic["root"], seed=5, **SHORT)
    assert runs.require_run("demo", protocol="original", **args).info["run_dir"] == str(original.run_dir)
    _no_training(monkeypatch)
    with pytest.raises(StegoError, match="protocol 'corrected'"):
        runs.require_run("demo", protocol="corrected", **args)
    monkeypatch.undo()
    corrected = _trained(mosaic, protocol="corrected", seed=5)
    seg = runs.require_run("demo", protocol="corrected", **args)
    assert seg.info["run_dir"] == str(corrected.run_dir) and seg.info["protocol"] == "corrected"


def test_runs_are_looked_up_on_the_chapters_dataset(tmp_path):
    """12§4.8: runs of a ``directory`` dataset trained with the demo preset are found by the downstream chapters
    (the preset's dataset is "mosaic"), and overrides that name the dataset no longer raise a TypeError."""
    make_directory(tmp_path / "data", n_classes=3, n_train=10, n_val=2, size=(48, 64))
    train, val = _feature_stage("directory", tmp_path / "art", dataset_options={"n_classes": 3},
                                data_root=tmp_path / "data")
    stores = dict(train=train, val=val, root=tmp_path / "art")
    cfg = runs.run_config("demo", train_store=train, code_dim=4, **SHORT)
    assert (cfg.dataset, cfg.backbone) == ("directory", "efficientnet_lite0")
    done = _trained(stores, dim=4)
    args = dict(train_store=train, val_store=val, root=stores["root"], code_dim=4, **SHORT)
    assert runs.require_run("demo", **args).info["run_dir"] == str(done.run_dir)
    assert runs.require_run("demo", dataset="directory", **args).info["run_dir"] == str(done.run_dir)
    with pytest.raises(StegoError, match="^overrides: dataset 'mosaic' differs from the training store's"):
        runs.require_run("demo", dataset="mosaic", **args)


def test_method_dims():
    assert runs.method_dims(["stego", "pca", "rp", "hnne", "dino"], [6, 96, 200], 112) == [
        ("stego", 6), ("stego", 96), ("stego", 200), ("pca", 6), ("pca", 96), ("rp", 6), ("rp", 96), ("rp", 200),
        ("hnne", 6), ("hnne", 96), ("dino", 112)]


# ---------------------------------------------------------------------------------------------------------------
# the profiles
TRAINERS = ("02_train_stego", "03_dimension_study")


@pytest.mark.parametrize("name", ["cocostuff27", "cityscapes", "potsdam", "demo", "smoke"])
def test_downstream_chapters_ask_only_for_runs_the_profile_trains(name):
    """12§4.2: the explorer of a paper profile must not need h-NNE runs that the profile's sweep does not make
    (the explorer's default offers h-NNE); chapters 04 and 05 never train in any profile."""
    chapters = dict(study.load_profile(name))
    defaults = {nb: {p.name: p.default for p in study.read_parameters(nb)} for nb in chapters}
    trained = set(chapters["03_dimension_study"].get("methods", defaults["03_dimension_study"]["methods"]))
    trained |= {"stego", "dino"}  # chapter 02's runs
    for nb in ("04_evaluate", "05_explorer"):
        asked = set(chapters[nb].get("methods", defaults[nb]["methods"]))
        assert asked <= trained, (nb, asked - trained)
        assert not chapters[nb].get("train_missing", False), nb
    paper = yaml.safe_load(study.profile_path(name).read_text())
    if name not in ("demo", "smoke"):  # the paper profiles never let a downstream chapter train
        for entry in paper["notebooks"]:
            assert "train_missing" not in (entry.get("parameters") or {}), entry["notebook"]
        assert "train_missing" not in (paper.get("parameters") or {})


def test_downstream_stores_are_required_not_built(mosaic, tmp_path):
    """A downstream chapter opens the feature stores of chapter 01 with build=False: a missing one (say a typo in a
    resolution) stops with the feature-stage command instead of extracting features of its own."""
    kw = dict(weights="random", dataset_options=OPTS, root=mosaic["root"], progress=False, build=False)
    found = cache.cache_features("mosaic", "train", "efficientnet_lite0", res=64, **kw)
    assert found.path == mosaic["train"].path
    before = sorted(p.name for p in (mosaic["root"] / "features").iterdir())
    with pytest.raises(StegoError) as info:
        cache.cache_features("mosaic", "val", "efficientnet_lite0", res=96, **kw)
    msg = str(info.value)
    assert msg.startswith("val: no finished feature store of mosaic/val") and "\n" not in msg, msg
    assert "stego-study run 01_features" in msg and "-p val_res 96" in msg
    assert sorted(p.name for p in (mosaic["root"] / "features").iterdir()) == before  # nothing started
