"""Figure data and builders (stego_core.figures) on small synthetic results frames and PCA fits."""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from stego_core.book import figures
from stego_core.config import StegoError
from stego_core.results import RESULT_DTYPES, write_rows

DIMS = (3, 6, 12, 24, 48, 96, 112)
C = 112


def _score(method: str, dim: int, probe: str, metric: str, seed: int, step: int) -> float:
    """A known, distinct value per cell: lets the tests check which row was selected and how it was averaged."""
    base = {"stego": 40.0, "pca": 30.0, "rp": 20.0, "hnne": 25.0, "dino": 33.0}[method]
    return (base + (5.0 if probe == "linear" else 0.0) + (1.0 if metric == "Accuracy" else 0.0)
            + math.log2(dim) + 2.0 * seed + step / 100.0)


def _results(seeds=(0,), methods=("stego", "pca", "rp", "hnne"), dims=DIMS, dataset="mosaic") -> pd.DataFrame:
    rows = []
    for seed in seeds:
        for method in list(methods) + ["dino"]:
            for dim in ([C] if method == "dino" else dims):
                run_id = f"{dataset}-{method}-d{dim}-s{seed}"
                for step in (100, 200, 300):
                    for probe in ("cluster", "linear"):
                        for metric in ("mIoU", "Accuracy"):
                            value = _score(method, dim, probe, metric, seed, step)
                            if probe == "cluster" and metric == "mIoU" and step == 300:
                                value -= 10.0  # the best cluster step is 200, not the last one
                            rows.append(dict(run_id=run_id, dataset=dataset, backbone="efficientnet_lite0",
                                             method=method, code_dim=dim, seed=seed, protocol="original", crf=False,
                                             probe=probe, metric=metric, step=step, value=value, split="val",
                                             stage="train"))
    return pd.DataFrame(rows).astype(RESULT_DTYPES)


def _spec(chart) -> dict:
    return chart.to_dict()


def _layers(spec: dict) -> list[dict]:
    return spec["spec"]["layer"]


def _data(spec: dict) -> list[dict]:
    return next(iter(spec["datasets"].values()))


# ---------------------------------------------------------------------------------------------------- data


def test_dimension_table_selects_best_step_and_averages_seeds():
    table = figures.dimension_table(_results(seeds=(0, 1)))
    assert set(table["series"]) == {"STEGO", "PCA", "RP", "h-NNE", "DINO baseline"}
    row = table[(table["method"] == "pca") & (table["code_dim"] == 12) & (table["probe"] == "linear")
                & (table["metric"] == "mIoU")].iloc[0]
    # step 200 is selected (max cluster mIoU) for both seeds; the linear value is read at that step
    expected = [_score("pca", 12, "linear", "mIoU", s, 200) for s in (0, 1)]
    assert row["mean"] == pytest.approx(np.mean(expected))
    assert row["std"] == pytest.approx(np.std(expected, ddof=1))
    assert row["lo"] == pytest.approx(row["mean"] - row["std"]) and row["hi"] == pytest.approx(row["mean"] + row["std"])
    assert row["n_seeds"] == 2 and row["best_step"] == 200
    dino = table[(table["method"] == "dino")]
    assert set(dino["code_dim"]) == {C}
    # one row per (method, dim, probe, metric)
    assert len(table) == (4 * len(DIMS) + 1) * 2 * 2


def test_dimension_table_filters_protocol_crf_and_rejects_bad_input():
    df = _results()
    corrected = df.copy()
    corrected["protocol"] = "corrected"
    corrected["run_id"] = corrected["run_id"] + "-c"
    crf = df[df["step"] == 300].copy()
    crf["stage"], crf["crf"], crf["run_id"] = "final", True, crf["run_id"] + "-crf"
    both = pd.concat([df, corrected, crf], ignore_index=True).astype(RESULT_DTYPES)
    table = figures.dimension_table(both, protocol="corrected")
    assert set(table["protocol"]) == {"corrected"} and table["n_seeds"].max() == 1
    assert len(figures.dimension_table(both, metrics=("mIoU",), methods=("stego",))) == len(DIMS) * 2
    assert figures.dimension_table(df.iloc[0:0]).empty
    with pytest.raises(StegoError, match="results"):
        figures.dimension_table("not a frame")
    with pytest.raises(StegoError, match="protocol"):
        figures.dimension_table(df, protocol="new")


