"""The study's figures: data from the results store and Altair builders for Figure 3, Figure 4 and the appendix.

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

Charts (Altair, tooltips everywhere, legends that highlight the clicked series):
- ``variance_chart(frame, reference=None)``: Figure 3, cumulative explained variance against the fraction of
  components, ticks at 0, D/16, D/4, D/2, 3D/4, D; ``reference`` (``papers.figure3_points()``) adds the paper's
  values as diamonds, labelled as read off the figure.
- ``dimension_chart(table, metrics=("mIoU",))``: Figure 4 and its appendix variants. Rows = probes (linear, then
  cluster); columns = datasets (one metric) or metrics (one dataset, several metrics: the appendix's h-NNE panel).
  x = code dimension D on a log axis with ticks 3·2^k (plus the backbone's dimension when it is not one of them);
  every method but the DINO baseline is a line with points, with a band (or error bars) of ±1 std when a cell has
  several seeds; the DINO baseline (the raw features, D = C) is a dashed horizontal rule with a point at D = C.
  An optional slider picks a dimension and labels every series' value there. ``reference`` (a
  ``paper_dimension_table``) adds the paper's curves as thin dashed lines (its DINO baseline as a dotted rule) to the
  panels of the datasets the table shares with it (a paper profile's run; nothing for the demo's data).
Colours follow the study (seaborn's colour-blind palette: STEGO 3, DINO 0, PCA 2, RP 6, h-NNE 8).
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import altair as alt
import numpy as np
import pandas as pd

from . import (
    papers,
    viz,  # noqa: F401 - importing it enables the offline Altair renderer the book needs
)
from .backbones import NEWER_BACKBONES
from .config import SERIES_LABELS, StegoError, check_choice, check_int
from .papers import DATASET_LABELS
from .projections import fitted_projections
from .results import PROBES, best_rows

__all__ = ["SERIES_LABELS", "METHOD_COLORS", "SERIES_ORDER", "dimension_table", "dimension_ticks", "pivot_table",
           "dimension_findings", "pca_variance_curves", "variance_findings", "variance_frame", "variance_chart",
           "dimension_chart", "paper_dimension_table", "VARIANCE_STYLES", "extended_study_rows", "backbone_comparison",
           "extended_study_status"]

# display names of the methods (``results.method``) and their colours (seaborn "colorblind" indices 3, 0, 2, 6, 8)
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
    ticks = [3 * 2 ** k for k in range(0, 16) if 3 * 2 ** k <= top]
    return sorted(set(ticks) | {int(e) for e in extra})


def pivot_table(table: pd.DataFrame, metric: str | None = None) -> pd.DataFrame:
    """A readable wide view of ``dimension_table``: one row per (dataset, series, D), one column per probe/metric
    (``"linear mIoU"``, ...), plus ``± std`` columns when some cell has several seeds."""
    _check_table(table)
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


def _check_table(table: Any) -> None:
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
    _check_table(table)
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
    _check_table(table)
    datasets = set(table.loc[table["backbone"].isin(NEWER_BACKBONES), "dataset"])
    return table[table["dataset"].isin(datasets)].reset_index(drop=True)


def backbone_comparison(table: pd.DataFrame) -> pd.DataFrame:
    """Figure 4's headline comparison per dataset and backbone of ``dimension_table`` (``dimension_findings`` of
    each): the raw features' C, cluster mIoU at the smallest common D for STEGO, PCA and RP, at how many of the
    common dimensions STEGO's cluster mIoU is above PCA's and RP's, and the raw features' and STEGO's best cluster
    mIoU. One row per (dataset, backbone), the paper's backbone of a dataset first."""
    _check_table(table)
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
    _check_table(table)
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


# ----------------------------------------------------------------------------------------------------------------------
# charts


_FRACTION_TICKS = (0.0, 1 / 16, 1 / 4, 1 / 2, 3 / 4, 1.0)
_FRACTION_LABELS = "{'0': '0', '0.0625': 'D/16', '0.25': 'D/4', '0.5': 'D/2', '0.75': '3D/4', '1': 'D'}"


