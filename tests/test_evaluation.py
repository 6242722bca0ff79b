"""The final evaluation protocol on a tiny synthetic setup: flip averaging, probes, CRF on/off, pooled metrics.
Every model is a Segmenter (head, or identity for the DINO baseline, + probes + backbone)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from stego_core.config import StegoError
from stego_core.evaluation import evaluate, evaluate_batches
from stego_core.heads import STEGOHead
from stego_core.metrics import UnsupervisedMetrics
from stego_core.probes import ClusterProbe, LinearProbe
from stego_core.segmenter import Segmenter

C, D, K, RES = 12, 6, 3, 32
MEAN = torch.tensor((0.485, 0.456, 0.406)).view(3, 1, 1)
STD = torch.tensor((0.229, 0.224, 0.225)).view(3, 1, 1)


class FakeBackbone(nn.Module):
    """Stride-4 conv features; not flip-equivariant, so flip averaging changes the code."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, C, 4, stride=4)
        self.dim, self.stride = C, 4

    def forward(self, img):
        return self.conv(img)


class TinySet(torch.utils.data.Dataset):
    """Images of three coloured vertical bands (random widths and colours); the label is the band."""

    n_classes = K
    class_names = ["a", "b", "c"]

    def __init__(self, n=4, seed=0):
        rng = np.random.default_rng(seed)
        self.items = []
        for i in range(n):
            cuts = np.sort(rng.choice(np.arange(4, RES - 4), size=2, replace=False))
            label = np.zeros((RES, RES), dtype=np.int64)
            label[:, cuts[0]:] = 1
            label[:, cuts[1]:] = 2
            label[:2] = -1  # some ignored pixels
            colours = rng.integers(0, 256, size=(K, 3))
            u8 = colours[label.clip(0)].astype(np.uint8)  # [H,W,3]
            img = (torch.from_numpy(u8).permute(2, 0, 1).float() / 255 - MEAN) / STD
            self.items.append({"img": img, "label": torch.from_numpy(label), "index": i, "u8": u8})

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        item = self.items[i]
        return {"img": item["img"], "label": item["label"], "index": item["index"]}


def _seg(backbone, head, cluster_probe, linear_probe):
    return Segmenter(nn.Identity() if head is None else head, cluster_probe, linear_probe, backbone=backbone)


def _manual_flip_code(backbone, head, img):
    head.eval()
    with torch.no_grad():
        return (head(backbone(img)) + torch.flip(head(backbone(torch.flip(img, dims=[3]))), dims=[3])) / 2


@pytest.fixture
def setup():
    torch.manual_seed(1)
    return FakeBackbone(), STEGOHead(C, D), ClusterProbe(D, K), LinearProbe(D, K), TinySet()


def test_image_code_averages_the_head_output(setup):
    backbone, head, cluster_probe, linear_probe, _ = setup
    seg = _seg(backbone, head, cluster_probe, linear_probe)
    img = torch.stack([TinySet()[i]["img"] for i in range(2)])
    head.train()  # the segmenter must evaluate without dropout and restore the mode
    code = seg.image_code(img, flip=True)
    assert head.training
    head.eval()
    with torch.no_grad():
        plain = head(backbone(img))
        manual = (plain + torch.flip(head(backbone(torch.flip(img, dims=[3]))), dims=[3])) / 2
    torch.testing.assert_close(code, manual)
    assert not torch.allclose(code, plain, atol=1e-4)  # the flip does something here
    torch.testing.assert_close(seg.image_code(img, flip=False), plain)
    # DINO baseline: the raw features are the code
    with torch.no_grad():
        feats = backbone(img)
    dino = _seg(backbone, None, ClusterProbe(C, K), LinearProbe(C, K))
    torch.testing.assert_close(dino.image_code(img, flip=True),
                               (feats + torch.flip(backbone(torch.flip(img, dims=[3])), dims=[3])) / 2)


def test_evaluate_matches_a_manual_computation(setup):
    backbone, head, cluster_probe, linear_probe, ds = setup
    res = evaluate(_seg(backbone, head, cluster_probe, linear_probe), ds, flip=True, crf=False, batch_size=3,
                   progress=False, keep_predictions=2)
    cm, lm = UnsupervisedMetrics(K), UnsupervisedMetrics(K, hungarian=False)
    for i in range(len(ds)):
        item = ds[i]
        code = _manual_flip_code(backbone, head, item["img"][None])
        code = F.interpolate(code, size=(RES, RES), mode="bilinear", align_corners=False)
        with torch.no_grad():
            lm.update(linear_probe(code).argmax(1), item["label"][None])
            cos = torch.einsum("bdhw,kd->bkhw", F.normalize(code, dim=1), F.normalize(cluster_probe.centres, dim=1))
            cm.update(cos.argmax(1), item["label"][None])
    assert res["cluster/mIoU"] == pytest.approx(cm.compute()["mIoU"])
    assert res["cluster/Accuracy"] == pytest.approx(cm.compute()["Accuracy"])
    assert res["linear/mIoU"] == pytest.approx(lm.compute()["mIoU"])
    np.testing.assert_array_equal(res["linear"]["confusion"], lm.confusion)
    assert res["n_images"] == 4 and res["crf"] is False
    pred = res["predictions"]
    assert pred["index"] == [0, 1] and pred["linear"].shape == (2, RES, RES) and pred["label"].shape == (2, RES, RES)


