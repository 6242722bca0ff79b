"""Paired differences with intervals, the convergence table and the generated verdicts (stego_core.figures)."""
from __future__ import annotations

import math

import pandas as pd
import pytest

from stego_core.book import figures
from stego_core.config import StegoError
from stego_core.results import RESULT_DTYPES

# cluster mIoU at the selected step, per (method, D, seed); the history adds a worse last step to every run
SCORES = {
    ("stego", 6): (50.0, 54.0, 58.0), ("pca", 6): (48.0, 50.0, 52.0),     # differences 2, 4, 6
    ("stego", 12): (60.0, 61.0, 62.0), ("pca", 12): (55.0, 55.0, 55.0),   # differences 5, 6, 7
    ("dino", 112): (40.0, 41.0, 45.0),
}


def _results(seeds=(0, 1, 2), last_best: set = frozenset()) -> pd.DataFrame:
    rows = []
    for (method, dim), values in SCORES.items():
        for seed in seeds:
            run_id = f"mosaic-{method}-d{dim}-s{seed}"
            best = values[seed]
            # steps 100, 200, 300: the best cluster step is 200 unless the run is in last_best (then 300)
            for step, delta in ((100, -3.0), (200, 0.0), (300, -1.0)):
                if run_id in last_best:
                    delta = {100: -3.0, 200: -1.0, 300: 0.0}[step]
                for probe, value in (("cluster", best + delta), ("linear", best + 20.0 + delta)):
                    rows.append(dict(run_id=run_id, dataset="mosaic", backbone="efficientnet_lite0", method=method,
                                     code_dim=dim, seed=seed, protocol="original", crf=False, probe=probe,
                                     metric="mIoU", step=step, value=value, split="val", stage="train"))
    return pd.DataFrame(rows).astype(RESULT_DTYPES)


def test_paired_differences_match_a_hand_computation():
    diffs = figures.paired_differences(_results(), "pca").set_index("code_dim")
    t2 = 4.302652729911275  # t quantile 0.975 with 2 degrees of freedom
    assert diffs.loc[6, "n_seeds"] == 3 and diffs.loc[6, "mean"] == pytest.approx(4.0)
    assert diffs.loc[6, "std"] == pytest.approx(2.0)
    assert diffs.loc[6, "lo"] == pytest.approx(4.0 - t2 * 2.0 / math.sqrt(3))
    assert diffs.loc[6, "hi"] == pytest.approx(4.0 + t2 * 2.0 / math.sqrt(3))
    assert diffs.loc[6, "verdict"] == "undecided"  # the interval reaches below zero
    assert diffs.loc[12, "mean"] == pytest.approx(6.0) and diffs.loc[12, "lo"] == pytest.approx(6.0 - t2 / math.sqrt(3))
    assert diffs.loc[12, "verdict"] == "above"


def test_paired_differences_against_the_raw_features_pair_each_dimension_with_the_seed():
    diffs = figures.paired_differences(_results(), "dino").set_index("code_dim")
    assert list(diffs.index) == [6, 12]
    assert diffs.loc[6, "mean"] == pytest.approx(((50 - 40) + (54 - 41) + (58 - 45)) / 3)
    assert diffs.loc[12, "mean"] == pytest.approx(((60 - 40) + (61 - 41) + (62 - 45)) / 3)
    # reversed: the raw features minus PCA is "below" where STEGO - PCA was "above"
    rev = figures.paired_differences(_results(), "stego", method="pca").set_index("code_dim")
    assert rev.loc[12, "verdict"] == "below" and rev.loc[12, "mean"] == pytest.approx(-6.0)


def test_paired_differences_use_only_seeds_both_have_and_one_seed_is_undecided():
    res = _results()
    one = figures.paired_differences(res[res["seed"] == 1], "pca")
    assert (one["n_seeds"] == 1).all() and one["lo"].isna().all() and (one["verdict"] == "undecided").all()
    dropped = res[~((res["method"] == "pca") & (res["seed"] == 2))]
    two = figures.paired_differences(dropped, "pca").set_index("code_dim")
    assert two.loc[6, "n_seeds"] == 2 and two.loc[6, "mean"] == pytest.approx(3.0)