def variance_chart(frame: pd.DataFrame, *, reference: pd.DataFrame | None = None,
                   title: str = "Cumulative explained variance of PCA", width: int = 420,
                   height: int = 280) -> alt.LayerChart:
    """Figure 3: one line per feature source (``variance_frame``); x = fraction of the C components kept.

    reference: the paper's points (``papers.figure3_points()``: dataset, fraction, cumulative), drawn as diamonds
    labelled "<dataset> · paper (read off the figure)".
    """
    if not isinstance(frame, pd.DataFrame) or not {"source", "fraction", "cumulative"} <= set(frame.columns):
        raise StegoError("frame: expected the frame of figures.variance_frame (columns source, fraction, cumulative)")
    pick = alt.selection_point(fields=["source"], bind="legend")
    axis_x = alt.Axis(values=list(_FRACTION_TICKS), labelExpr=f"{_FRACTION_LABELS}[toString(datum.value)]",
                      title="components kept (fraction of D = C)")
    x = alt.X("fraction:Q", axis=axis_x, scale=alt.Scale(domain=[0, 1]))
    y = alt.Y("cumulative:Q", axis=alt.Axis(format="%", title="cumulative explained variance"),
              scale=alt.Scale(domain=[0, 1]))
    color = alt.Color("source:N", title="features")
    fade = alt.condition(pick, alt.value(1.0), alt.value(0.15))
    layers = [alt.Chart(frame).mark_line(strokeWidth=2).encode(
        x=x, y=y, color=color, opacity=fade,
        tooltip=[alt.Tooltip("source:N", title="features"),
                 alt.Tooltip("components:Q", title="components", format=".1f"),
                 alt.Tooltip("n_components:Q", title="C"),
                 alt.Tooltip("cumulative:Q", title="explained", format=".1%")]).add_params(pick)]
    if reference is not None and len(reference):
        if not {"dataset", "fraction", "cumulative"} <= set(reference.columns):
            raise StegoError("reference: expected papers.figure3_points() (columns dataset, fraction, cumulative)")
        ref = reference.assign(source=reference["dataset"].map(lambda d: DATASET_LABELS.get(d, d))
                               + " · paper (read off the figure)")
        layers.append(alt.Chart(ref).mark_point(shape="diamond", size=90, filled=True).encode(
            x=x, y=y, color=color, opacity=fade,
            tooltip=[alt.Tooltip("source:N", title="values"), alt.Tooltip("fraction:Q", format=".2f"),
                     alt.Tooltip("cumulative:Q", title="explained", format=".0%")]))
    return alt.layer(*layers, title=title).properties(width=width, height=height)


def _panel_frame(table: pd.DataFrame, metrics: Sequence[str], methods: Sequence[str] | None,
                 reference: pd.DataFrame | None = None) -> tuple[pd.DataFrame, str]:
    """Rows of the chart with a ``panel`` column (dataset or metric) and the log2-D stretches the slider needs.

    ``kind`` is "ours" for the table's rows and "paper" for the ``reference`` rows of the table's datasets, which
    join the panel of their dataset (labelled with our backbone)."""
    t = table[table["metric"].isin(list(metrics))]
    if methods is not None:
        t = t[t["method"].isin(list(methods))]
    if t.empty:
        raise StegoError(f"table: no rows for metrics {list(metrics)} and methods {methods}; "
                         "expected a dimension_table with those")
    t = t.copy()
    t["dataset_label"] = t["dataset"] + " · " + t["backbone"]
    t["kind"] = "ours"
    if reference is not None and len(reference):
        _check_table(reference)
        ref = reference[reference["metric"].isin(list(metrics)) & reference["probe"].isin(set(t["probe"]))]
        if methods is not None:
            ref = ref[ref["method"].isin(list(methods))]
        label = t.groupby("dataset", sort=False)["dataset_label"].first()
        ref = ref[ref["dataset"].isin(label.index)].copy()
        if len(ref):
            ref["dataset_label"] = ref["dataset"].map(label)
            ref["kind"] = "paper"
            ref["series"] = ref["series"] + " (paper)"
            t = pd.concat([t, ref], ignore_index=True)
    datasets = list(dict.fromkeys(t["dataset_label"]))
    if len(metrics) == 1:
        t["panel"], facet_title = t["dataset_label"], "dataset"
    elif len(datasets) == 1:
        t["panel"], facet_title = t["metric"], datasets[0]
    else:
        t["panel"], facet_title = t["dataset_label"] + " · " + t["metric"], "dataset · metric"
    t["probe_title"] = t["probe"].map(PROBE_TITLES)
    # panels in the order of the metrics asked for, then of the datasets' first appearance
    t["_m"] = t["metric"].map({m: i for i, m in enumerate(metrics)})
    t["_d"] = t["dataset_label"].map({d: i for i, d in enumerate(datasets)})
    t = t.sort_values(["_d", "_m", "probe", "method", "code_dim"], kind="stable").drop(columns=["_m", "_d"])
    # slider support: each point owns the stretch of log2 D closer to it than to the series' neighbouring dims
    t["log2_dim"] = np.log2(t["code_dim"].astype("float64"))
    group = t.groupby(["panel", "probe", "method", "kind"], sort=False)["log2_dim"]
    t["lo_edge"] = ((t["log2_dim"] + group.shift(1)) / 2).fillna(-100.0)
    t["hi_edge"] = ((t["log2_dim"] + group.shift(-1)) / 2).fillna(100.0)
    t["label"] = t["series"] + ": " + t["mean"].map(lambda v: f"{v:.1f}")
    return t.reset_index(drop=True), facet_title


