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
    # (H200 anchors: 255 images/s in fp32, the default as 01_features extracts; 2112 in bf16 with fused attention)
    assert costs.throughput("dinov3_vitl16", 224) == pytest.approx(255.0 * ratio)
    assert costs.throughput("dinov3_vitl16", 224, "bf16") == pytest.approx(2112.0 * ratio)
    # one paper run on another backbone: the validation store at the backbone's evaluation size
    c = costs.dataset_costs("cocostuff27", backbone="dinov2_vitb14_reg")
    assert c["backbone"] == "dinov2_vitb14_reg"
    assert c["feature_store_bytes"] == 49_629 * 5 * costs.feature_bytes_per_image("dinov2_vitb14_reg", 224) + \
        2_175 * costs.feature_bytes_per_image("dinov2_vitb14_reg", 322)
    assert costs.dataset_costs("potsdam") == costs.dataset_costs("potsdam", backbone="dino_vits8")
    with pytest.raises(StegoError, match="backbone"):
        costs.dataset_costs("potsdam", backbone="resnet50")


def test_cost_model_shapes_agree_with_the_registry():
    from stego_core.backbones import NEWER_VITS

    for name, spec in NEWER_VITS.items():
        width, patch, blocks = costs.BACKBONE_SHAPES[name]
        assert (width, patch) == (spec.dim, spec.stride) and costs.PREFIX_TOKENS.get(name, 1) == 1 + spec.registers
        assert blocks == (24 if "vitl" in name else 12), name  # ViT-L has 24 blocks, ViT-S/B 12


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
    assert full.iloc[0]["images/s"] == pytest.approx(255.0)  # fp32, the default
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


# ----------------------------------------------------------------------------------------------- results page
def _table(rows):
    """A dimension_table-shaped frame from (dataset, backbone, method, D, probe, mean) tuples (mIoU, one seed)."""
    import pandas as pd

    from stego_core.book import figures

    return pd.DataFrame([{"dataset": d, "backbone": b, "method": m, "series": figures.SERIES_LABELS[m], "code_dim": k,
                          "protocol": "original", "probe": p, "metric": "mIoU", "mean": v, "std": 0.0, "lo": v,
                          "hi": v, "n_seeds": 1, "best_step": 100} for d, b, m, k, p, v in rows])


def _cells(dataset, backbone, stego, pca, rp, raw, width):
    rows = [(dataset, backbone, "dino", width, p, raw) for p in ("cluster", "linear")]
    for method, values in (("stego", stego), ("pca", pca), ("rp", rp)):
        rows += [(dataset, backbone, method, d, p, v) for d, v in values.items() for p in ("cluster", "linear")]
    return rows


def test_findings_never_mix_backbones_and_compare_per_backbone():
    from stego_core.book import figures

    paper = _cells("potsdam", "dino_vits8", {3: 40.0, 6: 45.0}, {3: 30.0, 6: 50.0}, {3: 20.0, 6: 25.0}, 35.0, 384)
    newer = _cells("potsdam", "dinov3_vits16", {3: 60.0, 6: 62.0}, {3: 61.0, 6: 63.0}, {3: 10.0, 6: 70.0}, 55.0, 384)
    other = _cells("cityscapes", "dino_vitb8", {3: 1.0}, {3: 2.0}, {3: 3.0}, 4.0, 768)
    table = _table(paper + newer + other)
    # the paper's backbone is quoted by default; the DINOv3 numbers only when asked for
    f = figures.dimension_findings(table, "potsdam")
    assert f["backbone"] == "dino_vits8" and f["stego_cluster_min"] == 40.0 and f["stego_beats_pca_cluster"] == 1
    g = figures.dimension_findings(table, "potsdam", "dinov3_vits16")
    assert (g["stego_cluster_min"], g["pca_cluster_min"], g["stego_beats_pca_cluster"], g["stego_beats_rp_cluster"]) \
        == (60.0, 61.0, 0, 1)
    assert g["dino_cluster"] == 55.0 and g["stego_cluster_best"] == 62.0
    with pytest.raises(StegoError, match="backbone"):
        figures.dimension_findings(table, "potsdam", "dinov2_vits14")
    # the page's rows: only datasets with a newer backbone, with all their backbones, the paper's first
    rows = figures.extended_study_rows(table)
    assert set(rows["dataset"]) == {"potsdam"} and set(rows["backbone"]) == {"dino_vits8", "dinov3_vits16"}
    comparison = figures.backbone_comparison(rows)
    assert list(comparison["backbone"]) == ["dino_vits8", "dinov3_vits16"]
    assert list(comparison["STEGO above PCA (dims)"]) == ["1 of 2", "0 of 2"]
    assert list(comparison["STEGO above RP (dims)"]) == ["2 of 2", "1 of 2"]
    assert list(comparison["PCA cluster mIoU at smallest D"]) == [30.0, 61.0]
    assert "potsdam (dino_vits8, dinov3_vits16)" in figures.extended_study_status(rows)
    # a store without newer backbones: nothing to show, and the status says what to do
    none = figures.extended_study_rows(_table(paper))
    assert none.empty and "commands below" in figures.extended_study_status(none)


def test_registry_table_for_the_book():
    from stego_core.backbones import newer_vits_table

    table = newer_vits_table()
    row = table.set_index("backbone").loc["dinov2_vitb14_reg"]
    assert (row["patch"], row["C"], row["CLS + registers"], row["tokens at 224 px"]) == (14, 768, 5, 256)
    assert row["offline weights file"] == "dinov2_vitb14_reg4_pretrain.pth"
    assert table.set_index("backbone").loc["dinov3_vitl16_sat", "input statistics"] == "SAT-493M"
    assert len(table) == 8


@pytest.mark.slow
def test_smoke_book_explains_the_extended_study(smoke_html):
    """The smoke book has no extended-study runs: the page states the question, lists the backbones and gives the
    command, with no comparison numbers; the cost chapter adds the newer backbones' (estimated) rows."""
    import re

    import nbformat
    from chapters import glued

    html = (smoke_html / "book" / "results" / "newer_backbones.html").read_text()
    text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", re.sub(r"<(script|style).*?</\1>", " ", html, flags=re.S)))
    assert "Beyond the paper: newer backbones" in text
    assert "holds no dimension-study runs on a DINOv2 or DINOv3 backbone" in text
    assert "No rows yet." in text and "stego-chart" not in html  # no comparison, no chart
    assert "stego-study book --profile cocostuff27_dinov3" in text
    for name, tag in (("dinov2_vitb14_reg", "vit_base_patch14_reg4_dinov2.lvd142m"),
                      ("dinov3_vitl16_sat", "vit_large_patch16_dinov3.sat493m")):
        assert name in text and tag in text
    nb = nbformat.read(smoke_html.parents[1] / "book" / "chapters" / "08_costs.ipynb", as_version=4)
    hours = float(glued(nb)["extended_sweep_hours"])
    expected = sum(costs.study_hours(p)["total_h"] for p in ("potsdam_dinov2", "potsdam_dinov3", "potsdam_dinov3_sat"))
    assert int(glued(nb)["extended_presets"]) == 3 and hours == pytest.approx(expected)