def test_differences_verdict_is_generated_from_the_intervals():
    text = figures.differences_verdict(figures.paired_differences(_results(), "pca"))
    assert text == ("STEGO is above PCA at 1 of 2 dimensions, below at 0 and undecided at 1 "
                    "(95 % intervals over 3 seeds)")
    single = figures.differences_verdict(figures.paired_differences(_results(seeds=(0,)), "pca"))
    raw = figures.differences_verdict(figures.paired_differences(_results(), "dino"))
    assert raw.startswith("STEGO is above the raw features at 2 of 2")
    assert "cannot be decided with one seed" in single and "positive at 2 of 2" in single
    with pytest.raises(StegoError, match="diffs"):
        figures.differences_verdict(pd.DataFrame({"x": [1]}))
    with pytest.raises(StegoError, match="baseline"):
        figures.paired_differences(_results(), "svd")
    with pytest.raises(StegoError, match="confidence"):
        figures.paired_differences(_results(), "pca", confidence=95)


def test_convergence_table_flags_runs_that_pick_their_last_step():
    res = _results(last_best={"mosaic-stego-d6-s0", "mosaic-pca-d12-s2"})
    table = figures.convergence_table(res)
    assert len(table) == 15 and (table["last_step"] == 300).all() and (table["n_validations"] == 3).all()
    flagged = set(table.loc[table["picks_last"], "run_id"])
    assert flagged == {"mosaic-stego-d6-s0", "mosaic-pca-d12-s2"}
    assert set(table.loc[~table["picks_last"], "best_step"]) == {200}


def test_compare_words_each_comparison_from_its_numbers():
    from stego_core.findings import compare

    assert compare(2.0, 1.0) == "above" and compare(1.0, 2.0) == "below" and compare(1.0, 1.0) == "about equal to"
    assert compare(41.8, 42.0, 1.0) == "about equal to" and compare(37.3, 42.0, 1.0) == "below"
    assert compare(float("nan"), 1.0) == "n/a"


def test_published_counts_show_where_the_paper_has_stego_not_above_pca():
    from stego_core import findings, papers

    pca = findings.published_stego_vs("pca").set_index("dataset")
    fig = papers.figure4_values("potsdam")
    cl = fig[(fig["probe"] == "cluster") & (fig["method"].isin(["stego", "pca"]))]
    wide = cl.pivot_table(index="code_dim", columns="method", values="value")
    # by hand: Potsdam's curves cross at the largest dimensions
    not_above = [int(d) for d, r in wide.iterrows() if not r["stego"] > r["pca"] + findings.TIE]
    assert pca.loc["potsdam", "not_above"] == not_above and len(not_above) >= 1
    assert pca.loc["cocostuff27", "above"] == pca.loc["cocostuff27", "n_dims"] == 9
    crf = findings.published_crf_effects()
    row = crf[(crf["dataset"] == "cocostuff27") & (crf["probe"] == "cluster") & crf["row"].str.startswith("STEGO")]
    t2 = papers.table2_values("cocostuff27")
    pick = t2[(t2["row"] == row["row"].iloc[0]) & (t2["probe"] == "cluster") & (t2["metric"] == "mIoU")]
    want = float(pick[pick["crf"]]["value"].iloc[0] - pick[~pick["crf"]]["value"].iloc[0])
    assert row["effect"].iloc[0] == pytest.approx(want)
    anomaly = findings.potsdam_anomaly()
    assert anomaly["falls"] and anomaly["stego_small_best"] > anomaly["stego_192"]
    assert anomaly["released_no_crf"] > anomaly["stego_96"] and anomaly["released_dim"] == 70


