"""Tests of stego_core.metrics: golden confusion/Hungarian/mIoU values, brute-force matching, protocols."""
import itertools

import numpy as np
import pytest
import torch

from stego_core.config import StegoError
from stego_core.metrics import UnsupervisedMetrics, hungarian_match


def _golden_c_inputs(extra, absent):
    rng = np.random.default_rng(7)
    labels = rng.integers(-1, 5, size=(3, 16, 16))
    noise = rng.random((3, 16, 16)) < 0.3
    rand_pred = rng.integers(0, 5 + extra, size=(3, 16, 16))
    p = np.array([2, 0, 4, 1, 3])
    preds = np.where(noise, rand_pred, p[np.clip(labels, 0, None)])
    if absent:
        labels[labels == 4] = -1
    return preds, labels


def _run(preds, labels, **kw):
    m = UnsupervisedMetrics(5, **kw)
    for i in range(3):
        m.update(preds[i], labels[i])
    return m.compute()


def test_golden_c_all_cases(golden):
    cases = golden["c_unsupervised_metrics"]["results"]
    assert {"E0", "E0_class4_absent_in_gt"} <= set(cases)
    for name, case in cases.items():
        e = case["extra_clusters"]
        preds, labels = _golden_c_inputs(e, absent="absent" in name)
        out = _run(preds, labels, extra_clusters=e)
        np.testing.assert_array_equal(out["confusion"], np.array(case["stats_[pred_row,gt_col]"]))
        np.testing.assert_array_equal(out["assignment"][0], case["assignments_rows"])
        np.testing.assert_array_equal(out["assignment"][1], case["assignments_cols"])
        assert out["mIoU"] == pytest.approx(case["cluster_mIoU_x100"], rel=1e-5)
        assert out["Accuracy"] == pytest.approx(case["cluster_Accuracy_x100"], rel=1e-5)
        for key, want in case["studies_extra_metrics"].items():
            got = out["studies"][key.removeprefix("test/cluster/")]
            if want is None:  # NaN in the reference (0/0)
                assert np.isnan(got), key
            else:
                assert got == pytest.approx(want, rel=1e-5, abs=1e-6), key
        if e == 0:
            lin = _run(preds, labels, hungarian=False)
            assert lin["mIoU"] == pytest.approx(case["linear_(no_hungarian)_mIoU_x100"], rel=1e-5)
            assert lin["Accuracy"] == pytest.approx(case["linear_(no_hungarian)_Accuracy_x100"], rel=1e-5)
            np.testing.assert_array_equal(lin["assignment"][0], np.arange(5))
            np.testing.assert_array_equal(lin["histogram"], lin["confusion"])


def test_usual_and_swapped_per_class_names():
    preds, labels = _golden_c_inputs(0, absent=False)
    out = _run(preds, labels)
    hist = out["histogram"].astype(float)
    # usual definitions: precision = tp / predicted-as-class, recall = tp / ground-truth-class
    np.testing.assert_allclose(out["precision"], 100 * np.diag(hist) / hist.sum(1))
    np.testing.assert_allclose(out["recall"], 100 * np.diag(hist) / hist.sum(0))
    np.testing.assert_allclose(out["iou"], 100 * np.diag(hist) / (hist.sum(0) + hist.sum(1) - np.diag(hist)))
    assert out["studies"]["per_class_recall/c2"] == out["precision"][2]
    assert out["studies"]["per_class_precision/c2"] == out["recall"][2]
    named = UnsupervisedMetrics(5)
    named.update(preds, labels)
    studies = named.compute(class_names=list("abcde"))["studies"]
    assert studies["per_class_iou/e"] == pytest.approx(out["iou"][4])


def _brute_best(conf):
    """Best total over injective maps class -> cluster (rows = clusters)."""
    n_rows, k = conf.shape
    return max(sum(conf[rows[c], c] for c in range(k)) for rows in itertools.permutations(range(n_rows), k))


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_hungarian_matches_brute_force(k):
    rng = np.random.default_rng(k)
    for _ in range(25):
        conf = rng.integers(0, 50, size=(k, k))
        rows, cols = hungarian_match(conf)
        assert conf[rows, cols].sum() == _brute_best(conf)
        # through the metrics object: the matched histogram's trace is the best achievable
        m = UnsupervisedMetrics(k)
        pred = np.repeat(np.arange(k), k)
        gt = np.tile(np.arange(k), k)
        for p, t in zip(pred, gt):
            m.update(np.full(conf[p, t], p), np.full(conf[p, t], t))
        out = m.compute()
        np.testing.assert_array_equal(out["confusion"], conf)
        assert np.trace(out["histogram"]) == _brute_best(conf)
        total = conf.sum()
        if total:
            assert out["Accuracy"] == pytest.approx(100 * _brute_best(conf) / total)