def test_findings_and_pivot_table():
    table = figures.dimension_table(_results())
    f = figures.dimension_findings(table)
    assert f["min_dim"] == 3 and f["full_dim"] == C and f["pca_full_dim"] == 112
    assert f["stego_cluster_min"] == pytest.approx(_score("stego", 3, "cluster", "mIoU", 0, 200))
    assert f["stego_minus_pca_cluster_min"] == pytest.approx(10.0)
    assert f["stego_beats_pca_cluster"] == f["n_dims_pca"] == len(DIMS)
    assert f["stego_beats_hnne_cluster"] == f["n_dims_hnne"] == len(DIMS)
    assert f["n_dims_hnne_pca"] == len(DIMS) and f["hnne_beats_pca_cluster"] == 0  # h-NNE scores 25 < PCA's 30
    assert f["pca_linear_full_minus_dino"] == pytest.approx(
        _score("pca", 112, "linear", "mIoU", 0, 200) - _score("dino", C, "linear", "mIoU", 0, 200))
    # make PCA win at D = 6: the count drops by one
    worse = table.copy()
    hit = (worse["method"] == "stego") & (worse["code_dim"] == 6) & (worse["probe"] == "cluster")
    worse.loc[hit, "mean"] = 0.0
    assert figures.dimension_findings(worse)["stego_beats_pca_cluster"] == len(DIMS) - 1
    with pytest.raises(StegoError, match="dataset"):
        figures.dimension_findings(table, "cityscapes")
    wide = figures.pivot_table(table, "mIoU")
    assert list(wide.columns[:5]) == ["dataset", "method", "D", "linear mIoU", "cluster mIoU"]
    assert len(wide) == 4 * len(DIMS) + 1
    assert "cluster mIoU ± std" in figures.pivot_table(figures.dimension_table(_results(seeds=(0, 1)))).columns


def test_variance_findings_reads_the_first_curve():
    ratio = np.array([0.4] + [0.6 / 31] * 31)  # C = 32: one strong component, the rest equal
    f = figures.variance_findings({"toy": ratio, "other": ratio[::-1]})
    assert f["source"] == "toy" and f["n_components"] == 32
    assert f["sixteenth"] == pytest.approx(100 * (0.4 + 0.6 / 31))  # C/16 = 2 components
    assert f["quarter"] == pytest.approx(100 * (0.4 + 7 * 0.6 / 31))  # C/4 = 8 components
    assert f["k90"] == 27  # 0.4 + 26 * 0.6/31 = 0.903 >= 0.9 > 0.4 + 25 * 0.6/31
    empty = figures.variance_findings({})
    assert empty["k90"] is None and math.isnan(empty["quarter"])


def test_dimension_ticks():
    assert figures.dimension_ticks([3, 90, 768]) == [3, 6, 12, 24, 48, 96, 192, 384, 768]
    assert figures.dimension_ticks([3, 48], extra=[112]) == [3, 6, 12, 24, 48, 96, 112]


