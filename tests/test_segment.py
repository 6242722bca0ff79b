"""Tests of stego_core.segment: label maps at the input's size, overlays, the CRF path, the checkpoint path, errors,
the command line and the banded upsampling. Models are tiny and randomly initialised (no training here; the
end-to-end test in test_realdata_e2e.py segments with a trained run)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from stego_core import segment
from stego_core.config import StegoError
from stego_core.heads import STEGOHead
from stego_core.probes import ClusterProbe, LinearProbe
from stego_core.segment import main, network_size, segment_images, upsampled_argmax
from stego_core.segmenter import Segmenter

N_CLASSES = 3


@pytest.fixture(scope="module")
def run() -> Segmenter:
    """A segmenter as Segmenter.from_run gives it: EfficientNet-Lite0 (random weights, loaded by segment_images),
    a head to 6 dims, two probes."""
    torch.manual_seed(0)
    info = {"source": "run", "run_dir": "unused", "step": 1, "dataset": "photos", "backbone": "efficientnet_lite0",
            "weights": "random", "method": "stego", "class_names": ["sky", "ground", "thing"],
            "palette": [[0, 0, 255], [0, 255, 0], [255, 0, 0]]}
    return Segmenter(STEGOHead(112, 6), ClusterProbe(6, N_CLASSES + 1), LinearProbe(6, N_CLASSES), info=info).eval()


@pytest.fixture
def photos(tmp_path) -> list[Path]:
    """Three images of awkward sizes and modes: a grey PNG, an RGBA PNG and a JPEG."""
    rng = np.random.default_rng(0)
    d = tmp_path / "in"
    d.mkdir()
    paths = [d / "grey.png", d / "alpha.png", d / "photo.jpg"]
    Image.fromarray(rng.integers(0, 255, (37, 53), dtype=np.uint8)).save(paths[0])
    Image.fromarray(rng.integers(0, 255, (90, 41, 4), dtype=np.uint8), "RGBA").save(paths[1])
    yy, xx = np.mgrid[0:70, 0:120]
    smooth = np.stack([xx * 2, yy * 3, (xx + yy)], -1).clip(0, 255).astype(np.uint8)
    Image.fromarray(smooth).save(paths[2], quality=90)
    return paths


def _sizes(paths):
    return [Image.open(p).size[::-1] for p in paths]  # (H, W)


def test_masks_have_the_original_size_and_overlays_are_written(run, photos, tmp_path):
    out = tmp_path / "out"
    torch.manual_seed(1)  # weights="random": the backbone's initialisation draws from the global RNG
    results = segment_images(photos, run=run, out_dir=out, res=64, progress=False)
    assert [r.source for r in results] == photos
    for r, (h, w) in zip(results, _sizes(photos)):
        label = Image.open(r.label_path)
        assert label.mode == "L" and label.size == (w, h) and r.size == (h, w)
        ids = np.asarray(label)
        assert ids.max() < N_CLASSES + 1  # cluster ids: K + 1 centres in this probe
        assert sum(r.counts.values()) == h * w and set(r.counts) == set(np.unique(ids).tolist())
        over = Image.open(r.overlay_path)
        assert over.mode == "RGB" and over.size == (w, h)
        assert r.network_size[0] % 16 == 0 and r.network_size[1] % 16 == 0 and min(r.network_size) == 64
    meta = json.loads((out / "classes.json").read_text())
    assert meta["probe"] == "cluster" and len(meta["ids"]) == N_CLASSES + 1
    assert meta["ids"][0]["color"] == [0, 0, 255]  # the training dataset's palette comes first
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left behind
    # deterministic: a second call (same backbone initialisation) writes the same bytes
    torch.manual_seed(1)
    again = segment_images(photos, run=run, out_dir=tmp_path / "again", res=64, progress=False)
    for a, b in zip(results, again):
        assert a.label_path.read_bytes() == b.label_path.read_bytes()


def test_linear_probe_gives_class_ids_and_names(run, photos, tmp_path):
    results = segment_images(photos[:1], run=run, out_dir=tmp_path, res=32, probe="linear", flip=False,
                             progress=False)
    assert np.asarray(Image.open(results[0].label_path)).max() < N_CLASSES
    meta = json.loads((tmp_path / "classes.json").read_text())
    assert [i["name"] for i in meta["ids"]] == ["sky", "ground", "thing"]


def test_exif_orientation_is_applied(run, tmp_path):
    path = tmp_path / "phone.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    Image.fromarray(np.full((40, 72, 3), 128, np.uint8)).save(path, exif=exif)
    (r,) = segment_images([path], run=run, out_dir=tmp_path / "o", res=32, progress=False)
    assert r.size == (72, 40) and Image.open(r.label_path).size == (40, 72)  # shown upright: 40 wide, 72 high


def test_crf_path_calls_the_crf_once_per_image(run, photos, tmp_path, monkeypatch):
    from stego_core import crf

    calls = []
    real = crf.dense_crf

    def spy(image, logits, *, protocol="original"):
        calls.append((tuple(image.shape), tuple(logits.shape), protocol))
        return real(image, logits, protocol=protocol)

    monkeypatch.setattr(crf, "dense_crf", spy)
    results = segment_images(photos, run=run, out_dir=tmp_path, res=32, crf=True, protocol="corrected",
                             progress=False)
    assert len(calls) == len(photos)
    for (img_shape, logit_shape, protocol), r in zip(calls, results):
        assert img_shape[1:] == r.network_size and logit_shape == (N_CLASSES + 1, *r.network_size)
        assert protocol == "corrected"
    for r, (h, w) in zip(results, _sizes(photos)):
        assert Image.open(r.label_path).size == (w, h)


def test_released_checkpoint_path(tmp_path, photos):
    timm = pytest.importorskip("timm")
    from stego_core.checkpoints import LoadedCheckpoint

    torch.manual_seed(0)
    vit = timm.create_model("vit_small_patch8_224.dino", pretrained=False)
    ck = LoadedCheckpoint(path="fake.ckpt", backbone_name="dino_vits8", dataset="cocostuff27", code_dim=5,
                          n_classes=27, extra_clusters=0, head=STEGOHead(384, 5), cluster_probe=ClusterProbe(5, 27),
                          linear_probe=LinearProbe(5, 27), backbone_state=vit.state_dict(), hparams={})
    results = segment_images(photos[2:], checkpoint=ck, out_dir=tmp_path, res=32, probe="linear", progress=False)
    assert Image.open(results[0].label_path).size == (120, 70)
    assert results[0].network_size == (32, 56)  # 70x120 -> short side 32, long side 54.9 -> 56 (patch 8)
    meta = json.loads((tmp_path / "classes.json").read_text())
    assert meta["ids"][9]["name"] == "person" and meta["model"]["source"] == "checkpoint"


def test_errors_are_one_clear_line(run, photos, tmp_path):
    cases = [
        (dict(paths=photos), "run/checkpoint"),
        (dict(paths=photos, run=run, checkpoint="x.ckpt"), "run/checkpoint"),
        (dict(paths=[tmp_path / "nope.jpg"], run=run), "does not exist"),
        (dict(paths=photos, checkpoint=tmp_path / "missing.ckpt"), "checkpoint"),
        (dict(paths=photos, run=tmp_path), "meta.json"),
        (dict(paths=photos, run=run, probe="kmeans"), "probe"),
        (dict(paths=[], run=run), "no images"),
        (dict(paths=photos, run=run, alpha=2), "alpha"),
    ]
    bad = tmp_path / "text.jpg"
    bad.write_text("not an image")
    cases.append((dict(paths=[bad], run=run), "cannot read"))
    empty = tmp_path / "empty"
    empty.mkdir()
    cases.append((dict(paths=[empty], run=run), "holds no images"))
    twin = tmp_path / "twin"
    twin.mkdir()
    Image.open(photos[2]).save(twin / "photo.png")
    cases.append((dict(paths=[photos[2], twin / "photo.png"], run=run), "share the name"))
    for kwargs, words in cases:
        paths = kwargs.pop("paths")
        with pytest.raises(StegoError) as info:
            segment_images(paths, out_dir=tmp_path / "o", progress=False, **kwargs)
        msg = str(info.value)
        assert words in msg and "\n" not in msg, (kwargs, msg)


def test_folders_are_expanded_in_sorted_order(run, photos, tmp_path):
    results = segment_images([photos[0].parent], run=run, out_dir=tmp_path / "o", res=32, progress=False)
    assert [r.source.name for r in results] == sorted(p.name for p in photos)


def test_command_line(run, photos, tmp_path, capsys, monkeypatch):
    # the CLI loads the run from disk: serve our in-memory run instead of a trained folder
    monkeypatch.setattr(segment.Segmenter, "from_run", classmethod(lambda cls, run_dir, **kw: run))
    fake_run = tmp_path / "run"
    fake_run.mkdir()
    (fake_run / "meta.json").write_text("{}")
    out = tmp_path / "cli"
    assert main(["--run", str(fake_run), str(photos[2]), "--out", str(out), "--res", "32", "--quiet"]) == 0
    assert (out / "photo_label.png").exists() and (out / "photo_overlay.png").exists()
    assert "photo_label.png" in capsys.readouterr().out
    assert main(["--run", str(fake_run), str(tmp_path / "missing.jpg"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: paths:") and len(err.splitlines()) == 1
    with pytest.raises(SystemExit):  # argparse: --run and --checkpoint are exclusive
        main(["--run", "a", "--checkpoint", "b", "x.jpg", "--out", str(out)])


def test_upsampled_argmax_matches_full_interpolation():
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(5, 7, 9, generator=gen)
    full = F.interpolate(scores[None], size=(61, 83), mode="bilinear", align_corners=False)[0].argmax(0).numpy()
    for band in (1 << 30, 4 * 5 * 83 * 3):  # one band, and bands of 3 rows
        banded = upsampled_argmax(scores, (61, 83), band_bytes=band)
        assert banded.shape == (61, 83) and (banded == full).mean() > 0.999
    # downsampling works too
    small = F.interpolate(scores[None], size=(3, 4), mode="bilinear", align_corners=False)[0].argmax(0).numpy()
    assert (upsampled_argmax(scores, (3, 4)) == small).all()


def test_network_size_keeps_aspect_and_stride():
    assert network_size(480, 640, 320, 8) == (320, 424)  # 426.7 -> nearest multiple of 8
    assert network_size(640, 480, 320, 8) == (424, 320)
    assert network_size(100, 100, 320, 16) == (320, 320)
    assert network_size(10, 1000, 30, 16) == (32, 3200)  # res rounded to the stride
    h, w = network_size(1024, 2048, 224, 8)
    assert (h, w) == (224, 448)
