"""The results store: one schema for every method, loading, the study's best-step selection, seed summaries."""
import numpy as np
import pandas as pd
import pytest

from stego_core.config import StegoError
from stego_core.results import (
    RESULT_COLUMNS,
    RESULT_DTYPES,
    best_rows,
    empty_results,
    load_results,
    read_rows,
    summarise,
    write_rows,
)


def _history(run_id, method, *, dim=24, seed=0, cluster=(10.0, 30.0, 20.0), linear=(40.0, 50.0, 60.0),
             steps=(100, 200, 300), dataset="mosaic"):
    """Rows as training writes them: validation history (stage "train") for four metrics."""
    rows = []
    for i, step in enumerate(steps):
        for probe, values in (("cluster", cluster), ("linear", linear)):
            for metric, offset in (("mIoU", 0.0), ("Accuracy", 25.0)):
                rows.append(dict(run_id=run_id, dataset=dataset, backbone="efficientnet_lite0", method=method,
                                 code_dim=dim, seed=seed, protocol="original", crf=False, probe=probe,
                                 metric=metric, step=step, value=values[i] + offset, split="val", stage="train"))
    return rows


def test_schema_identical_for_every_method(tmp_path):
    for i, method in enumerate(["stego", "dino", "pca", "rp", "hnne"]):
        write_rows(tmp_path / "runs" / f"r{i}", _history(f"r{i}", method, dim=112 if method == "dino" else 6))
    df = load_results(tmp_path)
    assert tuple(df.columns) == RESULT_COLUMNS
    assert {c: str(t) for c, t in df.dtypes.items()} == RESULT_DTYPES
    assert sorted(df["method"].unique()) == ["dino", "hnne", "pca", "rp", "stego"]
    assert len(df) == 5 * 12
    for _, part in df.groupby("method"):
        assert {c: str(t) for c, t in part.dtypes.items()} == RESULT_DTYPES
    # a single file reads back with the same dtypes, including the boolean crf column
    one = read_rows(tmp_path / "runs" / "r0" / "results.csv")
    assert one["crf"].dtype == "boolean" and not one["crf"].any()


def test_load_results_on_empty_or_missing_root(tmp_path):
    for root in (tmp_path, tmp_path / "nowhere"):
        df = load_results(root)
        assert df.empty and tuple(df.columns) == RESULT_COLUMNS
        assert {c: str(t) for c, t in df.dtypes.items()} == RESULT_DTYPES
    assert summarise(empty_results()).empty


def test_write_rows_checks_columns_and_replaces_atomically(tmp_path):
    rows = _history("a", "pca")
    write_rows(tmp_path, rows)
    write_rows(tmp_path, rows[:4])  # a run rewrites its whole table
    assert len(read_rows(tmp_path / "results.csv")) == 4
    assert [p.name for p in tmp_path.iterdir()] == ["results.csv"]  # no temporary left behind
    with pytest.raises(StegoError, match="missing result columns"):
        write_rows(tmp_path, [{k: v for k, v in rows[0].items() if k != "seed"}])
    with pytest.raises(StegoError, match="unknown result columns"):
        write_rows(tmp_path, [{**rows[0], "colour": "red"}])
    with pytest.raises(StegoError, match="probe"):
        write_rows(tmp_path, [{**rows[0], "probe": "kmeans"}])
    with pytest.raises(StegoError, match="code_dim"):
        write_rows(tmp_path, [{**rows[0], "code_dim": "many"}])


def test_best_rows_takes_all_metrics_at_the_best_cluster_miou_step():
    df = pd.DataFrame(_history("a", "pca", cluster=(10.0, 30.0, 20.0), linear=(40.0, 50.0, 60.0))
                      + _history("b", "pca", seed=1, cluster=(5.0, 9.0, 9.0), linear=(1.0, 2.0, 3.0)))
    best = best_rows(df)
    a = best[best.run_id == "a"].set_index(["probe", "metric"])["value"]
    assert set(best.loc[best.run_id == "a", "step"]) == {200}
    assert a[("cluster", "mIoU")] == 30.0 and a[("cluster", "Accuracy")] == 55.0
    assert a[("linear", "mIoU")] == 50.0  # not the linear maximum (60): quirk 21
    assert a[("linear", "Accuracy")] == 75.0
    assert set(best.loc[best.run_id == "b", "step"]) == {200}  # ties: the first step with the maximum
    assert (best["stage"] == "best").all() and len(best) == 8
    pd.testing.assert_frame_equal(best_rows(best), best)  # idempotent


def test_best_rows_keeps_own_best_and_final_rows():
    hist = _history("a", "stego")
    own = [{**r, "stage": "best", "value": -1.0} for r in _history("a", "stego") if r["step"] == 300]
    evals = [{**r, "stage": "final", "step": s, "crf": crf, "value": v}
             for r in _history("c", "stego")[:1] for s, crf, v in ((300, True, 70.0), (300, False, 65.0),
                                                                     (100, True, 1.0))]
    only_own = [{**r, "run_id": "d", "stage": "best"} for r in _history("d", "rp") if r["step"] == 100]
    best = best_rows(pd.DataFrame(hist + own + evals + only_own))
    a = best[best.run_id == "a"]
    assert set(a["step"]) == {200} and (a["value"] != -1.0).all()  # recomputed from the history
    c = best[best.run_id == "c"].set_index("crf")["value"]
    assert c[True] == 70.0 and c[False] == 65.0 and len(c) == 2  # latest step per final metric
    assert len(best[best.run_id == "d"]) == 4


def test_summarise_over_seeds():
    rows = []
    for seed, peak in enumerate((30.0, 36.0, 33.0)):
        rows += _history(f"s{seed}", "pca", seed=seed, cluster=(10.0, peak, 20.0))
    rows += _history("other", "rp", seed=0, cluster=(1.0, 2.0, 3.0))
    summary = summarise(pd.DataFrame(rows))
    cell = summary[(summary.method == "pca") & (summary.probe == "cluster") & (summary.metric == "mIoU")].iloc[0]
    assert cell["mean"] == pytest.approx(33.0)
    assert cell["std"] == pytest.approx(np.std([30.0, 36.0, 33.0], ddof=1))
    assert cell["n_seeds"] == 3 and cell["best_step_mean"] == 200
    rp = summary[(summary.method == "rp") & (summary.probe == "cluster") & (summary.metric == "mIoU")].iloc[0]
    assert rp["mean"] == 3.0 and np.isnan(rp["std"]) and rp["n_seeds"] == 1
    assert len(summary) == 8  # 2 methods x 2 probes x 2 metrics
