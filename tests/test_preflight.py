"""`stego-study preflight`: the static checks on healthy and deliberately broken trees (fast), and the synthetic
end-to-end preflight of the paper profiles and one DINOv2 / DINOv3 profile (slow: `make test` runs them)."""
from __future__ import annotations

import os

import pytest
import torch

from stego_core import datatrees, preflight
from stego_core.datatrees import write_synthetic_tree


def _by_name(report) -> dict[str, preflight.Check]:
    return {f"{c.area}:{c.name}": c for c in report.checks}


def _wrong_weights(path):
    """A ViT-S/8 state dict (384 wide): the wrong architecture for the ViT-B/8 of the COCO profile."""
    import timm

    torch.manual_seed(0)
    torch.save(timm.create_model("vit_small_patch8_224.dino", pretrained=False).state_dict(), path)
    return path


def test_broken_tree_fails_naming_each_problem(tmp_path, capsys):
    root = tmp_path / "data"
    write_synthetic_tree("cocostuff27", root)
    # wrong count: the curated train list loses an image; undecodable file: the first train image is garbage;
    # missing split: the val images are gone; wrong weights: a ViT-S/8 file for the ViT-B/8 profile
    lst = root / "cocostuff" / "curated" / "train2017" / "Coco164kFull_Stuff_Coarse.txt"
    ids = lst.read_text().split()
    lst.write_text("".join(f"{i}\n" for i in ids[:-1]))
    (root / "cocostuff" / "images" / "train2017" / f"{ids[0]}.jpg").write_bytes(b"not a jpeg at all")
    for f in (root / "cocostuff" / "images" / "val2017").iterdir():
        f.unlink()
    (root / "cocostuff" / "images" / "val2017").rmdir()
    weights = _wrong_weights(tmp_path / "vits8.pth")

    report = preflight.preflight("cocostuff27", data_root=root, weights=weights, device="cpu",
                                 expected={"train": 12, "val": 4}, run=True, log=lambda msg: None)
    checks = _by_name(report)
    assert not report.ok
    assert checks["data:train split"].ok
    assert not checks["data:train count"].ok and "11 images, expected 12" in checks["data:train count"].detail
    decode = checks["data:train files decode"]
    assert not decode.ok and ids[0] in decode.detail and "2 of 3" in decode.detail
    assert not checks["data:val split"].ok and "val2017" in checks["data:val split"].detail
    assert not checks["weights:dino_vitb8"].ok and "vits8.pth" in checks["weights:dino_vitb8"].detail
    five = checks["data:five-crop tree"]
    assert not five.ok and "prepare_five_crops" in five.fix  # the profile trains on five crops: how to prepare
    assert checks["device:cpu"].ok
    assert not checks["run:end-to-end run"].ok  # nothing is started on a broken setup
    table = preflight.format_table(report)
    assert table.count("FAIL") == len(report.failed) >= 6

    # the command: non-zero exit status and the table
    code = preflight.main(["--profile", "cocostuff27", "--data-root", str(root), "--weights", str(weights),
                           "--device", "cpu", "--no-run"])
    out = capsys.readouterr().out
    assert code == 1 and "FAIL" in out and "expected 49,629" in out and "vits8.pth" in out


def test_healthy_synthetic_tree_passes_the_static_checks(tmp_path):
    report = preflight.preflight("potsdam", synthetic=True, run=False, workdir=tmp_path, log=lambda msg: None)
    assert report.ok, preflight.format_table(report)
    checks = _by_name(report)
    assert checks["data:train count"].detail == "12 images, expected 12"
    assert "random (seed 0)" in checks["weights:dino_vits8"].detail
    # the synthetic tree holds 200x200 tiles like IIC's
    from stego_core import data

    image, label = data.load_dataset("potsdam", "val", root=tmp_path / "data").raw(0)
    assert image.shape == (200, 200, 3) and label.shape == (200, 200)


def test_paper_counts_are_the_cost_models():
    assert preflight.expected_counts("cocostuff27") == {"train": 49_629, "val": 2_175}
    assert preflight.expected_counts("cityscapes") == {"train": 2_975, "val": 500}
    assert preflight.expected_counts("potsdam") == {"train": 4_545, "val": 855}


def test_disk_check_against_the_cost_model(tmp_path):
    from stego_core import costs

    need = costs.dataset_costs("cocostuff27")
    stores = need["feature_store_bytes"] + need["knn_bytes"]
    ok = preflight.check_disk("cocostuff27", "dino_vitb8", artifacts=tmp_path, data=tmp_path, five_crop=True,
                              free=lambda p: stores + need["five_crop_bytes"])
    short = preflight.check_disk("cocostuff27", "dino_vitb8", artifacts=tmp_path, data=tmp_path, five_crop=True,
                                 free=lambda p: stores + need["five_crop_bytes"] - 1)
    assert ok.ok and not short.ok and "STEGO_ARTIFACTS" in short.fix
    assert costs.format_bytes(stores) in ok.detail


@pytest.mark.parametrize("dataset", ["cocostuff27", "cityscapes", "potsdam"])
def test_miniature_tree_links_the_first_images(tmp_path, dataset):
    from stego_core import data

    write_synthetic_tree(dataset, tmp_path / "full", n_train=5, n_val=3)
    mini = datatrees.miniature_copy(dataset, tmp_path / "full", tmp_path / "mini", n_train=2, n_val=1)
    for split, n in (("train", 2), ("val", 1)):
        small = data.load_dataset(dataset, split, root=mini)
        full = data.load_dataset(dataset, split, root=tmp_path / "full")
        assert len(small) == n
        for i in range(n):
            a, b = small.raw(i), full.raw(i)
            assert (a[0] == b[0]).all() and (a[1] == b[1]).all()


# `make test` runs the Potsdam profiles of DINO (ViT-S/8, the cheapest paper profile) and DINOv2 (ViT-S/14, about
# 4 minutes each); the ViT-B/8 profiles and the other newer backbones take 10-20 minutes each on a 2-core CPU, so they
# run with `make test-paper` (STEGO_PREFLIGHT_ALL=1).
_ALL = os.environ.get("STEGO_PREFLIGHT_ALL") == "1"
_HEAVY = pytest.mark.skipif(not _ALL, reason="ViT-B/8 and newer-backbone preflights run with `make test-paper`")


_PROFILES = ["potsdam", "potsdam_dinov2"] + [pytest.param(p, marks=_HEAVY)
                           for p in ("cocostuff27", "cityscapes", "cityscapes_dinov2", "potsdam_dinov3")]


@pytest.mark.slow
@pytest.mark.parametrize("profile", _PROFILES)
def test_synthetic_preflight_runs_the_profile_end_to_end(profile, tmp_path, capsys):
    code = preflight.main(["--profile", profile, "--synthetic", "--workdir", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "all checks passed" in out
    for name in ("01_features", "02_train_stego", "04_evaluate", "07_quirks", "09_parameters"):
        assert f"run      {name}" in out or f" {name} " in out, name
    if profile in ("potsdam", "cocostuff27", "cityscapes"):  # DINO v1: the released checkpoint layout
        assert "Table 2 from the checkpoint" in out and "segment --checkpoint" in out
        assert len(list((tmp_path / "segmented").glob("*_label.png"))) == 2
    if profile in ("cocostuff27", "cityscapes"):
        assert "five-crop preparation" in out
