"""Tests of stego_core.fivecrop: crop geometry, the written tree, resuming, and reading it back."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from datatrees import make_cityscapes, make_potsdam
from PIL import Image

import stego_core.fivecrop as fivecrop
from stego_core.config import StegoError
from stego_core.data import five_crop_dir, load_dataset
from stego_core.fivecrop import five_crop_boxes, prepare_five_crops


def test_boxes_match_the_spec_examples():
    # spec 6.4: a 640x480 COCO image -> 320x240 crops
    assert five_crop_boxes(480, 640) == [(0, 0, 240, 320), (0, 320, 240, 320), (240, 0, 240, 320),
                                         (240, 320, 240, 320), (120, 160, 240, 320)]
    assert five_crop_boxes(1024, 2048) == [(0, 0, 512, 1024), (0, 1024, 512, 1024), (512, 0, 512, 1024),
                                           (512, 1024, 512, 1024), (256, 512, 512, 1024)]
    # odd sizes: floor of the crop size, centre offset rounded half to even (torchvision's round)
    assert five_crop_boxes(7, 9) == [(0, 0, 3, 4), (0, 5, 3, 4), (4, 0, 3, 4), (4, 5, 3, 4), (2, 2, 3, 4)]
    with pytest.raises(StegoError, match="crop_ratio"):
        five_crop_boxes(10, 10, 0.0)


def test_boxes_match_torchvision():
    functional = pytest.importorskip("torchvision.transforms.functional")
    for height, width in ((7, 9), (33, 50), (480, 640)):
        img = torch.arange(height * width).reshape(1, height, width)
        crops = functional.five_crop(img, [int(0.5 * height), int(0.5 * width)])
        for crop, (top, left, h, w) in zip(crops, five_crop_boxes(height, width)):
            assert torch.equal(crop, img[:, top:top + h, left:left + w])


def test_prepare_writes_tree_and_roundtrips_labels(tmp_path):
    make_cityscapes(tmp_path, size=(32, 64))
    folder = prepare_five_crops("cityscapes", "train", root=tmp_path, progress=False)
    assert folder == tmp_path / "cropped" / "cityscapes_five_crop_0.5"
    assert (folder / "done-train.json").exists()
    source = load_dataset("cityscapes", "train", root=tmp_path)
    crops = load_dataset("cityscapes", "train", root=tmp_path, crop="five", res=8)
    assert len(crops) == 5 * len(source) == 15
    for i in range(len(source)):
        image, label = source.raw(i)
        for j, (top, left, h, w) in enumerate(five_crop_boxes(32, 64)):
            stored = np.asarray(Image.open(folder / "label" / "train" / f"{5 * i + j}.png"))
            np.testing.assert_array_equal(stored, label[top:top + h, left:left + w] + 1)  # label + 1 on disk
            c_img, c_lbl = crops.raw(5 * i + j)
            np.testing.assert_array_equal(c_lbl, label[top:top + h, left:left + w])  # -1 comes back
            # JPEG quality 75: the file is byte-identical to PIL's q75 encoding of the crop
            buf = io.BytesIO()
            Image.fromarray(np.ascontiguousarray(image[top:top + h, left:left + w])).save(buf, "JPEG", quality=75)
            assert (folder / "img" / "train" / f"{5 * i + j}.jpg").read_bytes() == buf.getvalue()
            assert c_img.shape == (16, 32, 3)
    item = crops[7]
    assert item["img"].shape == (3, 8, 8) and item["label"].shape == (8, 8)


def test_prepare_resumes_and_skips_finished_work(tmp_path, monkeypatch):
    make_potsdam(tmp_path)
    real_save = fivecrop._save_atomic
    folder = prepare_five_crops("potsdam", "train", root=tmp_path, progress=False)
    before = {p: p.read_bytes() for p in folder.rglob("*.*") if not p.name.startswith(".")}  # not the lock file

    def _fail(*args, **kwargs):
        raise AssertionError("a finished stage wrote a file")

    monkeypatch.setattr(fivecrop, "_save_atomic", _fail)
    prepare_five_crops("potsdam", "train", root=tmp_path, progress=False)  # marker matches: no work

    # an interrupted run: the marker and one crop are gone, a stale temporary file is left behind
    (folder / "done-train.json").unlink()
    (folder / "img" / "train" / "7.jpg").unlink()
    (folder / "img" / "train" / ".7.jpg.tmp").write_bytes(b"partial")
    writes = []
    monkeypatch.setattr(fivecrop, "_save_atomic", lambda arr, path, **kw: (writes.append(path.name),
                                                                            real_save(arr, path, **kw)))
    prepare_five_crops("potsdam", "train", root=tmp_path, progress=False)
    assert sorted(writes) == sorted([f"{n}.jpg" for n in range(5, 10)] + [f"{n}.png" for n in range(5, 10)])
    after = {p: p.read_bytes() for p in folder.rglob("*.*") if not p.name.startswith(".")}
    assert after.keys() == before.keys() and all(after[p] == before[p] for p in before)


def test_corrected_protocol_is_lossless_png(tmp_path):
    make_potsdam(tmp_path)
    folder = prepare_five_crops("potsdam", "val", root=tmp_path, protocol="corrected", progress=False)
    assert folder == five_crop_dir("potsdam", root=tmp_path, protocol="corrected") != five_crop_dir(
        "potsdam", root=tmp_path)
    source = load_dataset("potsdam", "val", root=tmp_path)
    crops = load_dataset("potsdam", "val", root=tmp_path, crop="five", protocol="corrected")
    image, label = source.raw(1)  # the image without gt: all ignored
    top, left, h, w = five_crop_boxes(*label.shape)[4]
    c_img, c_lbl = crops.raw(9)
    np.testing.assert_array_equal(c_img, image[top:top + h, left:left + w])
    assert (c_lbl == -1).all()


def test_errors(tmp_path):
    with pytest.raises(StegoError, match="dataset"):
        prepare_five_crops("mosaic", "train", root=tmp_path)
    with pytest.raises(StegoError, match="split"):
        prepare_five_crops("cityscapes", "test", root=tmp_path)
    with pytest.raises(StegoError, match="root"):
        prepare_five_crops("cityscapes", "train", root=tmp_path)  # no source tree
    make_cityscapes(tmp_path)
    with pytest.raises(StegoError, match="five-crop"):
        load_dataset("cityscapes", "train", root=tmp_path, crop="five")  # not prepared yet
    folder = prepare_five_crops("cityscapes", "val", root=tmp_path, progress=False)
    bad = folder / "label" / "val" / "3.png"
    Image.fromarray(np.full((16, 32), 40, np.uint8)).save(bad)
    crops = load_dataset("cityscapes", "val", root=tmp_path, crop="five")
    with pytest.raises(StegoError, match="3.png"):
        crops[3]