@pytest.mark.parametrize("k,e", [(2, 1), (3, 1), (2, 2)])
def test_hungarian_with_extra_clusters_brute_force(k, e):
    rng = np.random.default_rng(10 * k + e)
    for _ in range(15):
        conf = rng.integers(0, 40, size=(k + e, k))
        rows, cols = hungarian_match(conf)
        assert len(set(rows.tolist())) == k
        assert conf[rows, cols].sum() == _brute_best(conf)


def test_extra_clusters_original_drops_corrected_counts():
    preds, labels = _golden_c_inputs(2, absent=False)
    assert (preds >= 5).any()
    orig = _run(preds, labels, extra_clusters=2)
    corr = _run(preds, labels, extra_clusters=2, protocol="corrected")
    base = _run(np.where(preds >= 5, -1, preds), labels, extra_clusters=0)  # original E=0 also drops those pixels
    # original: predictions on clusters >= K never reach the confusion matrix
    assert orig["confusion"].shape == (7, 5)
    assert orig["confusion"][5:].sum() == 0
    np.testing.assert_array_equal(orig["confusion"][:5], base["confusion"])
    assert orig["histogram"].shape == (6, 6)
    assert orig["histogram"][5].sum() == 0 and orig["histogram"][:, 5].sum() == 0
    assert np.isnan(orig["iou"][5])
    assert orig["mIoU"] == pytest.approx(base["mIoU"])
    assert orig["Accuracy"] == pytest.approx(base["Accuracy"])
    # corrected: they stay (rows 5, 6) and count as errors
    n_extra = int(((preds >= 5) & (labels >= 0)).sum())
    assert corr["confusion"][5:].sum() == n_extra
    assert corr["histogram"][5, :5].sum() == n_extra
    valid = int((labels >= 0).sum())
    assert corr["histogram"].sum() == valid
    assert corr["Accuracy"] == pytest.approx(100 * np.trace(corr["histogram"]) / valid)
    assert corr["Accuracy"] < orig["Accuracy"] and corr["mIoU"] < orig["mIoU"]
    assert corr["iou"].shape == (6,)
    assert corr["mIoU"] == pytest.approx(np.nanmean(corr["iou"][:5]))


def test_extra_cluster_hides_errors_in_original_protocol():
    # a cluster >= K that takes all the confusing pixels improves the original score ("free abstention")
    labels = np.array([0, 0, 0, 1, 1, 1])
    pred_e0 = np.array([0, 0, 1, 1, 1, 0])
    pred_e1 = np.array([0, 0, 2, 1, 1, 2])
    e0 = UnsupervisedMetrics(2)
    e0.update(pred_e0, labels)
    e1 = UnsupervisedMetrics(2, extra_clusters=1)
    e1.update(pred_e1, labels)
    c1 = UnsupervisedMetrics(2, extra_clusters=1, protocol="corrected")
    c1.update(pred_e1, labels)
    assert e1.compute()["Accuracy"] == pytest.approx(100.0)
    assert e0.compute()["Accuracy"] == pytest.approx(100 * 4 / 6)
    assert c1.compute()["Accuracy"] == pytest.approx(100 * 4 / 6)
    assert c1.compute()["mIoU"] == pytest.approx(100 * 2 / 3)  # IoU 2/3 for both real classes


def test_miou_skips_nan_classes_and_counts_zero():
    m = UnsupervisedMetrics(3, hungarian=False)
    m.update(np.array([0, 0, 1]), np.array([0, 0, 0]))  # class 1 predicted, never true -> IoU 0; class 2 -> NaN
    out = m.compute()
    assert np.isnan(out["iou"][2]) and out["iou"][1] == 0
    assert out["mIoU"] == pytest.approx((100 * 2 / 3 + 0) / 2)
    assert out["Accuracy"] == pytest.approx(100 * 2 / 3)


def test_update_accepts_tensors_ignores_invalid_and_reset():
    m = UnsupervisedMetrics(3)
    m.update(torch.tensor([[0, 1], [2, 5]]), torch.tensor([[0, -1], [2, 1]]))
    m.update(np.array([1, -1]), np.array([1, 1]))
    np.testing.assert_array_equal(m.confusion, [[1, 0, 0], [0, 1, 0], [0, 0, 1]])
    m.reset()
    assert m.confusion.sum() == 0


def test_bad_inputs():
    m = UnsupervisedMetrics(3)
    with pytest.raises(StegoError, match="^target:"):
        m.update(np.zeros((2, 2), dtype=int), np.zeros(4, dtype=int))
    with pytest.raises(StegoError, match="^pred:"):
        m.update(np.zeros(4), np.zeros(4, dtype=int))
    with pytest.raises(StegoError, match="^protocol:"):
        UnsupervisedMetrics(3, protocol="fixed")
    with pytest.raises(StegoError, match="^extra_clusters:"):
        UnsupervisedMetrics(3, extra_clusters=1, hungarian=False)
    c = UnsupervisedMetrics(3, protocol="corrected")
    with pytest.raises(StegoError, match="^pred:"):
        c.update(np.array([3]), np.array([0]))
