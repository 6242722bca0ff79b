"""The DINOv2 / DINOv3 backbones of the extended study (issue 17): registry against timm, patch-feature layout
against timm's own forward_intermediates / forward_features, each family's rule for other input sizes, weight-file
layouts against timm's converters of the official checkpoints, clear errors, and one small end-to-end run per
family (feature store, kNN, STEGO training, a PCA run, the paper's evaluation). Random weights, CPU, tiny inputs."""
from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from stego_core import StegoError, cache, evaluation, knn, training
from stego_core.backbones import (
    BACKBONES,
    NEWER_BACKBONES,
    NEWER_VITS,
    extract_features,
    interpolate_pos_embed,
    load_backbone,
    resample_dinov2_pos_embed,
)
from stego_core.segmenter import Segmenter

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

# name -> (timm tag, width C, patch, register tokens), typed from timm 1.0.31's list_pretrained and model cards
EXPECTED = {
    "dinov2_vits14": ("vit_small_patch14_dinov2.lvd142m", 384, 14, 0),
    "dinov2_vitb14": ("vit_base_patch14_dinov2.lvd142m", 768, 14, 0),
    "dinov2_vits14_reg": ("vit_small_patch14_reg4_dinov2.lvd142m", 384, 14, 4),
    "dinov2_vitb14_reg": ("vit_base_patch14_reg4_dinov2.lvd142m", 768, 14, 4),
    "dinov3_vits16": ("vit_small_patch16_dinov3.lvd1689m", 384, 16, 4),
    "dinov3_vitb16": ("vit_base_patch16_dinov3.lvd1689m", 768, 16, 4),
    "dinov3_vitl16": ("vit_large_patch16_dinov3.lvd1689m", 1024, 16, 4),
    "dinov3_vitl16_sat": ("vit_large_patch16_dinov3.sat493m", 1024, 16, 4),
}

_BUILT: dict[tuple[str, str], torch.nn.Module] = {}


def _backbone(name: str, protocol: str = "original"):
    """Each random backbone is built once per session (the ViT-Ls take seconds)."""
    if (name, protocol) not in _BUILT:
        torch.manual_seed(sum(map(ord, name)))
        _BUILT[(name, protocol)] = load_backbone(name, "random", protocol=protocol)
    return _BUILT[(name, protocol)]


def _timm_reference(bb, pos_embed=None, **kwargs):
    """DINOv2: the same architecture built by timm for other input sizes, holding the backbone's weights (and the
    positional table given). DINOv3: the backbone's own timm module, which timm builds for any size."""
    import timm

    if bb.family == "dinov3":
        return bb.vit
    ref = timm.create_model(NEWER_VITS[bb.name].timm_name.split(".")[0], pretrained=False, **kwargs).eval()
    sd = dict(bb.vit.state_dict())
    if pos_embed is not None:
        sd["pos_embed"] = pos_embed
    ref.load_state_dict(sd)
    return ref


def _net_input(name: str, img: torch.Tensor) -> torch.Tensor:
    """ImageNet-normalised img -> the statistics of timm's pretrained config of this tag (the satellite DINOv3's
    differ)."""
    import timm

    cfg = timm.models.get_pretrained_cfg(NEWER_VITS[name].timm_name)
    mean, std = torch.tensor(cfg.mean).view(1, 3, 1, 1), torch.tensor(cfg.std).view(1, 3, 1, 1)
    return (img * IMAGENET_STD + IMAGENET_MEAN - mean) / std


def test_registry_maps_names_to_timm_tags():
    import timm

    assert set(NEWER_VITS) == set(EXPECTED) and set(NEWER_BACKBONES) == set(EXPECTED)
    assert set(EXPECTED) <= set(BACKBONES)
    for name, (tag, dim, patch, registers) in EXPECTED.items():
        spec = BACKBONES[name]
        assert (spec.timm_name, spec.dim, spec.stride, spec.registers) == (tag, dim, patch, registers), name
        assert tag in timm.list_pretrained(tag.split(".")[0] + "*"), tag
        cfg = timm.models.get_pretrained_cfg(tag)
        assert (tuple(spec.mean), tuple(spec.std)) == (tuple(cfg.mean), tuple(cfg.std)), name
    assert NEWER_VITS["dinov3_vitl16_sat"].mean != NEWER_VITS["dinov3_vitl16"].mean  # satellite statistics