def test_variance_frame_is_drawn_as_the_study_did():
    """stego-studies' plot_pca_cum_variance: x = np.linspace(0, 1, C) against the cumulative ratios, so the share of
    the first i + 1 components sits at x = i / (C - 1)."""
    ratio = np.array([0.4, 0.3, 0.2, 0.1])  # C = 4: cumulative 0.4, 0.7, 0.9, 1.0 at x = 0, 1/3, 2/3, 1
    frame = figures.variance_frame({"toy": ratio}, n_points=7)  # fractions 0, 1/6, ..., 1
    got = frame.set_index("fraction")["cumulative"]
    assert got.iloc[0] == pytest.approx(0.4) and got.iloc[-1] == pytest.approx(1.0)
    assert got.iloc[2] == pytest.approx(0.7) and got.iloc[4] == pytest.approx(0.9)  # x = 1/3 and 2/3
    assert got.iloc[3] == pytest.approx(0.8)  # x = 1/2: halfway between 0.7 and 0.9
    assert frame["components"].iloc[3] == pytest.approx(2.5)  # 1 + x (C - 1)
    # the exact fraction of components instead: (k / C, share of the first k), from (0, 0)
    exact = figures.variance_frame({"toy": ratio}, n_points=9, style="components").set_index("fraction")["cumulative"]
    assert exact.iloc[0] == 0.0 and exact.iloc[2] == pytest.approx(0.4) and exact.iloc[4] == pytest.approx(0.7)
    assert exact.iloc[1] == pytest.approx(0.2)  # halfway between 0 and the first component
    assert (np.diff(got.values) >= 0).all()
    with pytest.raises(StegoError, match="curves"):
        figures.variance_frame({"bad": [np.nan, 1.0]})
    with pytest.raises(StegoError, match="style"):
        figures.variance_frame({"toy": ratio}, style="exact")


def test_variance_chart_shows_the_papers_points():
    from stego_core import papers

    frame = figures.variance_frame({"toy": np.array([0.5, 0.25, 0.125, 0.125])}, n_points=9)
    spec = figures.variance_chart(frame, reference=papers.figure3_points()).to_dict()
    line, points = spec["layer"]
    assert line["encoding"]["x"]["axis"]["values"] == [0.0, 0.0625, 0.25, 0.5, 0.75, 1.0]
    assert "D/16" in line["encoding"]["x"]["axis"]["labelExpr"]
    assert [p["bind"] for p in spec["params"]] == ["legend"]
    assert points["mark"]["shape"] == "diamond"
    rows = spec["datasets"][points["data"]["name"]]
    got = {(r["source"], r["fraction"]): r["cumulative"] for r in rows}
    assert got[("Cityscapes · paper (read off the figure)", 0.25)] == 0.70
    assert got[("Potsdam-3 · paper (read off the figure)", 0.5)] == 0.79
    assert got[("COCO-Stuff-27 · paper (read off the figure)", 0.25)] == 0.55 and len(got) == 6
    plain = figures.variance_chart(frame).to_dict()
    assert len(plain["layer"]) == 1


def test_pca_variance_curves_reads_cached_fits(tmp_path):
    from stego_core.projections import fit_projection

    class Store:  # the part of a FeatureStore that fit_projection reads
        path = tmp_path / "store"
        meta = {"dataset": "toy", "split": "train", "backbone": "bb", "dim": 8, "grid": (4, 4), "n_items": 6}

        def __len__(self):
            return 6

        def read(self, idx):
            g = np.random.default_rng(1)
            feats = g.normal(size=(6, 8, 4, 4)).astype(np.float32) * np.arange(1, 9, dtype=np.float32)[:, None, None]
            return {"feats": feats[list(idx)]}

    assert figures.pca_variance_curves(tmp_path).empty
    proj = fit_projection("pca", 2, Store(), n_images=6, root=tmp_path)
    curves = figures.pca_variance_curves(tmp_path)
    assert list(curves["source"]) == ["toy / bb"] and curves["n_components"].iloc[0] == 8
    np.testing.assert_allclose(curves["ratio"].iloc[0], proj.explained_variance_ratio_)


# ---------------------------------------------------------------------------------------------------- Figure 4


