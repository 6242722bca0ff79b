"""Tests of stego_core.costs: each number re-derived by hand from the stated assumptions."""
from __future__ import annotations

import pytest

from stego_core import costs
from stego_core.config import StegoError


def test_feature_bytes_by_hand():
    # ViT-B/8 at 224: 28*28 tokens * 768 channels * 2 bytes + 224*224*(3 + 2) bytes + 8
    assert costs.feature_bytes_per_image("dino_vitb8", 224) == 784 * 768 * 2 + 224 * 224 * 5 + 8
    # ViT-S/8 at 320: 40*40 tokens * 384 * 2 + 320*320*5 + 8
    assert costs.feature_bytes_per_image("dino_vits8", 320) == 1600 * 384 * 2 + 320 * 320 * 5 + 8


def test_throughput_scales_with_flops():
    # measured on an H200, ViT-B/8 at 224 px (architecture notes, "Scale"); typed here, not read from costs
    ref = {"fp32": 255.0, "bf16": 2112.0}
    assert costs.REFERENCE["images_per_s"] == ref and costs.REFERENCE["backbone"] == "dino_vitb8"
    assert costs.throughput("dino_vitb8", 224, "bf16") == pytest.approx(ref["bf16"])
    assert costs.throughput("dino_vitb8", 224, "fp32") == pytest.approx(ref["fp32"])
    # 320 px: N = 1601 vs 785 tokens; per block 24 N C^2 + 4 N^2 C
    c = 768
    ratio = (24 * 785 * c * c + 4 * 785 ** 2 * c) / (24 * 1601 * c * c + 4 * 1601 ** 2 * c)
    assert costs.throughput("dino_vitb8", 320, "bf16") == pytest.approx(ref["bf16"] * ratio)
    assert costs.throughput("dino_vitb8", 320) == pytest.approx(ref["fp32"] * ratio)  # 01_features' precision
    assert costs.throughput("dino_vits8", 224) > 3 * costs.throughput("dino_vitb8", 224)  # ~4x fewer FLOPs


def test_step_seconds():
    assert costs.step_seconds("dino_vitb8", 32, "cache") == pytest.approx(0.014)
    assert costs.step_seconds("dino_vitb8", 32, "live", "fp32") == pytest.approx(0.270)
    assert costs.step_seconds("dino_vitb8", 16, "live", "bf16") == pytest.approx(0.024)
    small = costs.step_seconds("dino_vits8", 32, "live", "bf16")
    assert 0.014 < small < 0.048  # a lighter backbone: between cached and live ViT-B


def test_dataset_costs_by_hand():
    c = costs.dataset_costs("cocostuff27")
    n_train, n_val = 49_629 * 5, 2_175
    assert costs.throughput("dino_vitb8", 224) == pytest.approx(255.0)  # the default is fp32, as 01_features
    assert c["train_items"] == n_train and c["val_images"] == n_val
    assert c["feature_store_bytes"] == n_train * costs.feature_bytes_per_image("dino_vitb8", 224) + \
        n_val * costs.feature_bytes_per_image("dino_vitb8", 320)
    assert c["knn_bytes"] == n_train * 30 * 8
    assert c["train_gpu_s"] == pytest.approx(7000 * 0.014)
    assert c["eval_gpu_s"] == pytest.approx(2 * n_val / costs.throughput("dino_vitb8", 320))
    assert c["five_crop_bytes"] == int(49_629 * 5 * 240 * 320 * 1.65 / 8)
    potsdam = costs.dataset_costs("potsdam")
    assert potsdam["five_crop_bytes"] == 0 and potsdam["train_items"] == 4_545
    assert potsdam["train_gpu_s"] == pytest.approx(5000 * 0.014 / 2)  # batch 16
    live = costs.dataset_costs("cityscapes", source="live", precision="fp32")
    assert live["feature_store_bytes"] == 0
    assert live["cache_gpu_s"] == pytest.approx(2_975 * 5 / 255.0)  # the kNN pass over the training crops
    assert live["train_gpu_s"] == pytest.approx(7000 * 0.270)


