"""The live explorer's logic (stego_core.book.explore) in this process: what it offers, that its pictures are the
study's own predictions, its messages, the app notebook and the command line. The browser test is
test_explore_browser.py."""
from __future__ import annotations

import datetime
import io

import nbformat
import numpy as np
import pytest
from PIL import Image
from tinyruns import make_tiny_runs

from stego_core.book import cli, explore
from stego_core.book.viz import overlay
from stego_core.config import StegoError
from stego_core.evaluation import evaluate_store
from stego_core.segment import id_names, label_map, load_segmenter
from stego_core.segmenter import Segmenter


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("explore-art")
    made = make_tiny_runs(root, requests=(("stego", 6), ("pca", 6)))
    return dict(root=root, **made)


def _png_pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_no_runs_says_which_command_makes_them(tmp_path):
    out = explore.explore_app(root=tmp_path)
    text = out.data
    assert "No finished runs yet" in text and str(tmp_path / "runs") in text
    assert "stego-study book --profile demo" in text and "03_dimension_study" in text
    assert "--profile cocostuff27" in explore.no_runs_message(tmp_path, "cocostuff27")


def test_sources_group_the_runs_of_one_store(tiny):
    sources = explore.find_sources(tiny["root"])
    assert len(sources) == 1 and sources[0].kind == "runs"
    assert set(sources[0].models) == {("stego", 6), ("pca", 6)}
    assert sources[0].val_store == str(tiny["val"].path)
    assert explore.find_sources(tiny["root"], dataset="cityscapes") == []
    with pytest.raises(StegoError, match="checkpoint: file .*missing.ckpt not found"):
        explore.find_sources(tiny["root"], checkpoints=["missing.ckpt"])


def test_the_app_shows_the_segmenters_own_prediction(tiny):
    app = explore.LiveExplorer(explore.find_sources(tiny["root"]), n_images=3)
    assert "ready" in app.status.value and app.method.value == "stego"
    first = app.segmentation.value
    app.method.value = "pca"
    app.probe.value = "linear"
    app.image.value = 2
    assert "ready" in app.status.value and app.segmentation.value != first
    # the same picture from the study's prediction path: the run's segmenter, segment.label_map, viz.overlay
    seg, _ = load_segmenter(Segmenter.from_run(tiny["run_dirs"][("pca", 6)]))
    image = tiny["val"].read(np.asarray([2]))["image"][0]
    label, _ = label_map(seg, image, res=tiny["val"].res, probe="linear")
    palette, names = id_names(seg, "linear")
    assert np.array_equal(_png_pixels(app.segmentation.value), overlay(image, label, palette, 0.6))
    assert np.array_equal(_png_pixels(app.photo.value), image)
    for k in np.unique(label):
        assert f'data-id="{k}"' in app.legend.value and names[k] in app.legend.value
    # the cluster probe's ids are classes, matched on the whole validation store as the book does
    app.probe.value = "cluster"
    res = evaluate_store(seg, tiny["val"], batch_size=8, progress=False)
    matched = seg.match(res["cluster"]["assignment"])
    label, _ = label_map(matched, image, res=tiny["val"].res, probe="cluster")
    assert np.array_equal(_png_pixels(app.segmentation.value), overlay(image, label, id_names(matched, "cluster")[0],
                                                                       0.6))


def test_uploads_are_segmented_at_their_own_size_and_bad_files_are_reported(tiny):
    app = explore.LiveExplorer(explore.find_sources(tiny["root"]), n_images=2)
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 90, 3), dtype=np.uint8)).save(buf, "PNG")
    app.upload.value = ({"name": "mine.png", "content": buf.getvalue(), "type": "image/png", "size": 1,
                         "last_modified": datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)},)
    assert app.image.value == explore.UPLOAD and "ready" in app.status.value
    assert _png_pixels(app.segmentation.value).shape == (40, 90, 3)
    app.upload.value = ({"name": "notes.txt", "content": b"not an image", "type": "text/plain", "size": 1,
                         "last_modified": datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)},)
    assert "stego-explore-error" in app.status.value and "upload: not an image file" in app.status.value


def test_the_app_notebook_is_one_call_with_literals(tmp_path):
    path = explore.write_app_notebook(tmp_path / "app.ipynb", kernel="stego-study", profile="demo",
                                      checkpoints=["/x/y.ckpt"], device=None, n_images=4)
    nb = nbformat.read(str(path), as_version=4)
    assert nb.metadata["kernelspec"]["name"] == "stego-study"
    code = [c.source for c in nb.cells if c.cell_type == "code"]
    assert code == ["from stego_core.book.explore import explore_app\n\n"
                    "explore_app(profile='demo', checkpoints=['/x/y.ckpt'], device=None, n_images=4)"]


def test_profile_settings(tmp_path):
    demo = explore.explore_settings("demo")
    assert demo["dataset"] == "mosaic" and demo["backbone"] == "efficientnet_lite0" and demo["checkpoints"] == []
    assert explore.explore_settings(None)["dataset"] is None


def test_command_line_refuses_bad_values_before_serving(tmp_path, capsys):
    assert cli.main(["explore", "--profile", "no-such-profile", "--no-browser"]) == 2
    assert "--profile: 'no-such-profile' not found" in capsys.readouterr().err
    assert cli.main(["explore", "--port", "70000", "--no-browser"]) == 2
    assert "--port" in capsys.readouterr().err
    assert cli.main(["explore", "--checkpoint", str(tmp_path / "none.ckpt"), "--no-browser"]) == 2
    assert "--checkpoint: file" in capsys.readouterr().err


def test_a_released_checkpoint_is_offered_with_its_own_method_and_dim(tiny):
    timm = pytest.importorskip("timm")
    import torch

    from stego_core.checkpoints import LoadedCheckpoint
    from stego_core.data import COCOSTUFF27_CLASSES
    from stego_core.heads import STEGOHead
    from stego_core.probes import ClusterProbe, LinearProbe

    torch.manual_seed(0)
    vit = timm.create_model("vit_small_patch8_224.dino", pretrained=False)
    ck = LoadedCheckpoint(path="fake.ckpt", backbone_name="dino_vits8", dataset="cocostuff27", code_dim=5,
                          n_classes=27, extra_clusters=0, head=STEGOHead(384, 5), cluster_probe=ClusterProbe(5, 27),
                          linear_probe=LinearProbe(5, 27), backbone_state=vit.state_dict(), hparams={})
    source = explore.Source(key="checkpoint:fake", label="checkpoint · fake.ckpt", kind="checkpoint", checkpoint=ck)
    app = explore.LiveExplorer([source, *explore.find_sources(tiny["root"])], n_images=2, res=32)
    assert app.method.disabled and app.dim.disabled
    assert app.image.options == (("your photo (upload)", explore.UPLOAD),) and "upload a photo" in app.status.value
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    app.upload.value = ({"name": "p.png", "content": buf.getvalue(), "type": "image/png", "size": 1,
                         "last_modified": datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)},)
    assert "ready" in app.status.value and "STEGO d=5 (checkpoint)" in app.info.value
    assert "cluster " in app.legend.value  # a checkpoint's clusters are not matched to classes here
    app.probe.value = "linear"
    assert any(f">{name} <" in app.legend.value for name in COCOSTUFF27_CLASSES)  # the dataset's class names
    assert "cluster " not in app.legend.value
    app.source.value = explore.find_sources(tiny["root"])[0].key  # back to the runs: method and dim again
    assert not app.method.disabled and app.method.value == "stego" and "ready" in app.status.value