# ViT-B and ViT-L take seconds each to build on a CPU: they run with the slow tests
SIZES = [pytest.param(n, marks=pytest.mark.slow) if "vits" not in n else n for n in EXPECTED]


@pytest.mark.parametrize("name", SIZES)
def test_features_match_timm(name):
    """Shape [B, C, h, w] on a non-square input and the patch grid of timm's own passes: forward_intermediates
    (NCHW, final norm) and forward_features (prefix tokens dropped by hand, row-major reshape)."""
    tag, dim, patch, registers = EXPECTED[name]
    bb = _backbone(name)
    assert bb.registers == registers and bb.weights == "random"
    assert all(not p.requires_grad for p in bb.parameters())
    bb.train(True)
    assert not bb.training
    torch.manual_seed(3)
    img = torch.randn(2, 3, 2 * patch, 3 * patch)
    feats = extract_features(bb, img)
    assert feats.shape == (2, dim, 2, 3) and feats.dtype == torch.float32
    if name.startswith("dinov2") and registers == 0:
        # DINOv2's own rule for the plain models: a timm model built for this grid with the table resized by hand
        pos = bb.vit.pos_embed.detach()
        grid = pos[:, 1:].reshape(1, 37, 37, dim).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, scale_factor=(2.1 / 37, 3.1 / 37), mode="bicubic", align_corners=False)
        table = torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, 6, dim)], dim=1)
        ref = _timm_reference(bb, table, img_size=(2 * patch, 3 * patch))
    else:
        ref = _timm_reference(bb, dynamic_img_size=True)  # timm's resize = DINOv2's for the register models
    x = _net_input(name, img)
    with torch.no_grad():
        (inter,) = ref.forward_intermediates(x, indices=1, norm=True, output_fmt="NCHW", intermediates_only=True)
        tokens = ref.forward_features(x)  # [B, 1 + R + 6, C]
    assert tokens.shape[1] == 1 + registers + 6
    torch.testing.assert_close(feats, inter, rtol=1e-5, atol=1e-5)
    by_hand = tokens[:, 1 + registers:].reshape(2, 2, 3, dim).permute(0, 3, 1, 2)  # [B,h*w,C] -> [B,C,h,w]
    torch.testing.assert_close(feats, by_hand, rtol=1e-5, atol=1e-5)


def test_dinov2_resize_rules():
    torch.manual_seed(4)
    pos = torch.randn(1, 1 + 37 * 37, 8)
    # "offset" is DINO's rule: the study's interpolate_pos_embed (golden-checked) on square grids
    for g in (16, 23, 40):
        torch.testing.assert_close(resample_dinov2_pos_embed(pos, g, g), interpolate_pos_embed(pos, g, g))
    # "exact" is timm's dynamic-size rule (exact size, bicubic, antialiased)
    from timm.layers import resample_abs_pos_embed

    for gh, gw in ((16, 16), (16, 23), (50, 40)):
        torch.testing.assert_close(resample_dinov2_pos_embed(pos, gh, gw, rule="exact"),
                                   resample_abs_pos_embed(pos, (gh, gw), num_prefix_tokens=1))
        patch_only = pos[:, 1:]  # timm's register models keep no CLS entry
        torch.testing.assert_close(resample_dinov2_pos_embed(patch_only, gh, gw, n_prefix=0, rule="exact"),
                                   resample_abs_pos_embed(patch_only, (gh, gw), num_prefix_tokens=0))
    assert resample_dinov2_pos_embed(pos, 37, 37) is pos
    # non-square, offset rule: rows keep the row-major order (a table constant along columns stays so)
    rows = torch.arange(37.0).view(1, 37, 1, 1).expand(1, 37, 37, 2).reshape(1, 37 * 37, 2)
    table = torch.cat([torch.zeros(1, 1, 2), rows], dim=1)
    out = resample_dinov2_pos_embed(table, 20, 12)[:, 1:].reshape(20, 12, 2)
    assert torch.allclose(out, out[:, :1].expand_as(out), atol=1e-4) and out[-1, 0, 0] > out[0, 0, 0]
    with pytest.raises(StegoError, match="rule"):
        resample_dinov2_pos_embed(pos, 4, 4, rule="nearest")
    with pytest.raises(StegoError, match="pos_embed"):
        resample_dinov2_pos_embed(torch.randn(1, 1 + 15, 4), 4, 4)
    with pytest.raises(StegoError, match="grid_w"):
        resample_dinov2_pos_embed(pos, 4, 0)


