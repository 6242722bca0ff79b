"""Released-checkpoint loading: round trip of the Lightning key layout, safe unpickling of configs, clear errors."""
import sys
import types
import typing

import pytest
import torch

from stego_core.checkpoints import backbone_name_for, load_stego_checkpoint
from stego_core.config import StegoError


# ---------------------------------------------------------------------------------------------------------------
# fake omegaconf / Lightning classes, pickled under the real module names (neither package is installed here)
class _Node:
    def __init__(self, val):
        self._metadata = _Metadata(ref_type=typing.Any, object_type=None, key=None)
        self._parent = None
        self._val = val


class _Metadata:
    def __init__(self, **kw):
        self.__dict__.update(kw)


class _DictConfig:
    def __init__(self, content):
        self._metadata = _Metadata(ref_type=typing.Any, object_type=dict, key=None, flags={})
        self._parent = None
        self._content = {k: (v if isinstance(v, _DictConfig) else _Node(v)) for k, v in content.items()}


class _ModelCheckpoint:  # used as a dict key by old Lightning versions
    pass


class _Payload:  # a global outside the stand-in families: needs trusted=True
    pass


_FAKE = {
    "omegaconf.dictconfig": {"DictConfig": _DictConfig},
    "omegaconf.nodes": {"AnyNode": _Node},
    "omegaconf.base": {"ContainerMetadata": _Metadata},
    "pytorch_lightning.callbacks.model_checkpoint": {"ModelCheckpoint": _ModelCheckpoint},
    "mylib.evil": {"Payload": _Payload},
}


class fake_modules:
    """Register the fake classes under their real module names (for torch.save / a trusted torch.load)."""

    def __enter__(self):
        self.added, self.replaced = [], []
        for mod, names in _FAKE.items():
            parts = mod.split(".")
            for i in range(1, len(parts) + 1):
                name = ".".join(parts[:i])
                if name not in sys.modules:
                    sys.modules[name] = types.ModuleType(name)
                    self.added.append(name)
            for cls_name, cls in names.items():
                cls.__module__, cls.__qualname__, cls.__name__ = mod, cls_name, cls_name
                if hasattr(sys.modules[mod], cls_name):  # a real package is imported: put it back afterwards
                    self.replaced.append((sys.modules[mod], cls_name, getattr(sys.modules[mod], cls_name)))
                setattr(sys.modules[mod], cls_name, cls)
        return self

    def __exit__(self, *exc):
        for module, cls_name, original in self.replaced:
            setattr(module, cls_name, original)
        for name in self.added:
            sys.modules.pop(name, None)


