"""The extended study on DINOv2 / DINOv3 (issue 17): its training presets and sweep dimensions, the cost model's
rows for the newer backbones (re-derived by hand), and its profiles (the paper's profile of each dataset with only
the backbone, the preset and the patch-bound sizes changed)."""
from __future__ import annotations

import math

import pytest
import yaml

from stego_core import costs, study, sweep, training
from stego_core.config import StegoError

# preset -> (paper preset, backbone, width C of that backbone), the widths typed from the model cards
EXTENDED = {
    "cocostuff27_dinov2": ("cocostuff27", "dinov2_vitb14_reg", 768),
    "cocostuff27_dinov3": ("cocostuff27", "dinov3_vitb16", 768),
    "cityscapes_dinov2": ("cityscapes", "dinov2_vitb14_reg", 768),
    "cityscapes_dinov3": ("cityscapes", "dinov3_vitb16", 768),
    "potsdam_dinov2": ("potsdam", "dinov2_vits14_reg", 384),
    "potsdam_dinov3": ("potsdam", "dinov3_vits16", 384),
    "potsdam_dinov3_sat": ("potsdam", "dinov3_vitl16_sat", 1024),
}
PAPER_WIDTH = {"cocostuff27": 768, "cityscapes": 768, "potsdam": 384}  # ViT-B/8, ViT-B/8, ViT-S/8


def test_dimension_ladder_gives_the_papers_lists():
    assert sweep.dimension_ladder(768, 90) == sweep.STUDY_DIMS["cocostuff27"]
    assert sweep.dimension_ladder(768, 100) == sweep.STUDY_DIMS["cityscapes"]
    assert sweep.dimension_ladder(384, 70) == sweep.STUDY_DIMS["potsdam"]
    assert sweep.dimension_ladder(1024, 187) == (1024, 768, 384, 192, 187, 96, 48, 24, 12, 6, 3)
    with pytest.raises(StegoError, match="width"):
        sweep.dimension_ladder(0, 3)


@pytest.mark.parametrize("preset", sorted(EXTENDED))
def test_extended_presets_are_the_papers_on_another_backbone(preset):
    paper, backbone, width = EXTENDED[preset]
    assert training.NEWER_BACKBONE_PRESETS[preset] == (paper, backbone)
    new, old = training.PRESETS[preset], training.PRESETS[paper]
    code_dim = round(old["code_dim"] * width / PAPER_WIDTH[paper])  # 90 / 100 / 70, 187 for the ViT-L
    assert new["backbone"] == backbone and new["code_dim"] == code_dim
    assert {k: v for k, v in new.items() if k not in ("backbone", "code_dim")} == \
        {k: v for k, v in old.items() if k not in ("backbone", "code_dim")}
    dims = sweep.STUDY_DIMS[preset]
    assert dims[0] == width and code_dim in dims and dims[-1] == 3
    assert set(dims) - {width, code_dim} == {3 * 2 ** k for k in range(12) if 3 * 2 ** k < width}
    assert sweep.STUDY_METHODS[preset] == sweep.STUDY_METHODS[paper]
    runs = sweep.study_grid(preset).runs()
    probes_only = len(sweep.STUDY_METHODS[paper]) - 1  # the DINO baseline runs once
    assert len(runs) == probes_only * len(dims) + 1
    assert {r.config["backbone"] for r in runs} == {backbone}
    cfg = training.make_config(preset)
    assert (cfg.dataset, cfg.backbone, cfg.code_dim) == (paper, backbone, code_dim)


# -------------------------------------------------------------------------------------------------- cost model