def test_protocols_per_family():
    """Plain DINOv2: "corrected" switches DINO's resize for the exact one (different numbers off the native grid);
    the register models already use the exact one, and DINOv3 resizes nothing, so the protocol changes nothing."""
    img = torch.randn(1, 3, 28, 42)
    for name, differs in (("dinov2_vits14", True), ("dinov2_vits14_reg", False), ("dinov3_vits16", False)):
        original = _backbone(name)
        corrected = type(original)(original.vit, name, protocol="corrected")
        x = img if name.startswith("dinov2") else torch.randn(1, 3, 32, 48)
        same = torch.equal(extract_features(original, x), extract_features(corrected, x))
        assert same is not differs, name
    assert _backbone("dinov2_vits14").pos_rule == "offset" and _backbone("dinov2_vits14_reg").pos_rule == "exact"
    assert _backbone("dinov3_vits16").pos_rule == "rope" and getattr(_backbone("dinov3_vits16").vit, "pos_embed",
                                                                     None) is None


def test_flip_and_amp_work():
    bb = _backbone("dinov3_vits16")
    img = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        manual = (bb(img) + torch.flip(bb(torch.flip(img, dims=[3])), dims=[3])) / 2
    torch.testing.assert_close(extract_features(bb, img, flip=True), manual)
    full, half = extract_features(bb, img), extract_features(bb, img, amp=True)
    assert half.dtype == torch.float32 and 0 < ((half - full).norm() / full.norm()).item() < 0.05


def test_input_sizes_must_be_patch_multiples(tmp_path):
    with pytest.raises(StegoError, match="img: height and width must be positive multiples of 14 for dinov2_vits14"):
        extract_features(_backbone("dinov2_vits14"), torch.randn(1, 3, 28, 32))
    with pytest.raises(StegoError, match="multiples of 16"):
        extract_features(_backbone("dinov3_vits16"), torch.randn(1, 3, 28, 28))
    # the feature store refuses the resolution before building anything, naming the parameter
    with pytest.raises(StegoError, match=r"^res: 320 px is not a multiple of 14, the patch size of dinov2_vitb14; "
                                         r"expected a multiple such as 308 or 322$"):
        cache.cache_features("mosaic", "val", "dinov2_vitb14", res=320, root=tmp_path, progress=False)
    with pytest.raises(StegoError, match="res: 56 px is not a multiple of 16.*48 or 64"):
        cache.cache_features("mosaic", "val", "dinov3_vitl16_sat", res=56, root=tmp_path, progress=False)
    assert not (tmp_path / "features").exists() or not any((tmp_path / "features").iterdir())


# ---------------------------------------------------------------------------------------------------------- weights


def _official_dinov2(bb) -> dict[str, torch.Tensor]:
    """A state dict in the layout of the official DINOv2 hub checkpoints (dinov2_vits14[_reg4]_pretrain.pth),
    built from the timm model: CLS position inside pos_embed, register_tokens, mask_token, no reg_token."""
    sd = {k: v.clone() for k, v in bb.vit.state_dict().items()}
    sd["mask_token"] = torch.zeros(1, bb.dim)
    if "reg_token" in sd:
        cls_pos = torch.randn(1, 1, bb.dim)
        sd["register_tokens"] = sd.pop("reg_token")
        sd["cls_token"] = sd["cls_token"] - cls_pos
        sd["pos_embed"] = torch.cat([cls_pos, sd["pos_embed"]], dim=1)
    return sd