def test_dimension_chart_series_log_axis_and_dino_reference():
    table = figures.dimension_table(_results())
    spec = _spec(figures.dimension_chart(table))
    rows = _data(spec)
    assert {r["series"] for r in rows} == {"STEGO", "PCA", "RP", "h-NNE", "DINO baseline"}
    assert {r["metric"] for r in rows} == {"mIoU"}
    layers = _layers(spec)
    line = layers[0]
    assert line["mark"]["type"] == "line"
    x = line["encoding"]["x"]
    assert x["scale"]["type"] == "log" and x["scale"]["base"] == 2
    assert x["axis"]["values"][:6] == [3, 6, 12, 24, 48, 96]
    assert line["encoding"]["color"]["scale"]["domain"] == ["STEGO", "PCA", "RP", "h-NNE", "DINO baseline"]
    assert line["encoding"]["color"]["scale"]["range"][0] == figures.METHOD_COLORS["stego"]
    # legend selection (Altair lifts it to the top level, naming the line layer as its view)
    pick = [p for p in spec["params"] if p.get("bind") == "legend"]
    assert len(pick) == 1 and pick[0]["select"]["fields"] == ["series"] and pick[0]["views"] == [line["name"]]
    assert {t["field"] for t in line["encoding"]["tooltip"]} >= {"series", "code_dim", "mean", "std", "n_seeds"}
    # the DINO baseline: a horizontal rule (y only, no x) restricted to the dino rows
    rules = [lay for lay in layers if lay["mark"]["type"] == "rule" and "x" not in lay["encoding"]]
    assert len(rules) == 1 and "dino" in rules[0]["transform"][0]["filter"]
    assert "y" in rules[0]["encoding"]
    # one seed: no spread layer
    assert not any(lay["mark"]["type"] == "area" for lay in layers)
    # the dimension control speaks in D (the reader's unit), not log2 D: the trained dimensions, labelled "D = …"
    slider = [p for p in spec["params"] if isinstance(p.get("bind"), dict)]
    dims = sorted({r["code_dim"] for r in rows if r["method"] != "dino"})
    assert len(slider) == 1 and slider[0]["name"] == "D" and slider[0]["bind"]["input"] == "select"
    assert slider[0]["bind"]["options"] == dims and dims[0] == 3
    assert slider[0]["bind"]["labels"] == [f"D = {d}" for d in dims]
    assert slider[0]["value"] in dims and "log" not in slider[0]["bind"]["name"]
    assert spec["facet"]["row"]["field"] == "probe_title" and spec["facet"]["column"]["field"] == "panel"


def test_dimension_chart_spread_with_two_seeds():
    table = figures.dimension_table(_results(seeds=(0, 1)))
    spec = _spec(figures.dimension_chart(table, slider=False))
    layers = _layers(spec)
    bands = [lay for lay in layers if lay["mark"]["type"] == "area"]
    assert len(bands) == 1
    assert bands[0]["encoding"]["y"]["field"] == "lo" and bands[0]["encoding"]["y2"]["field"] == "hi"
    assert "n_seeds > 1" in bands[0]["transform"][0]["filter"]
    assert not any(isinstance(p.get("bind"), dict) for p in spec["params"])  # no slider
    bars = _layers(_spec(figures.dimension_chart(table, spread="errorbar", slider=False)))
    assert any(lay["mark"]["type"] == "rule" and lay["encoding"].get("y2", {}).get("field") == "hi" for lay in bars)
    # band rows really carry the spread
    rows = _data(spec)
    assert all(r["hi"] > r["lo"] for r in rows)


