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