def dimension_chart(table: pd.DataFrame, *, metrics: Sequence[str] = ("mIoU",), methods: Sequence[str] | None = None,
                    probes: Sequence[str] = ("linear", "cluster"), spread: str = "band", slider: bool = True,
                    reference: pd.DataFrame | None = None, title: str | None = None, width: int = 260,
                    height: int = 190) -> alt.FacetChart:
    """Figure 4 (and its appendix variants): probe scores against the code dimension D, one panel per probe and
    dataset (or metric). See the module doc for the series, axes and interactions.

    table: ``dimension_table``. metrics: one metric (columns = datasets) or several for one dataset (columns =
    metrics). methods: which methods to draw (None = all present). spread: "band" or "errorbar" (±1 std over seeds,
    drawn where a cell has several seeds) or "none". slider: add a dimension slider that labels every series' value.
    reference: published values in the same format (``paper_dimension_table()``), drawn as thin dashed lines
    ("<method> (paper)", same colours) in the panels of the datasets ``table`` has too; ignored elsewhere.
    """
    _check_table(table)
    check_choice("spread", spread, SPREADS)
    metrics = [metrics] if isinstance(metrics, str) else list(metrics)
    for p in probes:
        check_choice("probes", p, PROBES)
    t, facet_title = _panel_frame(table[table["probe"].isin(list(probes))], metrics, methods, reference)
    present = [m for m in SERIES_ORDER if m in set(t["method"])] + sorted(set(t["method"]) - set(SERIES_ORDER))
    domain = [SERIES_LABELS.get(m, m) for m in present]
    colours = [METHOD_COLORS.get(m, "#949494") for m in present]
    papers_present = [m for m in present if ((t["kind"] == "paper") & (t["method"] == m)).any()]
    domain += [SERIES_LABELS.get(m, m) + " (paper)" for m in papers_present]
    colours += [METHOD_COLORS.get(m, "#949494") for m in papers_present]
    color = alt.Color("series:N", title="method", scale=alt.Scale(domain=domain, range=colours),
                      legend=alt.Legend(orient="right", symbolOpacity=1.0, labelLimit=220))
    dims = sorted(set(int(d) for d in t["code_dim"]))
    ticks = dimension_ticks(dims)
    # the backbone's C gets a tick of its own unless it sits too close to a 3·2^k tick to be read
    ticks = sorted(set(ticks) | {d for d in t.loc[t["method"] == "dino", "code_dim"].astype(int)
                                 if min(abs(math.log2(d / k)) for k in ticks) > 0.5})
    x = alt.X("code_dim:Q", title="code dimension D (log scale)",
              scale=alt.Scale(type="log", base=2, domain=[min(dims + ticks), max(dims + ticks)], nice=False),
              axis=alt.Axis(values=ticks, format="d", labelOverlap=False))
    y_title = f"{metrics[0]} (%)" if len(metrics) == 1 else "score (%)"
    y = alt.Y("mean:Q", title=y_title, scale=alt.Scale(zero=False))
    pick = alt.selection_point(fields=["series"], bind="legend", name="series_pick")
    fade = alt.condition(pick, alt.value(1.0), alt.value(0.12))
    tooltip = [alt.Tooltip("series:N", title="method"), alt.Tooltip("code_dim:Q", title="D"),
               alt.Tooltip("probe:N"), alt.Tooltip("metric:N"), alt.Tooltip("mean:Q", format=".2f"),
               alt.Tooltip("std:Q", format=".2f"), alt.Tooltip("n_seeds:Q", title="seeds"),
               alt.Tooltip("best_step:Q", title="selected step", format=".0f"),
               alt.Tooltip("dataset:N"), alt.Tooltip("backbone:N")]
    ours, paper = "datum.kind == 'ours'", "datum.kind == 'paper'"
    is_dino, not_dino = f"{ours} && datum.method == 'dino'", f"{ours} && datum.method != 'dino'"
    base = alt.Chart()
    lines = base.mark_line(point=alt.OverlayMarkDef(filled=True, size=40)).encode(
        x=x, y=y, color=color, opacity=fade, tooltip=tooltip).transform_filter(not_dino).add_params(pick)
    layers = [lines]
    if (t["kind"] == "paper").any():  # the published curves: thin dashed lines, the DINO baseline a dotted rule
        ref_tip = [alt.Tooltip("series:N", title="published"), alt.Tooltip("code_dim:Q", title="D"),
                   alt.Tooltip("probe:N"), alt.Tooltip("mean:Q", title="value (read off the figure)", format=".1f")]
        layers.append(base.mark_line(strokeDash=[5, 3], strokeWidth=1.3, point=alt.OverlayMarkDef(size=12)).encode(
            x=x, y=y, color=color, opacity=fade, tooltip=ref_tip).transform_filter(
            f"{paper} && datum.method != 'dino'"))
        layers.append(base.mark_rule(strokeDash=[1, 3], strokeWidth=1.5).encode(
            y=y, color=color, opacity=fade, tooltip=ref_tip).transform_filter(f"{paper} && datum.method == 'dino'"))
    several = f"{not_dino} && datum.n_seeds > 1"
    if not (t["n_seeds"] > 1).any():
        spread = "none"  # one seed everywhere: nothing to draw (and no empty layers)
    if spread == "band":
        layers.append(base.mark_area(opacity=0.2).encode(x=x, y=alt.Y("lo:Q", title=y_title), y2="hi:Q",
                                                             color=color, opacity=alt.condition(
                                                                 pick, alt.value(0.22), alt.value(0.03)))
                      .transform_filter(several))
    elif spread == "errorbar":
        layers.append(base.mark_rule(strokeWidth=1.5).encode(x=x, y=alt.Y("lo:Q", title=y_title), y2="hi:Q",
                                                            color=color, opacity=fade).transform_filter(several))
    # the DINO baseline: dashed horizontal rule (+ a ±std band over seeds) and a point at its own D = C
    layers.append(base.mark_rule(strokeDash=[6, 4], strokeWidth=2).encode(y=y, color=color, opacity=fade,
                                                                          tooltip=tooltip).transform_filter(is_dino))
    layers.append(base.mark_point(filled=True, size=60, shape="circle").encode(
        x=x, y=y, color=color, opacity=fade, tooltip=tooltip).transform_filter(is_dino))
    if spread != "none":
        layers.append(base.mark_rect(opacity=0.12).encode(y=alt.Y("lo:Q", title=y_title), y2="hi:Q", color=color)
                      .transform_filter(f"{is_dino} && datum.n_seeds > 1"))
    params = []
    if slider:
        own = t[t["kind"] == "ours"]
        lo, hi = float(own["log2_dim"].min()), float(own["log2_dim"].max())
        mid = float(np.log2(dims[len(dims) // 2]))
        params.append(alt.param(name="log2_D", value=round(mid, 2), bind=alt.binding_range(
            min=round(lo, 2), max=round(hi, 2), step=0.05, name="log₂ D: pick a dimension ")))
        at_dim = f"{not_dino} && datum.lo_edge <= log2_D && log2_D < datum.hi_edge"
        layers.append(base.mark_rule(color="#777777", strokeDash=[2, 2]).encode(x=x)
                      .transform_filter(at_dim).transform_aggregate(code_dim="max(code_dim)"))
        flip = f"log2_D > {(lo + hi) / 2:.3f}"  # labels to the left of the rule in the right half of the axis
        layers.append(base.mark_text(align=alt.expr(f"{flip} ? 'right' : 'left'"), dx=alt.expr(f"{flip} ? -6 : 6"),
                                     fontSize=10).encode(
            x=x, y=y, text="label:N", color=color, opacity=fade, tooltip=tooltip).transform_filter(at_dim))
    chart = alt.layer(*layers, data=t).properties(width=width, height=height).facet(
        row=alt.Row("probe_title:N", title=None, sort=[PROBE_TITLES[p] for p in probes]),
        column=alt.Column("panel:N", title=facet_title, sort=list(dict.fromkeys(t["panel"]))),
    ).resolve_scale(y="independent")
    if params:
        chart = chart.add_params(*params)
    if title:
        chart = chart.properties(title=title)
    return chart
