"""Paired statistics of the dimension study: per-seed differences between two methods at each code dimension with
t intervals (``paired_differences``), the verdict sentence they support (``differences_verdict``) and how far each
run's selected step lies from its last (``convergence_table``). Read from the results store, like the figures."""
from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats

from ..config import SERIES_LABELS, StegoError, check_choice
from ..results import PROBES, best_rows

__all__ = ["convergence_table", "differences_table", "differences_verdict", "paired_differences"]


def _per_run_scores(results: pd.DataFrame, *, probe: str, metric: str, protocol: str | None) -> pd.DataFrame:
    """One value per run at its selected step (``results.best_rows``): dataset, backbone, method, code_dim, seed,
    run_id, value, step (validation rows without CRF, as in Figure 4)."""
    if not isinstance(results, pd.DataFrame):
        raise StegoError(f"results: expected a pandas DataFrame from results.load_results, "
                         f"got {type(results).__name__}")
    check_choice("probe", probe, PROBES)
    best = best_rows(results)
    keep = (best["stage"] == "best") & (best["split"] == "val") & (best["crf"] != True)  # noqa: E712 - nullable
    keep &= (best["probe"] == probe) & (best["metric"] == metric) & best["value"].notna()
    if protocol is not None:
        check_choice("protocol", protocol, ("original", "corrected"))
        keep &= best["protocol"] == protocol
    best = best[keep.fillna(False).astype(bool)]
    cols = ["dataset", "backbone", "method", "code_dim", "seed", "run_id"]
    if best.empty:
        return pd.DataFrame(columns=cols + ["value", "step"])
    best = best.astype({"code_dim": "float64", "step": "float64", "seed": "float64"})
    out = best.groupby(cols, dropna=False, sort=True).agg(value=("value", "mean"), step=("step", "mean"))
    out = out.reset_index()
    out["code_dim"] = out["code_dim"].round().astype("int64")
    out["seed"] = out["seed"].round().astype("int64")
    return out.astype({c: "object" for c in ("dataset", "backbone", "method")})


def paired_differences(results: pd.DataFrame, baseline: str, *, method: str = "stego", probe: str = "cluster",
                       metric: str = "mIoU", protocol: str | None = "original",
                       confidence: float = 0.95) -> pd.DataFrame:
    """``method`` minus ``baseline`` per code dimension, paired by seed, with a t interval over the seeds.

    For every (dataset, backbone, D) and every seed that both have, the difference of the two runs' scores at their
    selected steps (``results.best_rows``, no CRF); ``baseline="dino"`` pairs each D with the raw-feature run of the
    same seed (it has one D, the backbone's C). Columns: dataset, backbone, code_dim, baseline, n_seeds, mean, std
    (ddof 1), lo, hi (the two-sided ``confidence`` interval mean ± t_{n-1} · std / sqrt(n); NaN for one seed),
    verdict ("above" when the interval lies above 0, "below" when below, "undecided" otherwise or with one seed).
    """
    if not 0 < float(confidence) < 1:
        raise StegoError(f"confidence: expected a level between 0 and 1, got {confidence!r}")
    check_choice("baseline", baseline, tuple(SERIES_LABELS))
    check_choice("method", method, tuple(SERIES_LABELS))
    runs = _per_run_scores(results, probe=probe, metric=metric, protocol=protocol)
    cols = ["dataset", "backbone", "code_dim", "baseline", "n_seeds", "mean", "std", "lo", "hi", "verdict"]
    mine = runs[runs["method"] == method]
    other = runs[runs["method"] == baseline]
    keys = ["dataset", "backbone", "seed"] + ([] if baseline == "dino" else ["code_dim"])
    pairs = mine.merge(other.drop(columns=["code_dim"]) if baseline == "dino" else other, on=keys,
                       suffixes=("", "_base"))
    if pairs.empty:
        return pd.DataFrame({c: pd.Series(dtype="object") for c in cols})
    pairs["diff"] = pairs["value"] - pairs["value_base"]
    out = pairs.groupby(["dataset", "backbone", "code_dim"], sort=True).agg(
        n_seeds=("seed", "nunique"), mean=("diff", "mean"), std=("diff", "std")).reset_index()
    t = out["n_seeds"].map(lambda n: stats.t.ppf(0.5 + confidence / 2, n - 1) if n > 1 else np.nan)
    half = t * out["std"] / np.sqrt(out["n_seeds"])
    out["lo"], out["hi"] = out["mean"] - half, out["mean"] + half
    out["verdict"] = np.where(out["lo"] > 0, "above", np.where(out["hi"] < 0, "below", "undecided"))
    out["baseline"] = baseline
    return out.loc[:, cols]