def test_dimension_chart_panels_methods_and_errors():
    table = figures.dimension_table(_results())
    spec = _spec(figures.dimension_chart(table, metrics=("mIoU", "Accuracy"), methods=("stego", "hnne", "dino")))
    assert spec["facet"]["column"]["sort"] == ["mIoU", "Accuracy"]
    assert {r["series"] for r in _data(spec)} == {"STEGO", "h-NNE", "DINO baseline"}
    two = pd.concat([_results(), _results(dataset="toy")], ignore_index=True)
    spec = _spec(figures.dimension_chart(figures.dimension_table(two)))
    assert len(spec["facet"]["column"]["sort"]) == 2
    # slider stretches: each point owns the log2-D interval up to the midpoints with its neighbours
    rows = [r for r in _data(spec) if r["method"] == "stego" and r["probe"] == "cluster" and r["dataset"] == "toy"]
    by_dim = {r["code_dim"]: r for r in rows}
    assert by_dim[6]["lo_edge"] == pytest.approx((math.log2(3) + math.log2(6)) / 2)
    assert by_dim[6]["hi_edge"] == pytest.approx(by_dim[12]["lo_edge"])
    with pytest.raises(StegoError, match="spread"):
        figures.dimension_chart(table, spread="shade")
    with pytest.raises(StegoError, match="table"):
        figures.dimension_chart(table, metrics=("F1",))
    with pytest.raises(StegoError, match="table"):
        figures.dimension_chart(pd.DataFrame({"a": [1]}))
    json.dumps(spec)  # the spec is plain JSON


def test_dimension_table_from_results_store(tmp_path):
    df = _results(methods=("stego",), dims=(3, 6))
    for run_id, part in df.groupby("run_id"):
        write_rows(tmp_path / "runs" / run_id, part)
    from stego_core.results import load_results

    table = figures.dimension_table(load_results(tmp_path))
    assert set(table["method"]) == {"stego", "dino"} and set(table["code_dim"]) == {3, 6, C}


def test_dimension_chart_draws_the_papers_curves_for_a_paper_dataset():
    from stego_core import papers

    reference = figures.paper_dimension_table()
    ours = figures.dimension_table(_results(dataset="cocostuff27"))
    spec = _spec(figures.dimension_chart(ours, reference=reference))
    rows = _data(spec)
    published = [r for r in rows if r["kind"] == "paper"]
    assert {r["dataset"] for r in published} == {"cocostuff27"}  # only the datasets that ran
    got = {(r["method"], r["code_dim"], r["probe"]): r["mean"] for r in published}
    want = papers.figure4_values("cocostuff27")
    assert got == {(r.method, r.code_dim, r.probe): r.value for r in want.itertuples()}
    assert got[("stego", 3, "cluster")] == 13 and got[("rp", 768, "linear")] == 39
    assert got[("dino", 768, "cluster")] == 12.7
    assert {r["series"] for r in published} == {"STEGO (paper)", "PCA (paper)", "RP (paper)", "DINO baseline (paper)"}
    assert {r["panel"] for r in published} <= {r["panel"] for r in rows if r["kind"] == "ours"}
    dashed = [lay for lay in _layers(spec) if lay["mark"].get("strokeDash") and "paper" in
              lay.get("transform", [{}])[0].get("filter", "")]
    assert len(dashed) == 2  # the curves and the DINO baseline's rule
    assert "DINO baseline (paper)" in _layers(spec)[0]["encoding"]["color"]["scale"]["domain"]
    # the demo's data: no published values to draw
    demo = _spec(figures.dimension_chart(figures.dimension_table(_results()), reference=reference))
    assert all(r["kind"] == "ours" for r in _data(demo))


def test_paper_dimension_table_is_a_chart_of_the_published_figure():
    from stego_core import papers

    table = figures.paper_dimension_table()
    assert set(table.columns) >= {"dataset", "method", "code_dim", "probe", "metric", "mean", "series"}
    spec = _spec(figures.dimension_chart(table, slider=False, title="read off the figure"))
    rows = _data(spec)
    values = papers.figure4_values()
    assert len(rows) == len(values)
    assert {(r["dataset"], r["method"], r["code_dim"], r["probe"], r["mean"]) for r in rows} == \
        {(r.dataset, r.method, r.code_dim, r.probe, r.value) for r in values.itertuples()}
    assert len(spec["facet"]["column"]["sort"]) == 3 and "read off" in json.dumps(spec["title"])