def test_newer_backbone_costs_by_hand():
    # DINOv3 ViT-L/16 at 224 px: 14 x 14 patches + CLS + 4 registers, width 1024, 24 blocks
    n, c = 196 + 5, 1024
    assert costs.block_gflops("dinov3_vitl16_sat", 224) == pytest.approx(24 * (24 * n * c * c + 4 * n * n * c) / 1e9)
    # DINOv2 ViT-B/14 with registers: 16 x 16 + 5 tokens; the plain one 16 x 16 + 1
    for name, prefix in (("dinov2_vitb14_reg", 5), ("dinov2_vitb14", 1)):
        n, c = 256 + prefix, 768
        assert costs.block_gflops(name, 224) == pytest.approx(12 * (24 * n * c * c + 4 * n * n * c) / 1e9)
    # ViT-B/16 (DINO): 17.6 GMACs at 224 px as commonly quoted, i.e. about 35 GFLOPs
    assert costs.block_gflops("dino_vitb16", 224) == pytest.approx(35.2, rel=0.02)
    # evaluation size: the patch multiple nearest 320
    assert costs.eval_res("dinov2_vits14") == 322 and costs.eval_res("dinov3_vitb16") == 320
    assert costs.eval_res("dino_vits8") == 320
    # feature store item: float16 tokens + RGB + int16 label + index
    assert costs.feature_bytes_per_image("dinov2_vitb14_reg", 322) == 23 * 23 * 768 * 2 + 322 * 322 * 5 + 8
    # throughput scales the measured ViT-B/8 anchor by the FLOPs ratio
    ratio = costs.vit_flops("dino_vitb8", 224) / costs.vit_flops("dinov3_vitl16", 224)
    assert costs.throughput("dinov3_vitl16", 224) == pytest.approx(2112.0 * ratio)
    # one paper run on another backbone: the validation store at the backbone's evaluation size
    c = costs.dataset_costs("cocostuff27", backbone="dinov2_vitb14_reg")
    assert c["backbone"] == "dinov2_vitb14_reg"
    assert c["feature_store_bytes"] == 49_629 * 5 * costs.feature_bytes_per_image("dinov2_vitb14_reg", 224) + \
        2_175 * costs.feature_bytes_per_image("dinov2_vitb14_reg", 322)
    assert costs.dataset_costs("potsdam") == costs.dataset_costs("potsdam", backbone="dino_vits8")
    with pytest.raises(StegoError, match="backbone"):
        costs.dataset_costs("potsdam", backbone="resnet50")


def test_backbone_table_and_extended_sweeps():
    table = costs.backbone_table(["potsdam"])
    assert list(table["backbone"]) == ["dino_vits8", "dinov2_vits14_reg", "dinov3_vits16", "dinov3_vitl16_sat"]
    assert list(table["preset"]) == ["potsdam", "potsdam_dinov2", "potsdam_dinov3", "potsdam_dinov3_sat"]
    assert set(table["basis"]) == {"estimate: scaled by FLOPs"}  # the anchor (ViT-B/8) is not among them
    sat = costs.study_hours("potsdam_dinov3_sat")
    assert sat["runs"] == 3 * 11 + 1  # STEGO, PCA, RP at 11 dims + the DINO baseline
    row = table.set_index("backbone").loc["dinov3_vitl16_sat"]
    assert row["sweep GPU h"] == pytest.approx(sat["total_h"]) and row["C"] == 1024 and row["blocks"] == 24
    full = costs.backbone_table(["cocostuff27"], ["dino_vitb8", "dinov2_vits14"])
    assert full.iloc[0]["basis"].startswith("anchor") and full.iloc[0]["FLOPs vs ViT-B/8"] == pytest.approx(1.0)
    assert full.iloc[0]["images/s"] == pytest.approx(2112.0)
    assert full.iloc[1]["preset"] == "" and math.isnan(full.iloc[1]["sweep GPU h"])
    with pytest.raises(StegoError, match="dataset"):
        costs.study_hours("demo")


# ---------------------------------------------------------------------------------------------------- profiles
# what an extended profile may change against the paper's profile of its dataset
PATCH_14_VAL = 322  # the multiple of 14 nearest the paper's 320 px


@pytest.mark.parametrize("profile", sorted(EXTENDED))
def test_extended_profiles_are_the_papers_but_for_the_backbone(profile):
    paper, backbone, _ = EXTENDED[profile]
    runs = study.load_profile(profile)  # every parameter exists in its notebook, with the right type
    ours = yaml.safe_load(study.profile_path(profile).read_text())
    theirs = yaml.safe_load(study.profile_path(paper).read_text())
    assert ours["parameters"]["backbone"] == backbone and ours["parameters"]["preset"] == profile
    assert ours["parameters"]["weights"] is None and ours["parameters"]["device"] == "cuda"
    val_res = PATCH_14_VAL if backbone.startswith("dinov2") else 320
    assert ours["parameters"]["val_res"] == val_res
    changed = {"backbone": backbone, "preset": profile, "val_res": val_res}
    assert {k: v for k, v in ours["parameters"].items() if k not in changed} == \
        {k: v for k, v in theirs["parameters"].items() if k not in changed}
    assert [e["notebook"] for e in ours["notebooks"]] == [e["notebook"] for e in theirs["notebooks"]]
    for mine, paper_entry in zip(ours["notebooks"], theirs["notebooks"]):
        a, b = dict(mine.get("parameters") or {}), dict(paper_entry.get("parameters") or {})
        if mine["notebook"] == "04_evaluate":  # the evaluation size is the validation size
            assert a.pop("res") == val_res and b.pop("res") == 320
        assert a == b, mine["notebook"]
    stride = 14 if backbone.startswith("dinov2") else 16
    for nb, params in runs:
        for key in ("res", "val_res", "cache_res"):
            if isinstance(params.get(key), int) and params[key]:
                assert params[key] % stride == 0, (nb, key)
        if "preset" in params:
            assert params["preset"] == profile, nb