def differences_verdict(diffs: pd.DataFrame, *, method: str = "STEGO", baseline: str | None = None) -> str:
    """A sentence generated from ``paired_differences``: at how many dimensions the 95 % interval lies above zero,
    below zero, or includes it (e.g. "STEGO is above PCA at 4 of 7 dimensions, below at 1, undecided at 2")."""
    if not isinstance(diffs, pd.DataFrame) or "verdict" not in diffs.columns:
        raise StegoError("diffs: expected the frame of figures.paired_differences")
    if diffs.empty:
        return f"no paired runs of {method} and {baseline or 'the baseline'}"
    key = str(diffs["baseline"].iloc[0])
    name = baseline or ("the raw features" if key == "dino" else SERIES_LABELS.get(key, key))
    counts = diffs["verdict"].value_counts()
    n = len(diffs)
    seeds = int(diffs["n_seeds"].min())
    if seeds < 2:
        return (f"{method} − {name} cannot be decided with one seed per dimension "
                f"(the difference is positive at {int((diffs['mean'] > 0).sum())} of {n} dimensions)")
    return (f"{method} is above {name} at {int(counts.get('above', 0))} of {n} dimensions, below at "
            f"{int(counts.get('below', 0))} and undecided at {int(counts.get('undecided', 0))} "
            f"(95 % intervals over {seeds} seeds)")


def convergence_table(results: pd.DataFrame, *, protocol: str | None = "original") -> pd.DataFrame:
    """Per training run: its selected ("best") validation step, its last validation step, and whether the two are
    the same (``picks_last``: the run was still improving when it stopped, a sign it had not converged).
    Columns: run_id, dataset, backbone, method, code_dim, seed, best_step, last_step, n_validations, picks_last."""
    if not isinstance(results, pd.DataFrame):
        raise StegoError(f"results: expected a pandas DataFrame from results.load_results, "
                         f"got {type(results).__name__}")
    hist = results[(results["stage"] == "train") & (results["split"] == "val") & (results["probe"] == "cluster")
                   & (results["metric"] == "mIoU")]
    if protocol is not None:
        hist = hist[hist["protocol"] == protocol]
    cols = ["run_id", "dataset", "backbone", "method", "code_dim", "seed", "best_step", "last_step",
            "n_validations", "picks_last"]
    if hist.empty:
        return pd.DataFrame({c: pd.Series(dtype="object") for c in cols})
    best = _per_run_scores(results, probe="cluster", metric="mIoU", protocol=protocol)[["run_id", "step"]]
    last = hist.astype({"step": "float64"}).groupby("run_id").agg(
        dataset=("dataset", "first"), backbone=("backbone", "first"), method=("method", "first"),
        code_dim=("code_dim", "first"), seed=("seed", "first"), last_step=("step", "max"),
        n_validations=("step", "nunique")).reset_index()
    out = last.merge(best.rename(columns={"step": "best_step"}), on="run_id", how="inner")
    out["picks_last"] = out["best_step"] >= out["last_step"]
    out = out.astype({"best_step": "int64", "last_step": "int64", "n_validations": "int64"})
    return out.loc[:, cols].sort_values(["method", "code_dim", "seed"], kind="stable").reset_index(drop=True)


def differences_table(diffs: pd.DataFrame) -> pd.DataFrame:
    """A readable table of ``paired_differences`` frames (concatenated with a ``comparison`` column such as
    "STEGO − PCA"): one row per comparison and D with the mean difference, its 95 % interval and the verdict."""
    if not isinstance(diffs, pd.DataFrame) or not {"comparison", "mean", "lo", "hi"} <= set(diffs.columns):
        raise StegoError("diffs: expected paired_differences frames with a 'comparison' column")
    if diffs.empty:
        return pd.DataFrame(columns=["comparison", "D", "seeds", "mean difference", "95 % interval", "verdict"])

    def interval(lo: float, hi: float) -> str:
        return "–" if not (np.isfinite(lo) and np.isfinite(hi)) else f"[{lo:+.1f}, {hi:+.1f}]"

    return pd.DataFrame({
        "comparison": diffs["comparison"].to_numpy(), "D": diffs["code_dim"].astype(int).to_numpy(),
        "seeds": diffs["n_seeds"].astype(int).to_numpy(), "mean difference": diffs["mean"].astype(float).round(1),
        "95 % interval": [interval(a, b) for a, b in zip(diffs["lo"].astype(float), diffs["hi"].astype(float))],
        "verdict": diffs["verdict"].to_numpy()}).reset_index(drop=True)