def _official_dinov3(bb, *, sat: bool = False) -> dict[str, torch.Tensor]:
    """A state dict in the layout of the official DINOv3 checkpoints: storage_tokens, ls1/ls2.gamma, a masked qkv
    bias (zero query and value thirds, arbitrary key third), mask_token, rope_embed.periods (+ local_cls_norm)."""
    out = {}
    for k, v in bb.vit.state_dict().items():
        k = k.replace("reg_token", "storage_tokens").replace("gamma_1", "ls1.gamma").replace("gamma_2", "ls2.gamma")
        out[k] = v.clone()
        if k.endswith("attn.qkv.weight"):
            bias = torch.zeros(v.shape[0])
            bias[bb.dim:2 * bb.dim] = torch.randn(bb.dim)  # the key third, masked out by DINOv3
            mask = torch.ones(v.shape[0])
            mask[bb.dim:2 * bb.dim] = 0
            out[k.replace("weight", "bias")], out[k.replace("weight", "bias_mask")] = bias, mask
    out["mask_token"] = torch.zeros(1, bb.dim)
    out["rope_embed.periods"] = torch.rand(bb.dim // bb.vit.blocks[0].attn.num_heads // 4)
    if sat:
        out["local_cls_norm.weight"], out["local_cls_norm.bias"] = torch.ones(bb.dim), torch.zeros(bb.dim)
    return out


@pytest.mark.parametrize("name", ["dinov2_vits14", "dinov2_vits14_reg"])
def test_dinov2_weight_layouts(name, tmp_path):
    from safetensors.torch import save_file
    from timm.models.vision_transformer import checkpoint_filter_fn

    bb = _backbone(name)
    img = torch.randn(1, 3, 28, 42)
    ref = extract_features(bb, img)
    official = _official_dinov2(bb)
    # timm's own converter of the official layout agrees with the state dict the backbone holds
    converted = checkpoint_filter_fn({k: v.clone() for k, v in official.items()}, bb.vit)
    assert set(converted) == set(bb.vit.state_dict())
    for k, v in bb.vit.state_dict().items():
        torch.testing.assert_close(converted[k], v, rtol=0, atol=1e-6)
    files = {"official": tmp_path / f"{name}_pretrain.pth", "timm": tmp_path / "model.safetensors",
             "teacher": tmp_path / "teacher_checkpoint.pth", "training": tmp_path / "model_0012499.rank_0.pth"}
    torch.save(official, files["official"])
    save_file({k: v.contiguous() for k, v in bb.vit.state_dict().items()}, str(files["timm"]))
    # eval checkpoint of DINOv2 training: backbone. prefixes, blocks in 4 chunks (blocks.<chunk>.<N>.), DINO head
    chunked = {}
    for k, v in official.items():
        if k.startswith("blocks."):
            n = int(k.split(".")[1])
            k = f"blocks.{n // 3}.{n}." + k.split(".", 2)[2]
        chunked[f"backbone.{k}"] = v
    chunked["dino_head.mlp.0.weight"] = torch.randn(4, bb.dim)
    torch.save({"teacher": chunked}, files["teacher"])
    torch.save({"model": {**{f"teacher.{k}": v for k, v in chunked.items()},
                          **{f"student.{k}": v * 0 for k, v in chunked.items()}}, "iteration": 12499},
               files["training"])
    for layout, path in files.items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loaded = load_backbone(name, path)
        # (the register models' CLS token is a sum of two official tensors: equal up to float rounding)
        torch.testing.assert_close(extract_features(loaded, img), ref, rtol=0, atol=1e-5, msg=layout)
        assert loaded.weights == str(path)
        assert any("non-backbone" in str(w.message) for w in caught) == (layout in ("teacher", "training")), layout
    # a file of the other variant (with / without registers) is refused with the architecture named
    other = "dinov2_vits14" if name.endswith("_reg") else "dinov2_vits14_reg"
    with pytest.raises(StegoError, match="registers"):
        load_backbone(other, files["official"])
    with pytest.raises(StegoError, match="shape"):
        load_backbone(name.replace("vits14", "vitb14"), files["official"])


def test_dinov3_weight_layouts(tmp_path):
    from timm.models.eva import checkpoint_filter_fn

    bb = _backbone("dinov3_vits16")
    img = torch.randn(1, 3, 32, 48)
    ref = extract_features(bb, img)
    official = _official_dinov3(bb, sat=True)
    # timm's converter of the official layout drops and renames what ours does
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted = checkpoint_filter_fn({k: v.clone() for k, v in official.items()}, bb.vit)
    assert set(converted) == set(bb.vit.state_dict())
    path = tmp_path / "dinov3_vits16_pretrain_lvd1689m-08c60483.pth"
    torch.save(official, path)
    loaded = load_backbone("dinov3_vits16", path)
    assert torch.equal(extract_features(loaded, img), ref) and loaded.weights == str(path)
    for k, v in loaded.vit.state_dict().items():
        assert torch.equal(converted[k], v), k
    # non-zero query biases cannot go into the bias-free architecture
    bad = dict(official)
    bad["blocks.2.attn.qkv.bias"] = bad["blocks.2.attn.qkv.bias"].clone()
    bad["blocks.2.attn.qkv.bias"][0] = 0.5
    torch.save(bad, tmp_path / "biased.pth")
    with pytest.raises(StegoError, match="biased.pth has non-zero query/value biases in blocks.2.attn.qkv.bias"):
        load_backbone("dinov3_vits16", tmp_path / "biased.pth")
    # the Hugging Face transformers layout is named and refused
    torch.save({"embeddings.cls_token": torch.zeros(1, 1, 384), "layer.0.norm1.weight": torch.ones(384)},
               tmp_path / "hf.pth")
    with pytest.raises(StegoError, match="transformers layout"):
        load_backbone("dinov3_vits16", tmp_path / "hf.pth")
    with pytest.raises(StegoError, match="shape"):  # a ViT-S file for the ViT-B
        load_backbone("dinov3_vitb16", path)


@pytest.mark.parametrize("name, names_file", [("dinov2_vits14_reg", "dinov2_vits14_reg4_pretrain.pth"),
                                              ("dinov3_vits16", "dinov3_vits16_pretrain_lvd1689m-08c60483.pth")])
def test_offline_hub_says_which_file(name, names_file, monkeypatch, tmp_path):
    import huggingface_hub.constants as hf_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path))  # an empty cache
    with pytest.raises(StegoError, match="weights=") as info:
        load_backbone(name)
    text = str(info.value)
    assert "\n" not in text and names_file in text and NEWER_VITS[name].timm_name in text


