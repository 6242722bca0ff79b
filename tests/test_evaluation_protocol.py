"""The paper's evaluation protocol pinned on small hand-checkable cases, each against an independent computation:
flip averaging on the code, the cluster temperature 2 of the CRF unaries, the CRF fed the unmirrored image with the
bytes of the chosen protocol, the reference DenseCRF kernels, the Hungarian cluster -> class map (direction
included), extra-cluster metrics by brute force, and ``segment`` predicting what the evaluation predicts.

Every expected value comes from torch / numpy / scipy / pydensecrf calls written out here, not from the functions
under test."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from scipy.optimize import linear_sum_assignment
from test_crf import _reference_crf as reference_crf
from torch import nn

from stego_core.evaluation import evaluate, evaluate_batches
from stego_core.heads import STEGOHead
from stego_core.metrics import UnsupervisedMetrics
from stego_core.probes import ClusterProbe, LinearProbe
from stego_core.segment import segment_images
from stego_core.segmenter import Segmenter

D, K, RES = 5, 3, 24
MEAN = torch.tensor((0.485, 0.456, 0.406)).view(3, 1, 1)
STD = torch.tensor((0.229, 0.224, 0.225)).view(3, 1, 1)


COLOURS = np.array([[200, 60, 60], [60, 180, 70], [70, 80, 210]])  # the three bands' base colours


class _Backbone(nn.Module):
    """Stride-4 features: each patch's normalised colour weighted by a left-to-right ramp (so the features of a
    mirrored image are not the mirrored features and flip averaging changes the code)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 4, stride=4)
        self.dim, self.stride = 3, 4
        ramp = torch.tensor([0.1, 0.2, 0.3, 0.4]).expand(4, 4) / 4  # [kh,kw]
        with torch.no_grad():
            self.conv.weight.zero_()
            for c in range(3):
                self.conv.weight[c, c] = ramp
            self.conv.bias.zero_()

    def forward(self, img):
        return self.conv(img)


