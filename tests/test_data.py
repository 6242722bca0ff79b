"""Tests of stego_core.data: the mosaic demo, transform arithmetic, every on-disk format, and clear errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from datatrees import make_cityscapes, make_cocostuff, make_directory, make_potsdam
from PIL import Image

from stego_core.config import StegoError
from stego_core.data import (
    DATASETS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    center_crop_offset,
    load_dataset,
    normalize,
    resized_size,
    transform_pair,
    unnormalize,
)

# ---------------------------------------------------------------------------------------------------------------
# mosaic


def test_mosaic_is_deterministic_per_seed_split_index():
    a = load_dataset("mosaic", "train", res=64, n_images=4)
    b = load_dataset("mosaic", "train", res=64, n_images=4)
    img_a, lbl_a = a.raw(2)
    img_b, lbl_b = b.raw(2)
    np.testing.assert_array_equal(img_a, img_b)
    np.testing.assert_array_equal(lbl_a, lbl_b)
    assert torch.equal(a[1]["img"], b[1]["img"])
    others = [a.raw(3), load_dataset("mosaic", "val", n_images=4).raw(2),
              load_dataset("mosaic", "train", seed=1, n_images=4).raw(2)]
    for img, lbl in others:
        assert not np.array_equal(img, img_a)
        assert not np.array_equal(lbl, lbl_a)


def test_mosaic_item_contract_and_defaults():
    ds = load_dataset("mosaic", "train", res=96)
    assert len(ds) == 480 and len(load_dataset("mosaic", "val")) == 60
    assert ds.n_classes == 10 and len(ds.class_names) == 10 and len(set(ds.class_names)) == 10
    assert ds.palette.shape == (10, 3) and ds.palette.dtype == np.uint8
    assert len({tuple(c) for c in ds.palette}) == 10
    item = ds[5]
    assert set(item) == {"img", "label", "index"} and item["index"] == 5
    assert item["img"].shape == (3, 96, 96) and item["img"].dtype == torch.float32
    assert item["label"].shape == (96, 96) and item["label"].dtype == torch.int64
    raw_img, _ = ds.raw(5)
    assert raw_img.shape == (320, 320, 3) and raw_img.dtype == np.uint8
    with pytest.raises(IndexError):
        ds[480]


def test_mosaic_labels_exact_and_all_classes_appear():
    ds = load_dataset("mosaic", "train", n_images=16, scene_size=160, res=160, n_classes=6)
    seen = set()
    for i in range(len(ds)):
        img, lbl = ds.raw(i)
        assert lbl.min() >= 0 and lbl.max() < 6
        seen |= set(np.unique(lbl).tolist())
    assert seen == set(range(6))
    big = load_dataset("mosaic", "val", n_classes=10, n_images=20, scene_size=128)
    labels = np.concatenate([big.raw(i)[1].ravel() for i in range(len(big))])
    assert labels.min() >= 0 and labels.max() <= 9 and len(np.unique(labels)) >= 9


def _region_colours(ds, n):
    """Mean RGB per (scene, class) region and its class."""
    feats, classes = [], []
    for i in range(n):
        img, lbl = ds.raw(i)
        for k in np.unique(lbl):
            feats.append(img[lbl == k].reshape(-1, 3).mean(0) / 255.0)
            classes.append(k)
    return np.array(feats), np.array(classes)


def test_mosaic_colour_carries_no_class():
    ds = load_dataset("mosaic", "train", n_images=80, scene_size=96, n_classes=6)
    feats, classes = _region_colours(ds, 80)
    for k in range(6):  # tints vary within every class
        assert (classes == k).sum() >= 5
        assert feats[classes == k].std(0).min() > 0.05
    # a nearest-centroid classifier on mean colour is near the majority-class rate on held-out scenes
    half = len(classes) // 2
    centroids = np.stack([feats[:half][classes[:half] == k].mean(0) for k in range(6)])
    pred = np.argmin(((feats[half:, None] - centroids[None]) ** 2).sum(-1), axis=1)
    accuracy = (pred == classes[half:]).mean()
    majority = np.bincount(classes[half:]).max() / (len(classes) - half)
    assert accuracy < max(majority, 1 / 6) + 0.15


def test_mosaic_option_errors():
    with pytest.raises(StegoError, match="n_classes"):
        load_dataset("mosaic", "train", n_classes=11)
    with pytest.raises(StegoError, match="n_images"):
        load_dataset("mosaic", "train", n_images=0)
    with pytest.raises(StegoError, match="crop"):
        load_dataset("mosaic", "train", crop="five")
    with pytest.raises(StegoError, match="bogus"):
        load_dataset("mosaic", "train", bogus=1)


# ---------------------------------------------------------------------------------------------------------------
# transforms


@pytest.mark.parametrize("hw,res,resized,offset", [
    ((480, 640), 224, (224, 298), (0, 37)),      # COCO train crop of a 640x480 image
    ((480, 640), 320, (320, 426), (0, 53)),      # COCO eval
    ((1024, 2048), 224, (224, 448), (0, 112)),   # Cityscapes
    ((1024, 2048), 320, (320, 640), (0, 160)),
    ((640, 480), 224, (298, 224), (37, 0)),      # portrait
    ((512, 1024), 224, (224, 448), (0, 112)),    # a Cityscapes five-crop
])
def test_resize_and_centre_crop_arithmetic(hw, res, resized, offset):
    assert resized_size(*hw, res) == resized
    assert (center_crop_offset(resized[0], res), center_crop_offset(resized[1], res)) == offset


def _coordinate_pair(height, width):
    """An image whose pixels encode their source coordinates and the matching label."""
    rows, cols = np.mgrid[0:height, 0:width]
    image = np.stack([rows % 256, cols % 256, (rows // 256) * 16 + cols // 256], -1).astype(np.uint8)
    return image, (rows * width + cols).astype(np.int64)


def test_transform_picks_the_same_pixels_for_image_and_label():
    image, label = _coordinate_pair(480, 640)
    out_img, out_lbl = transform_pair(image, label, 224)
    assert out_img.shape == (224, 224, 3) and out_lbl.shape == (224, 224)
    rows, cols = out_lbl // 640, out_lbl % 640
    np.testing.assert_array_equal(out_img[..., 0], rows % 256)
    np.testing.assert_array_equal(out_img[..., 1], cols % 256)
    # nearest resize 480x640 -> 224x298 samples near (i + 0.5) * scale, then the crop starts at column 37
    expect_rows = (np.arange(224) + 0.5) * 480 / 224
    expect_cols = (np.arange(37, 37 + 224) + 0.5) * 640 / 298
    assert np.abs(rows[:, 0] - expect_rows).max() <= 1.0
    assert np.abs(cols[0] - expect_cols).max() <= 1.0
    # crop="none" squashes to res x res
    sq_img, sq_lbl = transform_pair(image, label, 100, crop="none")
    assert sq_img.shape == (100, 100, 3) and (sq_lbl // 640).max() > 470 and (sq_lbl % 640).max() > 630


def test_corrected_protocol_smooths_images_but_not_labels():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)
    label = rng.integers(0, 5, (96, 128)).astype(np.int64)
    img_o, lbl_o = transform_pair(image, label, 32, protocol="original")
    img_c, lbl_c = transform_pair(image, label, 32, protocol="corrected")
    np.testing.assert_array_equal(lbl_o, lbl_c)
    assert set(np.unique(img_o)) <= set(np.unique(image))
    assert img_c.std() < 0.7 * img_o.std()  # antialiasing averages the noise


def test_transforms_match_torchvision():
    tv = pytest.importorskip("torchvision.transforms")
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (150, 211, 3), dtype=np.uint8)
    label = rng.integers(0, 30, (150, 211)).astype(np.uint8)
    for res in (64, 97):
        ref_img = tv.Compose([tv.Resize(res, tv.InterpolationMode.NEAREST), tv.CenterCrop(res)])(
            Image.fromarray(image))
        ref_lbl = tv.Compose([tv.Resize(res, tv.InterpolationMode.NEAREST), tv.CenterCrop(res)])(
            Image.fromarray(label))
        out_img, out_lbl = transform_pair(image, label.astype(np.int64), res)
        np.testing.assert_array_equal(out_img, np.asarray(ref_img))
        np.testing.assert_array_equal(out_lbl, np.asarray(ref_lbl))


def test_normalize_roundtrip():
    x = torch.rand(2, 3, 5, 7)
    y = normalize(x)
    assert torch.allclose(y[:, 0], (x[:, 0] - IMAGENET_MEAN[0]) / IMAGENET_STD[0])
    assert torch.allclose(unnormalize(y), x, atol=1e-6)
    ds = load_dataset("mosaic", "val", res=48, n_images=2)
    rgb, _ = ds.sample(1)
    back = (unnormalize(ds[1]["img"]).permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    np.testing.assert_array_equal(back, rgb)


# ---------------------------------------------------------------------------------------------------------------
# on-disk formats

COCO_HAND = {0: 9, 1: 11, 15: 7, 100: 13, 105: 23, 181: 24, 255: -1, 91: 17}


def test_cocostuff27_loads_with_coarse_labels(tmp_path):
    tree = make_cocostuff(tmp_path)
    ds = load_dataset("cocostuff27", "train", res=32, root=tmp_path)
    assert len(ds) == 3 and ds.n_classes == 27 and ds.class_names[9] == "person" and ds.class_names[26] == "water"
    for k in range(3):
        img, lbl = ds.raw(k)
        fine = tree["labels"][("train", k)]
        assert img.shape == (48, 64, 3)
        np.testing.assert_array_equal(lbl, np.vectorize(COCO_HAND.get)(fine))
    item = ds[0]
    assert item["img"].shape == (3, 32, 32) and item["label"].shape == (32, 32)
    assert set(item["label"].unique().tolist()) <= set(COCO_HAND.values())
    assert len(load_dataset("cocostuff27", "val", root=tmp_path)) == 2


def test_coco_table_spot_checks():
    from stego_core.data import coco_fine_to_coarse

    lut = coco_fine_to_coarse()
    assert [lut[i] for i in (8, 9, 24, 42, 50, 60, 70, 76, 82, 90)] == [11, 8, 7, 10, 5, 2, 3, 0, 1, 4]
    assert [lut[i] for i in (97, 99, 101, 113, 119, 152, 170, 179, 180)] == [15, 16, 12, 13, 26, 14, 18, 19, 19]
    assert lut[255] == -1 and lut[200] == -2
    assert sorted(set(lut[:182].tolist())) == list(range(27))


def test_cityscapes_loads_with_id_minus_7(tmp_path, monkeypatch):
    tree = make_cityscapes(tmp_path)
    monkeypatch.setenv("STEGO_DATA", str(tmp_path))  # root from the environment
    ds = load_dataset("cityscapes", "train", res=16)
    assert len(ds) == 3 and ds.n_classes == 27 and ds.class_names[0] == "road" and ds.class_names[-1] == "bicycle"
    assert [p[0].parent.name for p in ds.pairs] == ["aachen", "aachen", "bochum"]
    assert tuple(ds.palette[0]) == (128, 64, 128) and tuple(ds.palette[26]) == (119, 11, 32)
    for k in range(3):
        ids = tree["labels"][("train", k)].astype(np.int64)
        _, lbl = ds.raw(k)
        np.testing.assert_array_equal(lbl, np.where(ids >= 7, ids - 7, -1))
        assert lbl[ids == 7].tolist()[0] == 0 and lbl[ids == 33].tolist()[0] == 26 and (lbl[ids < 7] == -1).all()
    assert ds[2]["label"].shape == (16, 16)
    assert len(load_dataset("cityscapes", "val")) == 2


def test_potsdam_loads_rgb_and_coarse_labels(tmp_path):
    tree = make_potsdam(tmp_path)
    ds = load_dataset("potsdam", "train", res=16, root=tmp_path)
    assert len(ds) == 3 and ds.n_classes == 3
    hand = {0: 0, 4: 0, 1: 1, 5: 1, 2: 2, 3: 2, 255: -1}
    for k in range(3):
        img, lbl = ds.raw(k)
        np.testing.assert_array_equal(img, (tree["images"][("train", k)][..., :3] * 255).astype(np.uint8))
        np.testing.assert_array_equal(lbl, np.vectorize(hand.get)(tree["labels"][("train", k)]))
    val = load_dataset("potsdam", "val", res=16, root=tmp_path)
    assert (val.raw(1)[1] == -1).all()  # missing gt -> everything ignored
    assert (val[1]["label"] == -1).all()
    uint_root = tmp_path / "u"
    tree_u = make_potsdam(uint_root, float_images=False)
    np.testing.assert_array_equal(load_dataset("potsdam", "train", root=uint_root).raw(0)[0],
                                  tree_u["images"][("train", 0)][..., :3])


def test_directory_with_and_without_labels(tmp_path):
    make_directory(tmp_path / "lab", n_classes=4)
    ds = load_dataset("directory", "train", res=20, root=tmp_path / "lab", n_classes=4)
    assert ds.has_labels and len(ds) == 3 and ds.n_classes == 4 and ds.palette.shape == (4, 3)
    _, lbl = ds.raw(1)
    assert sorted(np.unique(lbl).tolist()) == [-1, 0, 1, 2, 3]
    make_directory(tmp_path / "nolab", labels=False)
    bare = load_dataset("directory", "val", res=20, root=tmp_path / "nolab", n_classes=3)
    assert not bare.has_labels and len(bare) == 2 and (bare[0]["label"] == -1).all()
    with pytest.raises(StegoError, match="n_classes"):
        load_dataset("directory", "val", root=tmp_path / "nolab")


# ---------------------------------------------------------------------------------------------------------------
# errors


def test_unknown_name_split_crop():
    with pytest.raises(StegoError, match="name"):
        load_dataset("imagenet", "train")
    with pytest.raises(StegoError, match="split"):
        load_dataset("cityscapes", "test")
    with pytest.raises(StegoError, match="crop"):
        load_dataset("mosaic", "train", crop="random")
    with pytest.raises(StegoError, match="protocol"):
        load_dataset("mosaic", "train", protocol="fixed")
    assert set(DATASETS) == {"mosaic", "cocostuff27", "cityscapes", "potsdam", "directory"}


@pytest.mark.parametrize("name,needle", [("cocostuff27", "Coco164kFull_Stuff_Coarse.txt"),
                                         ("cityscapes", "leftImg8bit"), ("potsdam", "labelled_train.txt"),
                                         ("directory", "imgs")])
def test_missing_root_shows_expected_tree(tmp_path, name, needle):
    opts = {"n_classes": 3} if name == "directory" else {}
    with pytest.raises(StegoError) as err:
        load_dataset(name, "train", root=tmp_path / "nowhere", **opts)
    msg = str(err.value)
    assert str(tmp_path / "nowhere") in msg and needle in msg and "expected" in msg and "source" in msg


def test_unpaired_files_are_named(tmp_path):
    make_cityscapes(tmp_path)
    victim = tmp_path / "cityscapes/gtFine/train/bochum/bochum_000000_000019_gtFine_labelIds.png"
    victim.unlink()
    with pytest.raises(StegoError, match="bochum_000000_000019_gtFine_labelIds.png"):
        load_dataset("cityscapes", "train", root=tmp_path)

    make_cocostuff(tmp_path)
    (tmp_path / "cocostuff/images/val2017/000000001001.jpg").unlink()
    with pytest.raises(StegoError, match="000000001001.jpg"):
        load_dataset("cocostuff27", "val", root=tmp_path)

    make_directory(tmp_path / "d")
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "d/labels/train/stray.png")
    with pytest.raises(StegoError, match="stray.png"):
        load_dataset("directory", "train", root=tmp_path / "d", n_classes=4)


def test_size_mismatch_is_named(tmp_path):
    make_directory(tmp_path, n_classes=4)
    Image.fromarray(np.zeros((7, 9), np.uint8)).save(tmp_path / "labels/train/img_001.png")
    ds = load_dataset("directory", "train", root=tmp_path, n_classes=4)
    with pytest.raises(StegoError, match="img_001.png"):
        ds[1]


@pytest.mark.parametrize("name,value", [("cocostuff27", 200), ("cityscapes", 34), ("directory", 4)])
def test_out_of_range_label_is_named(tmp_path, name, value):
    if name == "cocostuff27":
        make_cocostuff(tmp_path)
        path = tmp_path / "cocostuff/annotations/train2017/000000000001.png"
        idx = 1
    elif name == "cityscapes":
        make_cityscapes(tmp_path)
        path = tmp_path / "cityscapes/gtFine/train/aachen/aachen_000001_000019_gtFine_labelIds.png"
        idx = 1
    else:
        make_directory(tmp_path, n_classes=4)
        path = tmp_path / "labels/train/img_002.png"
        idx = 2
    lbl = np.asarray(Image.open(path)).copy()
    lbl[0, 0] = value
    Image.fromarray(lbl).save(path)
    ds = load_dataset(name, "train", root=tmp_path, **({"n_classes": 4} if name == "directory" else {}))
    ds.raw(0)  # the untouched file still loads
    with pytest.raises(StegoError, match=rf"{path.name}.*\[{value}\]"):
        ds[idx]