def save_synthetic_checkpoint(path, *, width=384, patch=8, code_dim=16, n_classes=5, extra_clusters=0,
                              dataset="potsdam", only_dino=False, config_style="omegaconf", extra_global=False,
                              seed=0):
    """A checkpoint with the released STEGO Lightning layout and random weights; returns its state dict."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g)

    grid = 4
    sd = {
        "net.model.cls_token": r(1, 1, width),
        "net.model.pos_embed": r(1, 1 + grid * grid, width),
        "net.model.patch_embed.proj.weight": r(width, 3, patch, patch),
        "net.model.patch_embed.proj.bias": r(width),
        "net.model.norm.weight": r(width),
        "net.model.norm.bias": r(width),
    }
    dim = width if only_dino else code_dim
    if not only_dino:
        sd.update({
            "net.cluster1.0.weight": r(code_dim, width, 1, 1), "net.cluster1.0.bias": r(code_dim),
            "net.cluster2.0.weight": r(width, width, 1, 1), "net.cluster2.0.bias": r(width),
            "net.cluster2.2.weight": r(code_dim, width, 1, 1), "net.cluster2.2.bias": r(code_dim),
            "decoder.weight": r(width, code_dim, 1, 1), "decoder.bias": r(width),
        })
    sd.update({
        "train_cluster_probe.clusters": r(n_classes, dim),
        "cluster_probe.clusters": r(n_classes + extra_clusters, dim),
        "linear_probe.weight": r(n_classes, dim, 1, 1),
        "linear_probe.bias": r(n_classes),
    })
    cfg = {"dataset_name": dataset, "model_type": {384: "vit_small", 768: "vit_base"}[width],
           "dino_patch_size": patch, "dim": code_dim, "extra_clusters": extra_clusters, "pointwise": True,
           "neg_inter_shift": 0.76, "only_dino": only_dino}
    with fake_modules():
        if config_style == "omegaconf":
            cfg_obj = _DictConfig(cfg)
        else:
            cfg_obj = dict(cfg)
        ckpt = {
            "epoch": 3, "global_step": 5000, "pytorch-lightning_version": "1.5.10",
            "state_dict": sd,
            "hyper_parameters": {"n_classes": n_classes, "cfg": cfg_obj},
            "callbacks": {_ModelCheckpoint: {"best_model_score": torch.tensor(62.5), "best_model_path": "x.ckpt"}},
            "optimizer_states": [], "lr_schedulers": [],
        }
        if extra_global:
            ckpt["payload"] = _Payload()
        torch.save(ckpt, path)
    return sd


# ---------------------------------------------------------------------------------------------------------------
def test_round_trip_with_omegaconf_style_config(tmp_path):
    path = tmp_path / "potsdam_test.ckpt"
    sd = save_synthetic_checkpoint(path, extra_clusters=1)
    assert "omegaconf" not in sys.modules  # the stand-ins do the work, nothing is imported
    ck = load_stego_checkpoint(path)
    assert ck.backbone_name == "dino_vits8"
    assert ck.dataset == "potsdam"
    assert (ck.code_dim, ck.n_classes, ck.extra_clusters) == (16, 5, 1)
    assert ck.hparams["neg_inter_shift"] == 0.76 and ck.hparams["pointwise"] is True
    assert ck.hparams["n_classes"] == 5
    torch.testing.assert_close(ck.head.linear.weight, sd["net.cluster1.0.weight"])
    torch.testing.assert_close(ck.head.linear.bias, sd["net.cluster1.0.bias"])
    torch.testing.assert_close(ck.head.nonlinear[0].weight, sd["net.cluster2.0.weight"])
    torch.testing.assert_close(ck.head.nonlinear[2].weight, sd["net.cluster2.2.weight"])
    torch.testing.assert_close(ck.head.nonlinear[2].bias, sd["net.cluster2.2.bias"])
    torch.testing.assert_close(ck.cluster_probe.centres, sd["cluster_probe.clusters"])
    assert ck.backbone_state.keys() == {k[len("net.model."):] for k in sd if k.startswith("net.model.")}
    torch.testing.assert_close(ck.backbone_state["pos_embed"], sd["net.model.pos_embed"])
    # the loaded modules compute what the reference modules would
    feats = torch.randn(2, 384, 3, 3)
    ref_code = (torch.nn.functional.conv2d(feats, sd["net.cluster1.0.weight"], sd["net.cluster1.0.bias"])
                + torch.nn.functional.conv2d(torch.relu(torch.nn.functional.conv2d(
                    feats, sd["net.cluster2.0.weight"], sd["net.cluster2.0.bias"])),
                    sd["net.cluster2.2.weight"], sd["net.cluster2.2.bias"]))
    torch.testing.assert_close(ck.head(feats), ref_code, rtol=1e-4, atol=1e-4)
    code = torch.randn(2, 16, 3, 3)
    ref_logits = torch.nn.functional.conv2d(code, sd["linear_probe.weight"], sd["linear_probe.bias"])
    torch.testing.assert_close(ck.linear_probe(code), ref_logits, rtol=1e-5, atol=1e-5)


def test_plain_dict_config_and_dino_baseline(tmp_path):
    path = tmp_path / "only_dino.ckpt"
    save_synthetic_checkpoint(path, only_dino=True, config_style="dict", dataset="cityscapes", n_classes=27)
    ck = load_stego_checkpoint(path, expected_dataset="cityscapes")
    assert ck.head is None
    assert ck.code_dim == 384 and ck.n_classes == 27


def test_missing_keys_are_named(tmp_path):
    path = tmp_path / "x.ckpt"
    sd = save_synthetic_checkpoint(path)
    del sd["linear_probe.bias"], sd["net.cluster2.2.weight"]
    torch.save({"state_dict": sd, "hyper_parameters": {"n_classes": 5}}, path)
    with pytest.raises(StegoError, match=r"linear_probe\.bias.*net\.cluster2\.2\.weight"):
        load_stego_checkpoint(path)
    torch.save({"model": sd}, path)
    with pytest.raises(StegoError, match="state_dict"):
        load_stego_checkpoint(path)


def test_truncated_file(tmp_path):
    path = tmp_path / "x.ckpt"
    save_synthetic_checkpoint(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(StegoError, match="truncated"):
        load_stego_checkpoint(path)
    with pytest.raises(StegoError, match="not found"):
        load_stego_checkpoint(tmp_path / "nope.ckpt")


def test_profile_mismatch(tmp_path):
    path = tmp_path / "x.ckpt"
    save_synthetic_checkpoint(path, code_dim=16, dataset="potsdam")
    with pytest.raises(StegoError, match="expected_code_dim.*16.*70"):
        load_stego_checkpoint(path, expected_code_dim=70)
    with pytest.raises(StegoError, match="expected_dataset.*potsdam.*cocostuff27"):
        load_stego_checkpoint(path, expected_dataset="cocostuff27")
    assert load_stego_checkpoint(path, expected_code_dim=16, expected_dataset="potsdam").code_dim == 16


def test_foreign_globals_need_trust(tmp_path):
    path = tmp_path / "x.ckpt"
    save_synthetic_checkpoint(path, extra_global=True)
    with pytest.raises(StegoError, match=r"mylib\.evil\.Payload.*trusted=True"):
        load_stego_checkpoint(path)
    with fake_modules():  # a trusted full unpickle needs the real class importable
        ck = load_stego_checkpoint(path, trusted=True)
    assert ck.code_dim == 16 and ck.dataset == "potsdam" and ck.hparams["dim"] == 16


def test_backbone_names():
    assert backbone_name_for("vit_base", 8) == "dino_vitb8"
    assert backbone_name_for("vit_small", 16) == "dino_vits16"
    with pytest.raises(StegoError, match="model_type"):
        backbone_name_for("vit_huge", 14)


def test_built_backbone_names_the_checkpoint_as_its_weights():
    import timm

    from stego_core.checkpoints import LoadedCheckpoint
    from stego_core.heads import STEGOHead
    from stego_core.probes import ClusterProbe, LinearProbe

    vit = timm.create_model("vit_small_patch16_224.dino", pretrained=False)
    ck = LoadedCheckpoint(path="released/model.ckpt", backbone_name="dino_vits16", dataset="cocostuff27",
                          code_dim=5, n_classes=27, extra_clusters=0, head=STEGOHead(384, 5),
                          cluster_probe=ClusterProbe(5, 27), linear_probe=LinearProbe(5, 27),
                          backbone_state=vit.state_dict(), hparams={})
    backbone = ck.build_backbone()
    assert torch.equal(backbone.vit.pos_embed, vit.pos_embed)
    assert "released/model.ckpt" in backbone.weights_source  # not the temporary file the weights went through


def test_a_complete_vit_in_a_checkpoint_becomes_the_backbone(tmp_path):
    """Every tensor of a complete DINO ViT-S/16 (all 12 blocks) stored under ``net.model.*`` reaches the segmenter's
    backbone: its features equal timm's forward of the same weights (last block + final norm, CLS dropped)."""
    import timm

    from stego_core.segmenter import Segmenter

    path = tmp_path / "complete.ckpt"
    save_synthetic_checkpoint(path, width=384, patch=16, code_dim=6, n_classes=3, dataset="potsdam")
    torch.manual_seed(3)
    vit = timm.create_model("vit_small_patch16_224.dino", pretrained=False).eval()
    with torch.no_grad():  # random, not the init: every tensor differs from a freshly built model's
        for t in vit.state_dict().values():
            t.copy_(torch.randn_like(t) * 0.05)
    full = vit.state_dict()
    assert len(full) > 100  # 12 blocks x 12 tensors + embeddings and norm
    with fake_modules():
        ckpt = torch.load(path, weights_only=False)
        ckpt["state_dict"] = {k: v for k, v in ckpt["state_dict"].items() if not k.startswith("net.model.")}
        ckpt["state_dict"].update({f"net.model.{k}": v for k, v in full.items()})
        torch.save(ckpt, path)
    seg = Segmenter.from_checkpoint(path)
    img = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        got = seg.backbone(img)  # [2,384,14,14]
        tokens = vit.forward_features(img)[:, 1:]  # [2,1+196,384] -> patch tokens [2,196,384]
    expected = tokens.transpose(1, 2).reshape(2, 384, 14, 14)  # row-major token grid
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