def test_table_and_sweep():
    table = costs.cost_table()
    assert list(table["dataset"]) == ["cocostuff27", "cityscapes", "potsdam"]
    row = table.iloc[0]
    parts = row["download GB"] + row["five-crop GB"] + row["feature store GB"] + row["kNN MB"] / 1000
    assert row["disk total GB"] == pytest.approx(parts)
    gpu = row["caching GPU min"] + row["training GPU min"] + row["validation GPU min"] + row["evaluation GPU min"]
    assert row["GPU total min"] == pytest.approx(gpu)
    sweep = costs.study_hours("potsdam")
    parts = sweep["cache_h"] + sweep["train_h"] + sweep["validation_h"] + sweep["eval_h"] + sweep["disk_read_h"]
    assert sweep["runs"] > 10 and sweep["total_h"] == pytest.approx(parts)
    one = costs.dataset_costs("potsdam")  # every run reads its batches and validation passes again
    reads = one["cache_read_bytes"] + sweep["runs"] * (one["train_read_bytes"] + one["val_read_bytes"])
    assert sweep["disk_read_h"] == pytest.approx(reads / 2e9 / 3600)
    assert sweep["validation_h"] == pytest.approx(sweep["runs"] * one["val_gpu_s"] / 3600)
    assert costs.study_hours("potsdam", seeds=2)["runs"] == 2 * sweep["runs"]
    # fused: the training batches are read once per group (per seed: the STEGO heads, the probe-only runs)
    fused = costs.study_hours("potsdam", seeds=2, fused=True)
    assert fused["train_reads"] == 4 and sweep["train_reads"] == sweep["runs"]
    reads = one["cache_read_bytes"] + 4 * one["train_read_bytes"] + fused["runs"] * one["val_read_bytes"]
    assert fused["disk_read_h"] == pytest.approx(reads / 2e9 / 3600)
    assert fused["train_h"] == pytest.approx(2 * sweep["train_h"])


def test_bad_input_and_formatting():
    with pytest.raises(StegoError, match="backbone"):
        costs.throughput("resnet50", 224)
    with pytest.raises(StegoError, match="precision"):
        costs.dataset_costs("potsdam", precision="fp8")
    with pytest.raises(StegoError, match="dataset"):
        costs.dataset_costs("mosaic")
    assert costs.format_bytes(999) == "999 B" and costs.format_bytes(1_234_567) == "1.2 MB"


def test_validations_and_disk_reads_by_hand():
    item224 = costs.feature_bytes_per_image("dino_vitb8", 224)
    item320 = costs.feature_bytes_per_image("dino_vitb8", 320)
    c = costs.dataset_costs("cocostuff27")
    # one epoch of 248,145 crops / batch 32 = 7,755 batches outlasts 7,000 steps: a validation every 100 steps
    assert c["validations"] == 70 == costs.n_validations("cocostuff27")
    assert c["val_gpu_s"] == pytest.approx(70 * 2_175 * 0.014 / 32)
    assert c["train_read_bytes"] == 7000 * 2 * 32 * item224  # batch + one partner per item, whole store items
    assert c["val_read_bytes"] == 70 * 2_175 * item320  # the whole validation store every validation
    assert c["cache_read_bytes"] == c["five_crop_bytes"] + 2_175 * (152_000 + 5_000)
    assert c["read_s"] == pytest.approx((c["cache_read_bytes"] + c["train_read_bytes"] + c["val_read_bytes"]) / 2e9)
    # Cityscapes: 14,875 crops / 32 = 465 batches per epoch, 4 validations in each of 15 whole epochs
    assert costs.dataset_costs("cityscapes")["validations"] == 60
    # Potsdam: 4,545 / 16 = 285 batches per epoch: 2 per epoch, 17 whole epochs + step 100 of the 18th
    assert costs.dataset_costs("potsdam")["validations"] == 35
    assert costs.dataset_costs("potsdam", protocol="corrected")["validations"] == 50  # every 100 steps
    live = costs.dataset_costs("potsdam", source="live")
    per_pass = 855 * 0.014 / 32 + 855 / costs.throughput("dino_vits8", 320, "fp32")
    assert live["val_gpu_s"] == pytest.approx(35 * per_pass)  # live: the backbone runs at every validation
    assert live["val_read_bytes"] == 35 * 855 * 2 * 160_000 and live["feature_store_bytes"] == 0
    row = costs.cost_table(["cocostuff27"]).iloc[0]
    gpu = row["caching GPU min"] + row["training GPU min"] + row["validation GPU min"] + row["evaluation GPU min"]
    assert row["GPU total min"] == pytest.approx(gpu)
    assert row["wall total min"] == pytest.approx(gpu + c["read_s"] / 60)
    assert row["disk reads GB"] == pytest.approx(c["read_bytes"] / 1e9)


def test_potsdam_feature_store_by_hand():
    """Worked by hand from the store layout (float16 tokens, uint8 RGB, int16 label, int64 index per item):
    ViT-S/8 (C 384) at 224 px -> 28x28 tokens for the 4,545 training images; at 320 px -> 40x40 for the 855
    validation images."""
    train_item = 28 * 28 * 384 * 2 + 224 * 224 * 3 + 224 * 224 * 2 + 8  # 853,000 bytes
    val_item = 40 * 40 * 384 * 2 + 320 * 320 * 3 + 320 * 320 * 2 + 8  # 1,740,808 bytes
    assert costs.cost_table(["potsdam"])["feature store GB"].iloc[0] == pytest.approx(
        (4545 * train_item + 855 * val_item) / 1e9)