def _images(n: int, seed: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Noisy three-band images (bands at random columns, colours permuted) and their labels (-1 on the top rows)."""
    rng = np.random.default_rng(seed)
    u8s, labels = [], []
    for _ in range(n):
        cuts = np.sort(rng.choice(np.arange(5, RES - 5), size=2, replace=False))
        label = np.zeros((RES, RES), dtype=np.int64)
        label[:, cuts[0]:] = 1
        label[:, cuts[1]:] = 2
        u8 = COLOURS[rng.permutation(K)][label] + rng.integers(-30, 31, size=(RES, RES, 3))
        label[:2] = -1
        u8s.append(np.clip(u8, 0, 255).astype(np.uint8))
        labels.append(label)
    return u8s, labels


def _normalised(u8: np.ndarray) -> torch.Tensor:
    return (torch.from_numpy(u8).permute(2, 0, 1).float() / 255.0 - MEAN) / STD  # [H,W,3] -> [3,H,W]


def _model(seed: int = 0):
    """Backbone, a head whose code is the features (linear branch = identity, nonlinear branch off), centres at the
    three colours' features, a seeded random linear probe."""
    torch.manual_seed(seed)
    backbone, head = _Backbone(), STEGOHead(3, D)
    cluster_probe, linear_probe = ClusterProbe(D, K), LinearProbe(D, K)
    with torch.no_grad():
        head.linear.weight.copy_(torch.eye(D, 3)[:, :, None, None])
        head.linear.bias.zero_()
        head.nonlinear[2].weight.zero_()
        head.nonlinear[2].bias.zero_()
        colour_feats = torch.stack([_normalised(np.full((1, 1, 3), c, np.uint8))[:, 0, 0] for c in COLOURS])  # [K,3]
        cluster_probe.centres.copy_(F.pad(colour_feats, (0, D - 3)))
        linear_probe.conv.weight.mul_(0.5)
    return backbone.eval(), head.eval(), cluster_probe, linear_probe


_reference_crf = reference_crf  # pydensecrf with the reference's literal kernels, shared with test_crf


def _reference_bytes(img: torch.Tensor, protocol: str) -> np.ndarray:
    """The bytes the CRF sees: unnormalise, x255, truncate, BGR ("original"); round, RGB ("corrected")."""
    scaled = (img * STD + MEAN) * 255.0
    if protocol == "original":
        return np.ascontiguousarray(scaled.clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()[:, :, ::-1])
    return np.ascontiguousarray(scaled.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy())


def _reference_predictions(backbone, head, cluster_probe, linear_probe, img, *, crf, protocol="original"):
    """Cluster and linear predictions [H,W] of one image by the reference recipe, written out."""
    x = img[None]
    with torch.no_grad():
        code = (head(backbone(x)) + torch.flip(head(backbone(torch.flip(x, dims=[3]))), dims=[3])) / 2
        up = F.interpolate(code, size=img.shape[-2:], mode="bilinear", align_corners=False)[0]  # [D,H,W]
        cos = torch.einsum("dhw,kd->khw", up / up.norm(dim=0, keepdim=True).clamp_min(1e-12),
                           cluster_probe.centres / cluster_probe.centres.norm(dim=1, keepdim=True))
        logits = torch.einsum("dhw,kd->khw", up, linear_probe.conv.weight[:, :, 0, 0]) \
            + linear_probe.conv.bias[:, None, None]
    if not crf:
        return cos.argmax(0).numpy(), logits.argmax(0).numpy()
    rgb = _reference_bytes(img, protocol)
    # probabilities = softmax of the log-probabilities = softmax(2 cos) and softmax(logits)
    p_cluster = torch.softmax(2.0 * cos, dim=0).numpy()
    p_linear = torch.softmax(logits, dim=0).numpy()
    return _reference_crf(rgb, p_cluster).argmax(0), _reference_crf(rgb, p_linear).argmax(0)


def _confusion(preds, labels, n_rows=K):
    m = np.zeros((n_rows, K), dtype=np.int64)
    for p, t in zip(preds, labels):
        keep = (t >= 0) & (p < K)
        np.add.at(m, (p[keep], t[keep]), 1)
    return m


def _miou_acc(hist: np.ndarray) -> tuple[float, float]:
    tp = np.diag(hist).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = tp / (hist.sum(0) + hist.sum(1) - tp)
    return 100 * float(np.nanmean(iou)), 100 * tp.sum() / hist.sum()


class _Set(torch.utils.data.Dataset):
    class_names = ["a", "b", "c"]
    n_classes = K

    def __init__(self, u8s, labels):
        self.u8s, self.labels = u8s, labels

    def __len__(self):
        return len(self.u8s)

    def __getitem__(self, i):
        return {"img": _normalised(self.u8s[i]), "label": torch.from_numpy(self.labels[i]), "index": i}


@pytest.mark.parametrize("protocol", ["original", "corrected"])
@pytest.mark.parametrize("crf", [False, True])
def test_evaluation_follows_the_reference_recipe(crf, protocol):
    """Flip-averaged code, bilinear upsampling, 2·cos / linear log-probabilities, DenseCRF with the reference kernels
    on the unmirrored image's protocol bytes, pooled confusion matrices, Hungarian matching: every pixel's
    prediction and both metrics equal a reference computation written out with torch, scipy and pydensecrf."""
    backbone, head, cluster_probe, linear_probe = _model()
    u8s, labels = _images(3, seed=5)
    seg = Segmenter(head, cluster_probe, linear_probe, backbone=backbone)
    res = evaluate(seg, _Set(u8s, labels), flip=True, crf=crf, workers=1, protocol=protocol, batch_size=2,
                   keep_predictions=3, progress=False)

    ref = [_reference_predictions(backbone, head, cluster_probe, linear_probe, _normalised(u8), crf=crf,
                                  protocol=protocol) for u8 in u8s]
    ref_cluster, ref_linear = [r[0] for r in ref], [r[1] for r in ref]
    np.testing.assert_array_equal(res["predictions"]["cluster_raw"], np.stack(ref_cluster))
    np.testing.assert_array_equal(res["predictions"]["linear"], np.stack(ref_linear))

    m_cluster, m_linear = _confusion(ref_cluster, labels), _confusion(ref_linear, labels)
    np.testing.assert_array_equal(res["cluster"]["confusion"], m_cluster)
    np.testing.assert_array_equal(res["linear"]["confusion"], m_linear)
    rows, cols = linear_sum_assignment(m_cluster, maximize=True)
    miou, acc = _miou_acc(m_cluster[rows[np.argsort(cols)]])
    assert res["cluster/mIoU"] == pytest.approx(miou)
    assert res["cluster/Accuracy"] == pytest.approx(acc)
    miou, acc = _miou_acc(m_linear)
    assert res["linear/mIoU"] == pytest.approx(miou)
    assert res["linear/Accuracy"] == pytest.approx(acc)
    # the matched predictions map every cluster to its class
    cluster_class = dict(zip(rows.tolist(), cols.tolist()))
    np.testing.assert_array_equal(res["predictions"]["cluster"],
                                  np.vectorize(cluster_class.get)(np.stack(ref_cluster)))


def test_the_crf_changes_predictions_in_this_case():
    """The case above is sensitive to the CRF's inputs: the unmirrored vs mirrored image, temperature 2 vs 0.5, and
    the two protocols' bytes each change the reference's own predictions (so a wrong input cannot pass)."""
    backbone, head, cluster_probe, linear_probe = _model()
    u8s, _ = _images(3, seed=5)
    changed = {"mirror": 0, "alpha": 0, "protocol": 0, "flip": 0}
    for u8 in u8s:
        img = _normalised(u8)
        with torch.no_grad():
            x = img[None]
            single = head(backbone(x))
            code = (single + torch.flip(head(backbone(torch.flip(x, dims=[3]))), dims=[3])) / 2
            up, up_single = (F.interpolate(c, size=img.shape[-2:], mode="bilinear", align_corners=False)
                             for c in (code, single))
            cos = cluster_probe.cosine(up)[0]
            probs = [torch.softmax(2 * cos, 0).numpy(), torch.softmax(linear_probe(up)[0], 0).numpy()]
        changed["flip"] += int((cluster_probe.cosine(up_single)[0].argmax(0) != cos.argmax(0)).sum())
        rgb = _reference_bytes(img, "original")
        for p in probs:
            base = _reference_crf(rgb, p).argmax(0)
            changed["mirror"] += int((_reference_crf(np.ascontiguousarray(rgb[:, ::-1]), p).argmax(0) != base).sum())
            changed["protocol"] += int((_reference_crf(_reference_bytes(img, "corrected"), p).argmax(0)
                                        != base).sum())
        changed["alpha"] += int((_reference_crf(rgb, torch.softmax(0.5 * cos, 0).numpy()).argmax(0)
                                 != _reference_crf(rgb, probs[0]).argmax(0)).sum())
    assert all(v > 0 for v in changed.values()), changed


def test_cluster_to_class_map_points_from_clusters_to_classes():
    """A 3-cycle (cluster (c+1) mod 3 holds class c) is not its own inverse, so the map's direction is checked:
    the matched predictions equal the labels and a matched segmenter predicts classes."""
    eye = torch.eye(3)
    cluster_probe, linear_probe = ClusterProbe(3, 3), LinearProbe(3, 3)
    with torch.no_grad():
        cluster_probe.centres.copy_(eye)
    label = torch.tensor([[[0, 0, 1, 1, 2, 2]] * 2, [[2, 2, 2, 0, 0, 1]] * 2])  # [2,2,6]
    code = eye[(label + 1) % 3].permute(0, 3, 1, 2)  # one-hot of cluster (c+1) mod 3: [2,2,6,3] -> [2,3,2,6]
    seg = Segmenter(nn.Identity(), cluster_probe, linear_probe)
    res = evaluate_batches(seg, [{"code": code, "label": label}], keep_predictions=2, progress=False)
    np.testing.assert_array_equal(res["predictions"]["cluster_raw"], ((label + 1) % 3).numpy())
    np.testing.assert_array_equal(res["predictions"]["cluster"], label.numpy())
    assert res["cluster/mIoU"] == pytest.approx(100.0)
    matched = seg.match(res["cluster"]["assignment"])
    np.testing.assert_array_equal(matched.cluster_to_class, [2, 0, 1])  # cluster 1 -> class 0, ...
    np.testing.assert_array_equal(matched.predict(code, (2, 6)).numpy(), label.numpy())


def _brute_force_extra(conf: np.ndarray, protocol: str) -> tuple[float, float]:
    """mIoU and accuracy of the reference's E > 0 rule by enumerating every class -> cluster injection."""
    n_clusters, k = conf.shape
    best = max(itertools.permutations(range(n_clusters), k), key=lambda s: sum(conf[s[c], c] for c in range(k)))
    ious = []
    for c in range(k):
        tp = conf[best[c], c]
        ious.append(tp / (conf[best[c]].sum() + conf[:, c].sum() - tp) if conf[best[c]].sum() + conf[:, c].sum()
                    else np.nan)
    unmatched = conf[[r for r in range(n_clusters) if r not in best]].sum()
    if protocol == "original":  # the extra row is a class of its own (IoU 0/0 when empty, else 0)
        ious.append(0.0 if unmatched else np.nan)
    tp = sum(conf[best[c], c] for c in range(k))
    return 100 * float(np.nanmean(ious)), 100 * tp / conf.sum()


@pytest.mark.parametrize("protocol", ["original", "corrected"])
@pytest.mark.parametrize("k, e", [(2, 1), (3, 2)])
def test_extra_cluster_metrics_match_brute_force(protocol, k, e):
    rng = np.random.default_rng(k * 10 + e)
    for _ in range(10):
        target = rng.integers(-1, k, size=400)
        pred = rng.integers(0, k + e, size=400)
        # a dominant cluster per class so that the matching is unique
        strong = rng.permutation(k + e)[:k]
        hit = rng.random(400) < 0.5
        pred = np.where(hit & (target >= 0), strong[target.clip(0)], pred)
        m = UnsupervisedMetrics(k, extra_clusters=e, protocol=protocol)
        m.update(pred, target)
        out = m.compute()
        valid = target >= 0
        if protocol == "original":
            valid &= pred < k  # predictions on clusters >= K are dropped
        conf = np.zeros((k + e, k), dtype=np.int64)
        np.add.at(conf, (pred[valid], target[valid]), 1)
        miou, acc = _brute_force_extra(conf, protocol)
        assert out["mIoU"] == pytest.approx(miou)
        assert out["Accuracy"] == pytest.approx(acc)


@pytest.mark.parametrize("crf", [False, True])
def test_segment_predicts_what_the_evaluation_predicts(tmp_path, crf):
    """``segment`` on an image file (flip averaging on) gives, pixel for pixel, the evaluation's raw cluster ids and
    linear classes for the same image."""
    backbone, head, cluster_probe, linear_probe = _model(seed=3)
    u8s, labels = _images(1, seed=11)
    seg = Segmenter(head, cluster_probe, linear_probe, backbone=backbone, info={"backbone": "test", "weights": None})
    res = evaluate(seg, _Set(u8s, labels), flip=True, crf=crf, workers=1, keep_predictions=1, progress=False)
    path = tmp_path / "scene.png"
    Image.fromarray(u8s[0]).save(path)
    out = {}
    for probe in ("cluster", "linear"):
        seg_out = segment_images([path], run=seg, out_dir=tmp_path / probe, res=RES, probe=probe, crf=crf,
                                 flip=True, progress=False)[0]
        out[probe] = np.asarray(Image.open(seg_out.label_path)).astype(np.int64)
    np.testing.assert_array_equal(out["cluster"], res["predictions"]["cluster_raw"][0])
    np.testing.assert_array_equal(out["linear"], res["predictions"]["linear"][0])
    # and both follow the reference recipe
    ref_cluster, ref_linear = _reference_predictions(backbone, head, cluster_probe, linear_probe,
                                                     _normalised(u8s[0]), crf=crf)
    np.testing.assert_array_equal(out["cluster"], ref_cluster)
    np.testing.assert_array_equal(out["linear"], ref_linear)


@pytest.mark.parametrize("protocol", ["original", "corrected"])
def test_segmenter_predict_passes_every_option_on(protocol):
    """``Segmenter.predict`` (one probe) with the CRF, a protocol, a worker count, a pool and the cluster map: the
    reference recipe's predictions for each combination."""
    from stego_core.crf import CRFPool

    backbone, head, cluster_probe, linear_probe = _model()
    u8s, _ = _images(2, seed=5)
    imgs = torch.stack([_normalised(u8) for u8 in u8s])
    seg = Segmenter(head, cluster_probe, linear_probe, backbone=backbone)
    code = seg.image_code(imgs, flip=True)
    ref = [_reference_predictions(backbone, head, cluster_probe, linear_probe, img, crf=True, protocol=protocol)
           for img in imgs]
    for probe, r in (("cluster", 0), ("linear", 1)):
        expected = np.stack([x[r] for x in ref])
        got = seg.predict(code, (RES, RES), probe, crf=True, images=imgs, workers=1, protocol=protocol)
        np.testing.assert_array_equal(got.numpy(), expected)
        with CRFPool(1, protocol=protocol, progress=False) as pool:
            np.testing.assert_array_equal(seg.predict(code, (RES, RES), probe, crf=True, images=imgs,
                                                      pool=pool).numpy(), expected)
        u8 = np.stack(u8s)  # the uint8 images a feature store keeps give the same CRF input
        np.testing.assert_array_equal(seg.predict(code, (RES, RES), probe, crf=True, images=u8,
                                                  protocol=protocol).numpy(), expected)
    # a matched segmenter maps clusters to classes unless asked not to
    matched = seg.match((np.array([0, 1, 2]), np.array([2, 0, 1])))
    raw = np.stack([x[0] for x in ref])
    np.testing.assert_array_equal(matched.predict(code, (RES, RES), crf=True, images=imgs, protocol=protocol)
                                  .numpy(), np.array([2, 0, 1])[raw])
    np.testing.assert_array_equal(matched.predict(code, (RES, RES), crf=True, images=imgs, protocol=protocol,
                                                  map_clusters=False).numpy(), raw)


def test_derived_segmenters_keep_their_map_and_info():
    """with_backbone keeps the cluster -> class map and the info; with_cluster_probe drops only the map."""
    backbone, head, cluster_probe, linear_probe = _model()
    seg = Segmenter(head, cluster_probe, linear_probe, info={"run_id": "r1", "method": "stego"})
    matched = seg.match((np.array([0, 1, 2]), np.array([1, 2, 0])))
    moved = matched.with_backbone(backbone)
    np.testing.assert_array_equal(moved.cluster_to_class, [1, 2, 0])
    assert moved.info == {"run_id": "r1", "method": "stego"} and moved.backbone is backbone
    refitted = matched.with_cluster_probe(ClusterProbe(D, K + 1))
    assert refitted.cluster_to_class is None and refitted.info["run_id"] == "r1"


def test_a_matched_segmenter_scores_its_raw_clusters_and_labels_are_counted_over_all_batches():
    """Evaluating a segmenter that carries a cluster -> class map scores the raw cluster ids (the same numbers as
    without the map); a last batch without labels is fine when an earlier batch had some."""
    backbone, head, cluster_probe, linear_probe = _model()
    u8s, labels = _images(2, seed=5)
    seg = Segmenter(head, cluster_probe, linear_probe, backbone=backbone)
    plain = evaluate(seg, _Set(u8s, labels), batch_size=1, keep_predictions=2, progress=False)
    matched = seg.match((np.array([0, 1, 2]), np.array([1, 2, 0])))
    res = evaluate(matched, _Set(u8s, labels), batch_size=1, keep_predictions=2, progress=False)
    np.testing.assert_array_equal(res["cluster"]["confusion"], plain["cluster"]["confusion"])
    np.testing.assert_array_equal(res["predictions"]["cluster_raw"], plain["predictions"]["cluster_raw"])
    unlabelled_last = [labels[0], np.full_like(labels[1], -1)]
    out = evaluate(seg, _Set(u8s, unlabelled_last), batch_size=1, progress=False)
    assert out["linear"]["confusion"].sum() == int((labels[0] >= 0).sum())