def test_evaluate_with_and_without_crf(setup):
    """The CRF path's values are pinned against pydensecrf in test_evaluation_protocol.py; here: a pool of two
    workers scores exactly like the in-process CRF, and the CRF changes these sharp-edged images' predictions."""
    backbone, head, cluster_probe, linear_probe, ds = setup
    seg = _seg(backbone, head, cluster_probe, linear_probe)
    plain = evaluate(seg, ds, crf=False, progress=False)
    serial = evaluate(seg, ds, crf=True, workers=1, progress=False)
    pooled = evaluate(seg, ds, crf=True, workers=2, progress=False)
    assert serial["crf"] is True and plain["crf"] is False
    for probe in ("cluster", "linear"):
        np.testing.assert_array_equal(serial[probe]["confusion"], pooled[probe]["confusion"])
        assert serial[f"{probe}/mIoU"] == pooled[f"{probe}/mIoU"]
    assert not (np.array_equal(plain["linear"]["confusion"], serial["linear"]["confusion"])
                and np.array_equal(plain["cluster"]["confusion"], serial["cluster"]["confusion"]))


def test_evaluate_batches_from_cached_features_matches_live(setup):
    backbone, head, cluster_probe, linear_probe, ds = setup
    seg = _seg(backbone, head, cluster_probe, linear_probe)
    live = evaluate(seg, ds, flip=False, crf=True, workers=1, progress=False)
    with torch.no_grad():
        feats = backbone(torch.stack([it["img"] for it in ds.items]))
    batches = [{"feats": feats[i:i + 2], "label": torch.stack([it["label"] for it in ds.items[i:i + 2]]),
                "image": np.stack([it["u8"] for it in ds.items[i:i + 2]])} for i in (0, 2)]
    cached = evaluate_batches(seg, batches, crf=True, workers=1, progress=False)
    for key in ("cluster/mIoU", "linear/mIoU", "cluster/Accuracy", "linear/Accuracy"):
        assert cached[key] == pytest.approx(live[key])


def test_dino_baseline_and_errors(setup):
    backbone, _, _, _, ds = setup
    res = evaluate(_seg(backbone, None, ClusterProbe(C, K + 1), LinearProbe(C, K)), ds, progress=False)
    assert 0 <= res["cluster/mIoU"] <= 100 and res["cluster"]["histogram"].shape == (K + 1, K + 1)
    probes_only = _seg(None, None, ClusterProbe(D, K), LinearProbe(D, K))
    with pytest.raises(StegoError, match="code"):
        evaluate_batches(probes_only, [{"label": torch.zeros(1, 4, 4, dtype=torch.long)}], progress=False)
    with pytest.raises(StegoError, match="images"):
        evaluate_batches(probes_only, [{"code": torch.zeros(1, D, 2, 2),
                                        "label": torch.zeros(1, 4, 4, dtype=torch.long)}],
                         crf=True, workers=1, progress=False)
    with pytest.raises(StegoError, match="nothing"):
        evaluate_batches(probes_only, [], progress=False)


def test_split_without_labels_is_an_error_not_nan(setup):
    backbone, head, cluster_probe, linear_probe, ds = setup
    code = torch.randn(2, D, 4, 4)
    unlabelled = [{"code": code, "label": torch.full((2, 8, 8), -1, dtype=torch.long)} for _ in range(2)]
    probes = _seg(backbone, head, cluster_probe, linear_probe)
    with pytest.raises(StegoError) as info:
        evaluate_batches(probes, unlabelled, progress=False)
    msg = str(info.value)
    assert msg.startswith("label: no labelled pixels") and "segment_images" in msg and "\n" not in msg
    out_of_range = [{"code": code, "label": torch.full((2, 8, 8), K, dtype=torch.long)}]  # only classes >= K
    with pytest.raises(StegoError, match="^label: no labelled pixels"):
        evaluate_batches(probes, out_of_range, progress=False)
    for item in ds.items:  # the full protocol on an unlabelled dataset
        item["label"] = torch.full_like(item["label"], -1)
    with pytest.raises(StegoError, match="^label: no labelled pixels"):
        evaluate(probes, ds, progress=False)
    # one labelled pixel somewhere in the split is enough: finite metrics
    some = unlabelled[:1] + [{"code": code, "label": torch.full((2, 8, 8), -1, dtype=torch.long)}]
    some[1]["label"][0, 3, 3] = 1
    res = evaluate_batches(probes, some, progress=False)
    assert np.isfinite(res["linear/Accuracy"]) and res["linear"]["confusion"].sum() == 1


def test_batches_of_different_resolutions_upsample_to_their_own_labels(setup):
    """Validation at 320 px after training at 224 px: each batch's code goes to its own label size."""
    _, _, cluster_probe, linear_probe, _ = setup
    g = torch.Generator().manual_seed(3)
    batches = [{"code": torch.randn(2, D, h, h, generator=g), "label": torch.randint(-1, K, (2, 4 * h, 4 * h),
                                                                                      generator=g)}
               for h in (7, 10)]  # e.g. 28 px and 40 px labels
    res = evaluate_batches(_seg(None, None, cluster_probe, linear_probe), batches, progress=False)
    lm = UnsupervisedMetrics(K, hungarian=False)
    with torch.no_grad():
        for b in batches:
            up = F.interpolate(b["code"], size=b["label"].shape[-2:], mode="bilinear", align_corners=False)
            lm.update(linear_probe(up).argmax(1), b["label"])
    np.testing.assert_array_equal(res["linear"]["confusion"], lm.confusion)
    assert res["n_images"] == 4