def test_demo_claims_from_a_hand_made_table():
    from stego_core import findings

    rows = []
    for method, dim, probe, mean in [("dino", 112, "cluster", 35.0), ("dino", 112, "linear", 80.0),
                                     ("stego", 12, "cluster", 60.0), ("stego", 12, "linear", 70.0),
                                     ("stego", 24, "cluster", 62.0), ("stego", 24, "linear", 78.5),
                                     ("pca", 12, "cluster", 40.0), ("pca", 12, "linear", 60.0),
                                     ("hnne", 12, "cluster", 30.0)]:
        rows.append({"dataset": "mosaic", "method": method, "code_dim": dim, "probe": probe, "metric": "mIoU",
                     "mean": mean})
    claims = findings.demo_claims(pd.DataFrame(rows), "mosaic")
    assert claims["full_dim"] == 112 and claims["compression_dim"] == 12  # 112 / 8 = 14: log-closest is 12
    assert claims["linear_loss"] == pytest.approx(10.0) and claims["linear_loss_verdict"] == "not little"
    assert claims["stego_vs_raw_cluster"] == "above" and claims["dino_linear_vs_stego"] == "above"
    assert claims["pca_low_vs_raw_cluster"] == "above" and claims["hnne_vs_raw_cluster"] == "below"
    with pytest.raises(StegoError, match="dataset"):
        findings.demo_claims(pd.DataFrame(rows), "cityscapes")


def test_differences_table_and_chart_show_the_intervals():
    frame = pd.concat([figures.paired_differences(_results(), b).assign(comparison=f"STEGO − {b}")
                       for b in ("pca", "dino")])
    table = figures.differences_table(frame)
    assert list(table["D"]) == [6, 12, 6, 12] and list(table["verdict"]) == ["undecided", "above", "above", "above"]
    assert table.loc[1, "95 % interval"] == "[+3.5, +8.5]" and table.loc[1, "mean difference"] == 6.0
    single = figures.differences_table(figures.paired_differences(_results(seeds=(0,)), "pca").assign(comparison="x"))
    assert (single["95 % interval"] == "–").all()
    spec = figures.differences_chart(frame).to_dict()
    marks = [layer["mark"]["type"] if isinstance(layer["mark"], dict) else layer["mark"] for layer in spec["layer"]]
    assert marks == ["rule", "errorbar", "line"]
    with pytest.raises(StegoError, match="comparison"):
        figures.differences_chart(figures.paired_differences(_results(), "pca"))


def test_later_methods_frame_labels_backbones_protocols_and_sources():
    from stego_core import papers

    frame, notes = papers.later_methods_frame()
    assert frame.loc[0, "method"].startswith("STEGO") and frame.loc[0, "COCO"] == "56.9 / 28.2"
    cause = frame[frame["method"] == "CAUSE-TR"].set_index("backbone")
    assert cause.loc["DINOv2 ViT-B/14", "COCO"] == "78.0 / 45.3" and cause.loc["DINO ViT-B/8", "Potsdam"] == "–"
    assert frame["protocol"].str.len().min() > 10 and frame["backbone"].str.len().min() > 3
    assert set(frame["source"]) == set(notes["note"]) and len(notes) == 4


def test_failure_cases_name_lost_classes_from_the_numbers():
    from stego_core import findings

    table = pd.DataFrame({"STEGO": [80.0, 6.1, 50.0, 15.0], "raw": [70.0, 29.8, 65.0, 10.0]},
                         index=["brick", "cat", "grass", "moon"])
    bad, text = findings.failure_cases(table, "STEGO", "raw")
    assert list(bad.index) == ["cat", "grass", "moon"]  # < 20 IoU (cat, moon) or > 10 points below raw (cat, grass)
    assert text.startswith("STEGO fails on cat (IoU 6.1 against 29.8), grass (IoU 50.0 against 65.0)")
    none, text = findings.failure_cases(table.loc[["brick"]], "STEGO", "raw")
    assert none.empty and text.startswith("no class falls below")
    with pytest.raises(StegoError, match="per_class"):
        findings.failure_cases(table, "STEGO", "PCA")
