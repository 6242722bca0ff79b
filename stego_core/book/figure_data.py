"""The data of the study's figures (Figure 3, Figure 4, the appendix) from the results store; the charts are in
``stego_core.book.figure_charts`` and both are re-exported by ``stego_core.book.figures``.

Spec §8.6 (stego-studies ``figures.py``). Everything here reads finished artifacts; nothing trains.

Data:
- ``dimension_table(results)``: one row per (dataset, method, code dim, probe, metric) from the tidy results store
  (``stego_core.results``), at each run's selected step (``results.best_rows``: the validation step of maximal
  cluster mIoU, as the study's figure script), averaged over seeds: ``mean``, ``std`` (ddof 1; 0 for one seed),
  ``lo`` / ``hi`` (mean ∓ std), ``n_seeds``, and the display name ``series`` (``SERIES_LABELS``). Only validation
  rows of the training-time validation (no CRF) enter, as in the paper's Figure 4.
- ``dimension_findings(table, dataset, backbone=None)``: the headline numbers of the study on one dataset and one of
  its backbones (STEGO against PCA and RP in cluster mIoU per dimension; PCA's linear-probe mIoU at the full
  dimension against the raw-feature baseline).
- Beyond the paper: ``extended_study_rows(table)`` (the datasets with runs on a DINOv2 / DINOv3 backbone, all their
  backbones), ``backbone_comparison(table)`` (the findings per dataset and backbone) and ``extended_study_status``.
- ``pivot_table(table, metric)``: the same numbers as a readable wide table (one row per series and dimension).
- ``pca_variance_curves(root)``: the explained-variance ratios of every PCA fit cached by
  ``projections.fit_projection`` (read through ``projections.fitted_projections``: the PCA that the PCA runs used),
  one curve per feature source;
  ``variance_frame(curves)``: their cumulative sums against the fraction of components kept, each curve linearly
  interpolated onto a common grid of ``n_points`` fractions of [0, 1] (the study used 768 points). As the study's
  ``plot_pca_cum_variance`` drew it, the cumulative ratio of the first i + 1 components sits at x = i / (C - 1)
  (``np.linspace(0, 1, C)``), so the curve starts at the first component's share at x = 0; ``style="components"``
  puts it at the exact fraction (i + 1) / C instead, starting from (0, 0).
- ``paper_dimension_table(datasets=None)``: the published Figure 4 curves (``stego_core.papers``, read off the
  figure) in the ``dimension_table`` format, for the panel of published curves and for reference lines.

"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from .. import papers
from ..backbones import NEWER_BACKBONES
from ..config import SERIES_LABELS, StegoError, check_choice, check_int
from ..projections import fitted_projections
from ..results import PROBES, best_rows

__all__ = [
    "METHOD_COLORS",
    "SERIES_LABELS",
    "SERIES_ORDER",
    "VARIANCE_STYLES",
    "backbone_comparison",
    "check_table",
    "dimension_findings",
    "dimension_table",
    "dimension_ticks",
    "extended_study_rows",
    "extended_study_status",
    "paper_dimension_table",
    "pca_variance_curves",
    "pivot_table",
    "variance_findings",
    "variance_frame",
]

# the methods' colours (display names: ``config.SERIES_LABELS``) (seaborn "colorblind" indices 3, 0, 2, 6, 8)
METHOD_COLORS: dict[str, str] = {"stego": "#d55e00", "pca": "#029e73", "rp": "#fbafe4", "hnne": "#ece133",
                                 "dino": "#0173b2"}
SERIES_ORDER = tuple(SERIES_LABELS)  # legend order
SPREADS = ("band", "errorbar", "none")
PROBE_TITLES = {"linear": "linear probe", "cluster": "cluster probe"}
_TABLE_COLUMNS = ["dataset", "backbone", "method", "series", "code_dim", "protocol", "probe", "metric", "mean", "std",
                  "lo", "hi", "n_seeds", "best_step"]


# ----------------------------------------------------------------------------------------------------------------------
# data


def dimension_table(results: pd.DataFrame, *, protocol: str | None = "original",
                    metrics: Sequence[str] = ("mIoU", "Accuracy"), datasets: Sequence[str] | None = None,
                    methods: Sequence[str] | None = None) -> pd.DataFrame:
    """Seed-averaged validation scores per (dataset, method, code dim, probe, metric) at each run's selected step.

    results: the tidy results store (``results.load_results``) or any part of it. protocol: keep only this
    protocol's runs (None keeps all; then two protocols of one cell are averaged together, so avoid it when both
    exist). metrics / datasets / methods: filters (None = all). Columns: see ``_TABLE_COLUMNS`` (module doc).
    """
    if not isinstance(results, pd.DataFrame):
        raise StegoError(f"results: expected a pandas DataFrame from results.load_results, "
                         f"got {type(results).__name__}")
    if protocol is not None:
        check_choice("protocol", protocol, ("original", "corrected"))
    best = best_rows(results)
    keep = (best["stage"] == "best") & (best["split"] == "val") & (best["crf"] != True)  # noqa: E712 - nullable
    keep &= best["probe"].isin(PROBES) & best["metric"].isin(list(metrics)) & best["value"].notna()
    if protocol is not None:
        keep &= best["protocol"] == protocol
    if datasets is not None:
        keep &= best["dataset"].isin(list(datasets))
    if methods is not None:
        keep &= best["method"].isin(list(methods))
    best = best[keep.fillna(False).astype(bool)]
    if best.empty:
        return pd.DataFrame({c: pd.Series(dtype="float64" if c in ("mean", "std", "lo", "hi", "best_step")
                                          else "object") for c in _TABLE_COLUMNS})
    cols = ["dataset", "backbone", "method", "code_dim", "protocol", "probe", "metric"]
    best = best.astype({"code_dim": "float64", "step": "float64", "seed": "float64"})
    # one value per run first (a run has one selected step), then mean/std over the runs (seeds) of a cell
    per_run = best.groupby(cols + ["run_id", "seed"], dropna=False, sort=False).agg(
        value=("value", "mean"), step=("step", "mean")).reset_index()
    out = per_run.groupby(cols, dropna=False, sort=True).agg(
        mean=("value", "mean"), std=("value", "std"), n_seeds=("run_id", "nunique"),
        best_step=("step", "mean")).reset_index()
    out["std"] = out["std"].fillna(0.0)
    out["lo"], out["hi"] = out["mean"] - out["std"], out["mean"] + out["std"]
    out["series"] = out["method"].map(lambda m: SERIES_LABELS.get(m, m))
    out["code_dim"] = out["code_dim"].round().astype("int64")
    out = out.astype({c: "object" for c in ("dataset", "backbone", "method", "protocol", "probe", "metric")})
    order = {m: i for i, m in enumerate(SERIES_ORDER)}
    out = out.sort_values(["dataset", "probe", "metric", "method", "code_dim"],
                          key=lambda s: s.map(order) if s.name == "method" else s, kind="stable")
    return out.loc[:, _TABLE_COLUMNS].reset_index(drop=True)


def dimension_ticks(dims: Sequence[int], extra: Sequence[int] = ()) -> list[int]:
    """Axis ticks 3·2^k covering ``dims`` (k = 0, 1, ...), plus the ``extra`` values (e.g. the backbone's C)."""
    dims = [int(d) for d in dims]
    if not dims:
        return [3]
    top = max(dims + [int(e) for e in extra])
    ticks = [3 * 2 ** k for k in range(16) if 3 * 2 ** k <= top]
    return sorted(set(ticks) | {int(e) for e in extra})


def pivot_table(table: pd.DataFrame, metric: str | None = None) -> pd.DataFrame:
    """A readable wide view of ``dimension_table``: one row per (dataset, series, D), one column per probe/metric
    (``"linear mIoU"``, ...), plus ``± std`` columns when some cell has several seeds."""
    check_table(table)
    t = table if metric is None else table[table["metric"] == metric]
    if t.empty:
        return pd.DataFrame()
    t = t.assign(column=t["probe"] + " " + t["metric"])
    index = ["dataset", "series", "code_dim"]
    wide = t.pivot_table(index=index, columns="column", values="mean", sort=False)
    if (t["n_seeds"] > 1).any():
        spread = t.pivot_table(index=index, columns="column", values="std", sort=False)
        spread.columns = [f"{c} ± std" for c in spread.columns]
        wide = wide.join(spread)
        wide["seeds"] = t.groupby(index, sort=False)["n_seeds"].max()
    order = [f"{p} {m}" for m in ("mIoU", "Accuracy") for p in ("linear", "cluster")]
    first = [c for c in order if c in wide.columns]
    wide = wide[first + sorted(c for c in wide.columns if c not in first)]
    return wide.round(2).reset_index().rename(columns={"code_dim": "D", "series": "method"})


def check_table(table: Any) -> None:
    if not isinstance(table, pd.DataFrame) or any(c not in table.columns for c in _TABLE_COLUMNS):
        raise StegoError("table: expected the frame of figures.dimension_table (columns "
                         f"{', '.join(_TABLE_COLUMNS)})")


def _value(table: pd.DataFrame, method: str, dim: int | None, probe: str, metric: str = "mIoU") -> float:
    rows = table[(table["method"] == method) & (table["probe"] == probe) & (table["metric"] == metric)]
    if dim is not None:
        rows = rows[rows["code_dim"] == dim]
    return float(rows["mean"].iloc[0]) if len(rows) else float("nan")


def dimension_findings(table: pd.DataFrame, dataset: str | None = None, backbone: str | None = None) -> dict[str, Any]:
    """The study's headline comparisons on one dataset (mIoU, seed means) and one of its backbones.

    backbone: None = the dataset's only backbone; where it has several (the paper's and the extended study's
    DINOv2 / DINOv3 runs in one store), the first of the paper's backbones (any not in
    ``stego_core.backbones.NEWER_BACKBONES``), else the first name. Two backbones are never mixed.
    Keys: ``dataset``, ``backbone``; ``dims`` (D where STEGO and PCA both ran); ``min_dim``; ``stego_cluster_min``,
    ``pca_cluster_min``, ``rp_cluster_min``, ``hnne_cluster_min`` (cluster mIoU at the smallest D);
    ``stego_minus_pca_cluster_min``; ``stego_beats_pca_cluster`` / ``stego_beats_rp_cluster`` /
    ``stego_beats_hnne_cluster`` (at how many of the common dims STEGO's cluster mIoU is higher) with ``n_dims_pca``
    / ``n_dims_rp`` / ``n_dims_hnne``; ``hnne_beats_pca_cluster`` of ``n_dims_hnne_pca``; ``full_dim`` (the raw
    features' C, from the DINO baseline), ``pca_full_dim`` (largest PCA D), ``pca_linear_full``,
    ``dino_linear`` / ``dino_cluster`` (raw features), ``pca_linear_full_minus_dino``; ``stego_cluster_best`` and
    ``stego_cluster_best_dim``. Missing series give NaN (counts 0).
    """
    check_table(table)
    names = sorted(set(table["dataset"]))
    if dataset is None:
        if len(names) != 1:
            raise StegoError(f"dataset: the table holds {names or 'no datasets'}; name one of them")
        dataset = names[0]
    if dataset not in names:
        raise StegoError(f"dataset: {dataset!r} has no rows in the table; expected one of {names}")
    t = table[table["dataset"] == dataset]
    here = sorted(set(t["backbone"].astype(str)))
    if backbone is None:
        backbone = _default_backbone(here)
    elif backbone not in here:
        raise StegoError(f"backbone: {dataset!r} has no rows for {backbone!r}; expected one of {here}")
    t = t[t["backbone"] == backbone]
    mi = t[t["metric"] == "mIoU"]

    def dims_of(method: str, probe: str = "cluster") -> list[int]:
        return sorted(int(d) for d in mi[(mi["method"] == method) & (mi["probe"] == probe)]["code_dim"])

    stego_dims = set(dims_of("stego"))
    out: dict[str, Any] = {"dataset": dataset, "backbone": backbone}
    common = sorted(stego_dims & set(dims_of("pca")))
    out["dims"] = common
    out["min_dim"] = common[0] if common else (min(stego_dims) if stego_dims else None)
    for m in ("stego", "pca", "rp", "hnne"):
        out[f"{m}_cluster_min"] = _value(mi, m, out["min_dim"], "cluster") if out["min_dim"] else float("nan")
    out["stego_minus_pca_cluster_min"] = out["stego_cluster_min"] - out["pca_cluster_min"]
    for m in ("pca", "rp", "hnne"):
        shared = sorted(stego_dims & set(dims_of(m)))
        out[f"n_dims_{m}"] = len(shared)
        out[f"stego_beats_{m}_cluster"] = sum(_value(mi, "stego", d, "cluster") > _value(mi, m, d, "cluster")
                                              for d in shared)
    shared = sorted(set(dims_of("hnne")) & set(dims_of("pca")))
    out["n_dims_hnne_pca"] = len(shared)
    out["hnne_beats_pca_cluster"] = sum(_value(mi, "hnne", d, "cluster") > _value(mi, "pca", d, "cluster")
                                        for d in shared)
    dino_dims = dims_of("dino")
    out["full_dim"] = dino_dims[0] if dino_dims else None
    pca_dims = dims_of("pca", "linear")
    out["pca_full_dim"] = pca_dims[-1] if pca_dims else None
    out["pca_linear_full"] = _value(mi, "pca", out["pca_full_dim"], "linear") if pca_dims else float("nan")
    out["dino_linear"] = _value(mi, "dino", None, "linear")
    out["dino_cluster"] = _value(mi, "dino", None, "cluster")
    out["pca_linear_full_minus_dino"] = out["pca_linear_full"] - out["dino_linear"]
    st = mi[(mi["method"] == "stego") & (mi["probe"] == "cluster")]
    if len(st):
        top = st.loc[st["mean"].idxmax()]
        out["stego_cluster_best"], out["stego_cluster_best_dim"] = float(top["mean"]), int(top["code_dim"])
    else:
        out["stego_cluster_best"], out["stego_cluster_best_dim"] = float("nan"), None
    return out


def _default_backbone(names: Sequence[str]) -> str | None:
    """The backbone a dataset's findings quote when none is named: the first of the paper's, else the first."""

    names = sorted(names)
    paper = [n for n in names if n not in NEWER_BACKBONES]
    return (paper or names or [None])[0]


# ----------------------------------------------------------------------------------------------------------------------
# beyond the paper: newer backbones


def extended_study_rows(table: pd.DataFrame) -> pd.DataFrame:
    """The rows of ``dimension_table`` for every dataset that has runs on a newer backbone (DINOv2 / DINOv3,
    ``stego_core.backbones.NEWER_BACKBONES``), with all of that dataset's backbones so they can be compared."""

    check_table(table)
    datasets = set(table.loc[table["backbone"].isin(NEWER_BACKBONES), "dataset"])
    return table[table["dataset"].isin(datasets)].reset_index(drop=True)


def backbone_comparison(table: pd.DataFrame) -> pd.DataFrame:
    """Figure 4's headline comparison per dataset and backbone of ``dimension_table`` (``dimension_findings`` of
    each): the raw features' C, cluster mIoU at the smallest common D for STEGO, PCA and RP, at how many of the
    common dimensions STEGO's cluster mIoU is above PCA's and RP's, and the raw features' and STEGO's best cluster
    mIoU. One row per (dataset, backbone), the paper's backbone of a dataset first."""

    check_table(table)
    rows = []
    pairs = table[["dataset", "backbone"]].drop_duplicates().astype(str)
    pairs = pairs.assign(_newer=pairs["backbone"].isin(NEWER_BACKBONES)).sort_values(
        ["dataset", "_newer", "backbone"], kind="stable")
    for dataset, backbone in zip(pairs["dataset"], pairs["backbone"]):
        f = dimension_findings(table, dataset, backbone)
        rows.append({
            "dataset": dataset, "backbone": backbone, "C": f["full_dim"], "smallest D": f["min_dim"],
            "STEGO cluster mIoU at smallest D": f["stego_cluster_min"],
            "PCA cluster mIoU at smallest D": f["pca_cluster_min"],
            "RP cluster mIoU at smallest D": f["rp_cluster_min"],
            "STEGO above PCA (dims)": f"{f['stego_beats_pca_cluster']} of {f['n_dims_pca']}",
            "STEGO above RP (dims)": f"{f['stego_beats_rp_cluster']} of {f['n_dims_rp']}",
            "raw features cluster mIoU": f["dino_cluster"], "best STEGO cluster mIoU": f["stego_cluster_best"],
        })
    out = pd.DataFrame(rows)
    return out.round(2) if len(out) else out


def extended_study_status(table: pd.DataFrame) -> str:
    """One sentence on what the results store holds for the extended study (``extended_study_rows``)."""

    check_table(table)
    newer = table[table["backbone"].isin(NEWER_BACKBONES)]
    if newer.empty:
        return ("This build's results store holds no dimension-study runs on a DINOv2 or DINOv3 backbone, so there is "
                "nothing to compare yet: the commands below produce them.")
    parts = [f"{dataset} ({', '.join(sorted(set(part['backbone'])))})"
             for dataset, part in table.groupby("dataset", sort=True)]
    return "Dimension-study runs on a newer backbone, with every backbone of their datasets: " + "; ".join(parts) + "."


def pca_variance_curves(root: str | os.PathLike | None = None) -> pd.DataFrame:
    """Explained-variance ratios of the PCA fits cached by ``projections.fit_projection`` (every PCA run of a
    sweep, and chapter 03's Figure 3 fit), read through ``projections.fitted_projections``.

    Returns one row per fit: ``source`` (display label), ``dataset``, ``backbone``, ``n_images``, ``n_components``
    (C) and ``ratio`` (the explained-variance ratio vector as a numpy array). Empty frame when there is none.
    """
    rows = []
    for folder, meta, proj in fitted_projections("pca", root):
        ratio = np.asarray(getattr(proj, "explained_variance_ratio_", []), dtype=np.float64)
        if ratio.size == 0:
            continue
        src = meta.get("source") or {}
        rows.append({"dataset": src.get("dataset"), "backbone": src.get("backbone"), "n_images": meta.get("n_images"),
                     "n_components": int(ratio.size), "ratio": ratio, "folder": folder.name})
    df = pd.DataFrame(rows, columns=["dataset", "backbone", "n_images", "n_components", "ratio", "folder"])
    if df.empty:
        return df.assign(source=pd.Series(dtype="object"))
    df["source"] = df["dataset"].astype(str) + " / " + df["backbone"].astype(str)
    dup = df["source"].duplicated(keep=False)
    df.loc[dup, "source"] = df.loc[dup, "source"] + " (" + df.loc[dup, "n_images"].astype(str) + " images)"
    dup = df["source"].duplicated(keep=False)
    df.loc[dup, "source"] = df.loc[dup, "source"] + " " + df.loc[dup, "folder"].str[-10:]
    return df


def variance_findings(curves: Mapping[str, Any] | pd.DataFrame) -> dict[str, Any]:
    """Figure 3's numbers for the first curve: ``source``, ``n_components`` (C), ``sixteenth`` and ``quarter`` (per
    cent of the variance explained by the first C/16 and C/4 components) and ``k90`` (components needed for 90 %).
    NaN / None without a curve."""
    if isinstance(curves, pd.DataFrame):
        curves = dict(zip(curves["source"], curves["ratio"])) if len(curves) else {}
    if not curves:
        return {"source": "none", "n_components": None, "sixteenth": float("nan"), "quarter": float("nan"),
                "k90": None}
    source, ratio = next(iter(curves.items()))
    cumulative = np.cumsum(np.asarray(ratio, dtype=np.float64))
    c = len(cumulative)
    return {"source": str(source), "n_components": c,
            "sixteenth": float(100 * cumulative[max(1, c // 16) - 1]),
            "quarter": float(100 * cumulative[max(1, c // 4) - 1]),
            "k90": int(np.searchsorted(cumulative, 0.9) + 1)}


VARIANCE_STYLES = ("study", "components")


def variance_frame(curves: Mapping[str, Any] | pd.DataFrame, *, n_points: int = 768,
                   style: str = "study") -> pd.DataFrame:
    """Cumulative explained variance against the fraction of components kept, on a common grid.

    curves: label -> explained-variance ratio vector (length C, all components), or the frame of
    ``pca_variance_curves``. style "study" (the study's Figure 3): the points (i / (C - 1), sum of the first i + 1
    ratios) for i = 0..C-1; "components": the points (k / C, sum of the first k ratios) for k = 0..C. Each curve is
    linearly interpolated onto ``n_points`` evenly spaced fractions of [0, 1]. Columns: source, fraction,
    components (how many components that x stands for), cumulative (in [0, 1]), n_components (C).
    """
    check_int("n_points", n_points, minimum=2)
    check_choice("style", style, VARIANCE_STYLES)
    if isinstance(curves, pd.DataFrame):
        if not {"source", "ratio"} <= set(curves.columns):
            raise StegoError("curves: expected the frame of figures.pca_variance_curves (columns source, ratio)")
        curves = dict(zip(curves["source"], curves["ratio"]))
    if not isinstance(curves, Mapping):
        raise StegoError(f"curves: expected a mapping label -> explained-variance ratios, got {type(curves).__name__}")
    grid = np.linspace(0.0, 1.0, n_points)
    parts = []
    for label, ratio in curves.items():
        r = np.asarray(ratio, dtype=np.float64).reshape(-1)
        if r.size < 1 or not np.all(np.isfinite(r)) or (r < -1e-9).any():
            raise StegoError(f"curves: {label!r} is not a vector of non-negative explained-variance ratios")
        c = r.size
        if style == "study" and c > 1:
            xs, ys = np.linspace(0.0, 1.0, c), np.cumsum(r)  # cumulative ratio i at x = i / (C - 1)
            components = 1 + grid * (c - 1)
        else:
            xs, ys = np.arange(c + 1) / c, np.concatenate([[0.0], np.cumsum(r)])  # k / C for k = 0..C
            components = grid * c
        parts.append(pd.DataFrame({"source": label, "fraction": grid, "components": components,
                                   "cumulative": np.interp(grid, xs, ys), "n_components": c}))
    if not parts:
        return pd.DataFrame(columns=["source", "fraction", "components", "cumulative", "n_components"])
    return pd.concat(parts, ignore_index=True)


def paper_dimension_table(datasets: Sequence[str] | str | None = None) -> pd.DataFrame:
    """The published Figure 4 (Koenig et al. 2023, mIoU without CRF, read off the figure; ``stego_core.papers``) in
    the ``dimension_table`` format: one "seed", std 0, ``protocol`` "original", no selected step."""

    values = papers.figure4_values(datasets)
    out = values.assign(series=values["method"].map(lambda m: SERIES_LABELS.get(m, m)), protocol="original",
                        mean=values["value"], std=0.0, lo=values["value"], hi=values["value"], n_seeds=1,
                        best_step=np.nan)
    out = out.astype({"code_dim": "int64"})
    return out.loc[:, _TABLE_COLUMNS].reset_index(drop=True)