# ---------------------------------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("name", ["dinov2_vits14", "dinov2_vits14_reg", "dinov3_vits16"])
def test_demo_run_end_to_end(name, tmp_path):
    """One demo-sized run per family on tiny mosaic scenes: feature stores, kNN table, a STEGO run and a PCA run
    (fits the projection on the store) of a few steps, and the paper's evaluation through the live backbone."""
    bb = _backbone(name)
    res = 3 * bb.stride
    options = {"n_images": 8, "scene_size": 64}
    stores = {split: cache.cache_features("mosaic", split, bb, res=res, dataset_options=options, root=tmp_path,
                                          chunk_size=4, batch_size=4, progress=False) for split in ("train", "val")}
    train_store, val_store = stores["train"], stores["val"]
    assert train_store.meta["backbone"] == name and train_store.dim == bb.dim and tuple(train_store.grid) == (3, 3)
    assert train_store.meta["stride"] == bb.stride
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # k = 30 of 8 images
        table = knn.build_knn(train_store, k=30, progress=False)
    assert table.shape == (8, 8) and (table[:, 0] == torch.arange(8)).float().mean() >= 0.5
    results = {}
    for method in ("stego", "pca"):
        cfg = training.make_config("demo", backbone=name, method=method, code_dim=6, steps=4, batch_size=4,
                                   val_freq=2, n_neighbors=3, n_fit_images=8)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            results[method] = training.train(cfg, train_store=train_store, val_store=val_store, root=tmp_path,
                                             progress=False)
        assert results[method].completed and math.isfinite(results[method].best["cluster/mIoU"])
    projection = results["pca"].segmenter.code_map.projection
    assert projection.components_.shape == (6, bb.dim)
    segmenter = Segmenter.from_run(results["stego"].run_dir).with_backbone(bb)
    from stego_core.data import load_dataset

    val = load_dataset("mosaic", "val", res=res, **options)
    metrics = evaluation.evaluate(segmenter, val, flip=True, batch_size=4, progress=False)
    assert metrics["n_images"] == 8
    for key in ("cluster/mIoU", "linear/mIoU", "cluster/Accuracy", "linear/Accuracy"):
        assert 0 <= metrics[key] <= 100, key
