"""The study's figures as Altair charts, from the tables of ``stego_core.book.figure_data``.

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
from collections.abc import Sequence
from typing import Any

import altair as alt
import numpy as np
import pandas as pd

from ..config import StegoError, check_choice
from ..papers import DATASET_LABELS
from ..results import PROBES
from . import viz  # noqa: F401 - importing it enables the offline Altair renderer the book needs
from .figure_data import (
    METHOD_COLORS,
    PROBE_TITLES,
    SERIES_LABELS,
    SERIES_ORDER,
    SPREADS,
    check_table,
    dimension_ticks,
)

__all__ = ["dimension_chart", "variance_chart", "differences_chart"]


_FRACTION_TICKS = (0.0, 1 / 16, 1 / 4, 1 / 2, 3 / 4, 1.0)
_FRACTION_LABELS = "{'0': '0', '0.0625': 'D/16', '0.25': 'D/4', '0.5': 'D/2', '0.75': '3D/4', '1': 'D'}"


def variance_chart(frame: pd.DataFrame, *, reference: pd.DataFrame | None = None,
                   title: str = "Cumulative explained variance of PCA", width: int = 520,
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
    described = ("Cumulative explained variance of PCA against the fraction of the C components kept, one line per "
                 "feature source" + ("; diamonds: the paper's values, read off its Figure 3." if reference is not None
                                     else "."))
    return alt.layer(*layers, title=title).properties(width=width, height=height, description=described)


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
        check_table(reference)
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


def _series_color(t: pd.DataFrame) -> alt.Color:
    """One colour per method (the study's), the published curves ("<method> (paper)") in the same colours."""
    present = [m for m in SERIES_ORDER if m in set(t["method"])] + sorted(set(t["method"]) - set(SERIES_ORDER))
    domain = [SERIES_LABELS.get(m, m) for m in present]
    colours = [METHOD_COLORS.get(m, "#949494") for m in present]
    papers_present = [m for m in present if ((t["kind"] == "paper") & (t["method"] == m)).any()]
    domain += [SERIES_LABELS.get(m, m) + " (paper)" for m in papers_present]
    colours += [METHOD_COLORS.get(m, "#949494") for m in papers_present]
    return alt.Color("series:N", title="method", scale=alt.Scale(domain=domain, range=colours),
                     legend=alt.Legend(orient="right", symbolOpacity=1.0, labelLimit=220))


def _dimension_axis(t: pd.DataFrame, dims: list[int]) -> alt.X:
    """x = D on a log axis, ticks 3·2^k plus the backbone's C unless it sits too close to one of them to be read."""
    ticks = dimension_ticks(dims)
    ticks = sorted(set(ticks) | {d for d in t.loc[t["method"] == "dino", "code_dim"].astype(int)
                                 if min(abs(math.log2(d / k)) for k in ticks) > 0.5})
    return alt.X("code_dim:Q", title="code dimension D (log scale)",
                 scale=alt.Scale(type="log", base=2, domain=[min(dims + ticks), max(dims + ticks)], nice=False),
                 axis=alt.Axis(values=ticks, format="d", labelOverlap=False))


def _tooltip() -> list[alt.Tooltip]:
    return [alt.Tooltip("series:N", title="method"), alt.Tooltip("code_dim:Q", title="D"),
            alt.Tooltip("probe:N"), alt.Tooltip("metric:N"), alt.Tooltip("mean:Q", format=".2f"),
            alt.Tooltip("std:Q", format=".2f"), alt.Tooltip("n_seeds:Q", title="seeds"),
            alt.Tooltip("best_step:Q", title="selected step", format=".0f"),
            alt.Tooltip("dataset:N"), alt.Tooltip("backbone:N")]


def _paper_layers(base: alt.Chart, enc: dict[str, Any]) -> list[alt.Chart]:
    """The published curves: thin dashed lines, the DINO baseline a dotted rule."""
    ref_tip = [alt.Tooltip("series:N", title="published"), alt.Tooltip("code_dim:Q", title="D"),
               alt.Tooltip("probe:N"), alt.Tooltip("mean:Q", title="value (read off the figure)", format=".1f")]
    paper = "datum.kind == 'paper'"
    return [base.mark_line(strokeDash=[5, 3], strokeWidth=1.3, point=alt.OverlayMarkDef(size=12)).encode(
                x=enc["x"], y=enc["y"], color=enc["color"], opacity=enc["opacity"], tooltip=ref_tip)
            .transform_filter(f"{paper} && datum.method != 'dino'"),
            base.mark_rule(strokeDash=[1, 3], strokeWidth=1.5).encode(
                y=enc["y"], color=enc["color"], opacity=enc["opacity"], tooltip=ref_tip)
            .transform_filter(f"{paper} && datum.method == 'dino'")]


def _spread_layers(base: alt.Chart, enc: dict[str, Any], spread: str, y_title: str, pick: Any) -> list[alt.Chart]:
    """±1 std over seeds where a cell has several: a band or error bars for the curves, a band for the DINO rule."""
    if spread == "none":
        return []
    several = f"{_NOT_DINO} && datum.n_seeds > 1"
    lo = alt.Y("lo:Q", title=y_title)
    if spread == "band":
        layers = [base.mark_area(opacity=0.2).encode(
            x=enc["x"], y=lo, y2="hi:Q", color=enc["color"],
            opacity=alt.condition(pick, alt.value(0.22), alt.value(0.03))).transform_filter(several)]
    else:
        layers = [base.mark_rule(strokeWidth=1.5).encode(x=enc["x"], y=lo, y2="hi:Q", color=enc["color"],
                                                         opacity=enc["opacity"]).transform_filter(several)]
    layers.append(base.mark_rect(opacity=0.12).encode(y=lo, y2="hi:Q", color=enc["color"])
                  .transform_filter(f"{_IS_DINO} && datum.n_seeds > 1"))
    return layers


def _slider(base: alt.Chart, enc: dict[str, Any], t: pd.DataFrame, dims: list[int]) -> tuple[Any, list[alt.Chart]]:
    """A control that picks a code dimension D (in D, the reader's unit: 3, 6, …, 768) and labels every series'
    value there with a rule at D."""
    own = sorted({int(d) for d in t.loc[(t["kind"] == "ours") & (t["method"] != "dino"), "code_dim"]}) or dims
    param = alt.param(name="D", value=own[len(own) // 2], bind=alt.binding_select(
        options=own, labels=[f"D = {d}" for d in own], name="code dimension D: "))
    log2_d = "(log(D) / LN2)"
    at_dim = f"{_NOT_DINO} && datum.lo_edge <= {log2_d} && {log2_d} < datum.hi_edge"
    flip = f"{log2_d} > {(math.log2(own[0]) + math.log2(own[-1])) / 2:.3f}"  # labels left of the rule on the right
    layers = [base.mark_rule(color="#777777", strokeDash=[2, 2]).encode(x=enc["x"])
              .transform_filter(at_dim).transform_aggregate(code_dim="max(code_dim)"),
              base.mark_text(align=alt.expr(f"{flip} ? 'right' : 'left'"), dx=alt.expr(f"{flip} ? -6 : 6"),
                             fontSize=10).encode(text="label:N", **enc).transform_filter(at_dim)]
    return param, layers


_OURS = "datum.kind == 'ours'"
_IS_DINO, _NOT_DINO = f"{_OURS} && datum.method == 'dino'", f"{_OURS} && datum.method != 'dino'"


def dimension_chart(table: pd.DataFrame, *, metrics: Sequence[str] = ("mIoU",), methods: Sequence[str] | None = None,
                    probes: Sequence[str] = ("linear", "cluster"), spread: str = "band", slider: bool = True,
                    reference: pd.DataFrame | None = None, title: str | None = None, width: int | None = None,
                    height: int = 190) -> alt.FacetChart:
    """Figure 4 (and its appendix variants): probe scores against the code dimension D, one panel per probe and
    dataset (or metric). See the module doc for the series, axes and interactions.

    table: ``dimension_table``. metrics: one metric (columns = datasets) or several for one dataset (columns =
    metrics). methods: which methods to draw (None = all present). spread: "band" or "errorbar" (±1 std over seeds,
    drawn where a cell has several seeds) or "none". slider: add a control that picks a dimension D and labels
    every series' value there. reference: published values in the same format (``paper_dimension_table()``), drawn
    as thin dashed lines ("<method> (paper)", same colours) in the panels of the datasets ``table`` has too.
    """
    check_table(table)
    check_choice("spread", spread, SPREADS)
    metrics = [metrics] if isinstance(metrics, str) else list(metrics)
    for p in probes:
        check_choice("probes", p, PROBES)
    t, facet_title = _panel_frame(table[table["probe"].isin(list(probes))], metrics, methods, reference)
    if width is None:  # the panels share the text column (about 690 px) with the y axes and the legend
        width = max(150, min(460, 500 // max(1, t["panel"].nunique()) - 20))
    dims = sorted({int(d) for d in t["code_dim"]})
    y_title = f"{metrics[0]} (%)" if len(metrics) == 1 else "score (%)"
    pick = alt.selection_point(fields=["series"], bind="legend", name="series_pick")
    enc = {"x": _dimension_axis(t, dims), "y": alt.Y("mean:Q", title=y_title, scale=alt.Scale(zero=False)),
           "color": _series_color(t), "opacity": alt.condition(pick, alt.value(1.0), alt.value(0.12)),
           "tooltip": _tooltip()}
    base = alt.Chart()
    layers = [base.mark_line(point=alt.OverlayMarkDef(filled=True, size=40)).encode(**enc)
              .transform_filter(_NOT_DINO).add_params(pick)]
    if (t["kind"] == "paper").any():
        layers += _paper_layers(base, enc)
    if not (t["n_seeds"] > 1).any():
        spread = "none"  # one seed everywhere: nothing to draw (and no empty layers)
    layers += _spread_layers(base, enc, spread, y_title, pick)
    # the DINO baseline: dashed horizontal rule (+ a ±std band over seeds) and a point at its own D = C
    layers.append(base.mark_rule(strokeDash=[6, 4], strokeWidth=2).encode(
        y=enc["y"], color=enc["color"], opacity=enc["opacity"], tooltip=enc["tooltip"]).transform_filter(_IS_DINO))
    layers.append(base.mark_point(filled=True, size=60, shape="circle").encode(**enc).transform_filter(_IS_DINO))
    params = []
    if slider:
        param, slider_layers = _slider(base, enc, t, dims)
        params.append(param)
        layers += slider_layers
    chart = alt.layer(*layers, data=t).properties(width=width, height=height).facet(
        row=alt.Row("probe_title:N", title=None, sort=[PROBE_TITLES[p] for p in probes]),
        column=alt.Column("panel:N", title=facet_title, sort=list(dict.fromkeys(t["panel"]))),
    ).resolve_scale(y="independent")
    if params:
        chart = chart.add_params(*params)
    if title:
        chart = chart.properties(title=title)
    return chart.properties(description=_dimension_description(probes, metrics, t))


def _dimension_description(probes: Sequence[str], metrics: list[str], t: pd.DataFrame) -> str:
    """Caption and alt text of a dimension chart: what the panels, axes and series are."""
    rows = " and ".join(PROBE_TITLES[p] for p in probes)
    series = ", ".join(dict.fromkeys(str(s) for s in t["series"]))
    return (f"{' and '.join(metrics)} of the {rows} (rows) against the code dimension D (log scale), one line per "
            f"method ({series}); the dashed line is the DINO baseline (the raw features, its point at D = C); bands "
            f"show ±1 standard deviation over seeds where there are several.")


def differences_chart(diffs: pd.DataFrame, *, width: int = 520, height: int = 200) -> alt.Chart:
    """Mean paired difference (points) against D on a log axis, one colour per comparison, with the 95 % intervals
    as error bars and a rule at zero: a bar entirely above the rule is a difference the seeds support."""
    if not isinstance(diffs, pd.DataFrame) or "comparison" not in diffs.columns:
        raise StegoError("diffs: expected paired_differences frames with a 'comparison' column")
    data = diffs.assign(code_dim=diffs["code_dim"].astype(int), mean=diffs["mean"].astype(float),
                        lo=diffs["lo"].astype(float).fillna(diffs["mean"].astype(float)),
                        hi=diffs["hi"].astype(float).fillna(diffs["mean"].astype(float)))
    pick = alt.selection_point(fields=["comparison"], bind="legend")
    x = alt.X("code_dim:Q", scale=alt.Scale(type="log", base=2), title="code dimension D",
              axis=alt.Axis(values=dimension_ticks(sorted(set(data["code_dim"])))))
    color = alt.Color("comparison:N", title=None)
    opacity = alt.condition(pick, alt.value(1.0), alt.value(0.15))
    base = alt.Chart(data)
    tooltip = ["comparison", "code_dim", "n_seeds", alt.Tooltip("mean:Q", format="+.1f"),
               alt.Tooltip("lo:Q", format="+.1f"), alt.Tooltip("hi:Q", format="+.1f"), "verdict"]
    bars = base.mark_errorbar(ticks=True).encode(x=x, y=alt.Y("lo:Q", title="difference in cluster mIoU (points)"),
                                                 y2="hi:Q", color=color, opacity=opacity)
    points = base.mark_line(point=True).encode(x=x, y="mean:Q", color=color, opacity=opacity, tooltip=tooltip)
    zero = alt.Chart(pd.DataFrame({"y": [0.0]})).mark_rule(color="#555").encode(y="y:Q")
    return alt.layer(zero, bars, points.add_params(pick)).properties(width=width, height=height)
