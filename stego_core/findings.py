"""The paper's findings checked against a build's numbers: every comparison the book's prose makes, computed.

Koenig et al. 2023 state their findings in words; this module turns each into numbers from ``stego_core.papers``
(the published values, with their sources) and from a build's results (``figures.dimension_table`` /
``figures.paired_differences``), and words the comparison from those numbers, so that no sentence of the book
says "beats", "a little" or "at every dimension" without the numbers behind it.

- ``published_stego_vs(baseline, probe)``: per paper dataset, at how many of the published Figure 4 dimensions
  STEGO's curve lies above the baseline's (read off the figure, about ±1 point: differences within ``TIE`` count
  as ties);
- ``published_crf_effects()``: the CRF's effect in the paper, per dataset, model and probe (Table 2 with CRF minus
  the same model without, mIoU);
- ``potsdam_anomaly()``: the published Potsdam numbers behind the study's anomaly (retrained STEGO falls as D grows,
  far below the released D = 70 model);
- ``demo_claims(table, dataset)``: the build's evidence for the paper's claims (raw features strong, ≈ 8x
  compression with little linear-probe loss, the two reasons for the cluster-probe advantage), each with a verdict
  word generated from its numbers;
- ``failure_cases(per_class, model, other)``: the classes a model (nearly) loses, and the sentence naming them;
- ``compare(a, b, tie)``: the one wording rule ("above", "below", "about equal to").
"""
from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from . import papers
from .config import StegoError, check_choice

__all__ = ["TIE", "LITTLE", "compare", "published_stego_vs", "published_crf_effects", "potsdam_anomaly",
           "demo_claims", "FAIL_IOU", "FAIL_GAP", "failure_cases"]

TIE = 1.0  # points: published curves are read off a figure by eye (about ±1 point), so closer values are a tie
LITTLE = 3.0  # points: a linear-probe loss of at most this much is what the book calls "little"


def compare(a: float, b: float, tie: float = 0.0) -> str:
    """"above" / "below" / "about equal to" for a against b (within ``tie`` points: about equal); "n/a" for NaN."""
    if a is None or b is None or not np.isfinite(a) or not np.isfinite(b):
        return "n/a"
    if abs(a - b) <= tie:
        return "about equal to"
    return "above" if a > b else "below"


def published_stego_vs(baseline: str = "pca", probe: str = "cluster") -> pd.DataFrame:
    """Per paper dataset: at how many published Figure 4 dimensions STEGO is above / below / tied with
    ``baseline`` ("pca" or "rp"), with the dimensions where it is not above. Columns: dataset, label, n_dims,
    above, below, ties, not_above (list of D), source."""
    check_choice("baseline", baseline, ("pca", "rp"))
    check_choice("probe", probe, ("cluster", "linear"))
    values = papers.figure4_values()
    values = values[(values["probe"] == probe) & (values["metric"] == "mIoU")]
    rows = []
    for ds in papers.DATASETS:
        part = values[values["dataset"] == ds]
        wide = part.pivot_table(index="code_dim", columns="method", values="value")
        wide = wide.dropna(subset=["stego", baseline])
        verdicts = [compare(s, b, TIE) for s, b in zip(wide["stego"], wide[baseline])]
        rows.append({"dataset": ds, "label": papers.DATASET_LABELS[ds], "n_dims": len(wide),
                     "above": verdicts.count("above"), "below": verdicts.count("below"),
                     "ties": verdicts.count("about equal to"),
                     "not_above": [int(d) for d, v in zip(wide.index, verdicts) if v != "above"],
                     "source": "koenig-figure4"})
    return pd.DataFrame(rows)


def published_crf_effects() -> pd.DataFrame:
    """The CRF's effect in the paper: Table 2 (with CRF) minus the same model without CRF (read off Figure 4,
    one exact value), mIoU in points. Columns: dataset, row, probe, with_crf, without_crf, effect, approx."""
    values = papers.table2_values()
    values = values[values["metric"] == "mIoU"]
    key = ["dataset", "row", "probe"]
    on = values[values["crf"]].set_index(key)
    off = values[~values["crf"]].set_index(key)
    both = on[["value"]].join(off[["value", "approx"]], rsuffix="_off", how="inner").reset_index()
    both = both.rename(columns={"value": "with_crf", "value_off": "without_crf"})
    both["effect"] = both["with_crf"] - both["without_crf"]
    return both[["dataset", "row", "probe", "with_crf", "without_crf", "effect", "approx"]]


def potsdam_anomaly() -> dict[str, Any]:
    """The published Potsdam numbers behind the anomaly (cluster mIoU, no CRF, read off Figure 4): retrained
    STEGO's best small-D value and its D, its values at D = 96 and 192, PCA's at 192, and the released D = 70
    checkpoint without CRF; ``falls`` says whether STEGO at 192 is below its small-D best by more than ``TIE``."""
    fig = papers.figure4_values("potsdam")
    cl = fig[(fig["probe"] == "cluster") & (fig["metric"] == "mIoU")]
    stego = cl[cl["method"] == "stego"].set_index("code_dim")["value"]
    pca = cl[cl["method"] == "pca"].set_index("code_dim")["value"]
    small = stego[stego.index <= 12]
    released = papers.table2_values("potsdam", crf=False)
    released = released[(released["method"] == "stego") & (released["probe"] == "cluster")
                        & (released["metric"] == "mIoU")]
    out = {"stego_small_best": float(small.max()), "stego_small_best_dim": int(small.idxmax()),
           "stego_96": float(stego.get(96, np.nan)), "stego_192": float(stego.get(192, np.nan)),
           "pca_192": float(pca.get(192, np.nan)),
           "released_no_crf": float(released["value"].iloc[0]) if len(released) else float("nan"),
           "released_dim": int(papers.PAPER_SETTINGS["potsdam"]["stego_dim"])}
    out["falls"] = bool(out["stego_small_best"] - out["stego_192"] > TIE)
    out["stego_vs_pca_192"] = compare(out["stego_192"], out["pca_192"], TIE)
    return out


def _value(table: pd.DataFrame, method: str, probe: str, dim: int | None = None) -> float:
    rows = table[(table["method"] == method) & (table["probe"] == probe) & (table["metric"] == "mIoU")]
    if dim is not None:
        rows = rows[rows["code_dim"] == dim]
    return float(rows["mean"].iloc[0]) if len(rows) else float("nan")


def demo_claims(table: pd.DataFrame, dataset: str) -> dict[str, Any]:
    """The build's evidence for the paper's claims on ``dataset`` (seed means of ``figures.dimension_table``).

    Keys: ``full_dim`` (C of the raw features), ``compression_dim`` (the swept D closest to C / 8) and
    ``compression`` (C / that D); ``stego_linear_compressed`` and ``dino_linear`` with ``linear_loss`` (raw minus
    STEGO, points) and ``linear_loss_verdict`` ("little" when at most ``LITTLE`` points, else "not little");
    ``stego_cluster_best`` / ``dino_cluster`` with ``stego_vs_raw_cluster`` and ``dino_linear_vs_stego``
    (``compare``); the mechanism: ``pca_cluster_compressed`` (a linear projection to low D, no training) with
    ``pca_low_vs_raw_cluster``, ``hnne_cluster_best`` (a non-linear projection, no training) with
    ``hnne_vs_raw_cluster``.
    """
    need = {"dataset", "method", "code_dim", "probe", "metric", "mean"}
    if not isinstance(table, pd.DataFrame) or not need <= set(table.columns):
        raise StegoError("table: expected the frame of figures.dimension_table")
    t = table[table["dataset"] == dataset]
    if t.empty:
        raise StegoError(f"dataset: {dataset!r} has no rows in the table")
    out: dict[str, Any] = {}
    dino_dims = sorted(set(t.loc[t["method"] == "dino", "code_dim"]))
    out["full_dim"] = int(dino_dims[0]) if dino_dims else None
    dims = sorted(set(t.loc[t["method"] == "stego", "code_dim"]) - {out["full_dim"]})
    if out["full_dim"] and dims:
        out["compression_dim"] = int(min(dims, key=lambda d: abs(np.log(d) - np.log(out["full_dim"] / 8))))
        out["compression"] = out["full_dim"] / out["compression_dim"]
    else:
        out["compression_dim"], out["compression"] = None, float("nan")
    d = out["compression_dim"]
    out["stego_linear_compressed"] = _value(t, "stego", "linear", d) if d else float("nan")
    out["dino_linear"] = _value(t, "dino", "linear")
    out["linear_loss"] = out["dino_linear"] - out["stego_linear_compressed"]
    out["linear_loss_verdict"] = ("n/a" if not np.isfinite(out["linear_loss"])
                                  else "little" if out["linear_loss"] <= LITTLE else "not little")
    st = t[(t["method"] == "stego") & (t["probe"] == "cluster") & (t["metric"] == "mIoU")]
    out["stego_cluster_best"] = float(st["mean"].max()) if len(st) else float("nan")
    out["dino_cluster"] = _value(t, "dino", "cluster")
    out["stego_vs_raw_cluster"] = compare(out["stego_cluster_best"], out["dino_cluster"])
    out["stego_linear_best"] = float(t[(t["method"] == "stego") & (t["probe"] == "linear")
                                       & (t["metric"] == "mIoU")]["mean"].max()) if len(st) else float("nan")
    out["dino_linear_vs_stego"] = compare(out["dino_linear"], out["stego_linear_best"])
    out["pca_cluster_compressed"] = _value(t, "pca", "cluster", d) if d else float("nan")
    out["pca_low_vs_raw_cluster"] = compare(out["pca_cluster_compressed"], out["dino_cluster"])
    hn = t[(t["method"] == "hnne") & (t["probe"] == "cluster") & (t["metric"] == "mIoU")]
    out["hnne_cluster_best"] = float(hn["mean"].max()) if len(hn) else float("nan")
    out["hnne_vs_raw_cluster"] = compare(out["hnne_cluster_best"], out["dino_cluster"])
    return out


FAIL_IOU = 20.0  # IoU (%) below which a class counts as (nearly) lost
FAIL_GAP = 10.0  # points: a class this far below the other model's IoU counts as a failure too


def failure_cases(per_class: pd.DataFrame, model: str, other: str) -> tuple[pd.DataFrame, str]:
    """Classes where ``model``'s IoU (a column of ``per_class``, indexed by class name) is below ``FAIL_IOU`` or
    more than ``FAIL_GAP`` points below ``other``'s, and a sentence generated from them."""
    for name in (model, other):
        if name not in per_class.columns:
            raise StegoError(f"per_class: no column {name!r}; expected one of {list(per_class.columns)}")
    a, b = per_class[model].astype(float), per_class[other].astype(float)
    bad = per_class[(a < FAIL_IOU) | (b - a > FAIL_GAP)]
    if bad.empty:
        return bad, (f"no class falls below {FAIL_IOU:.0f} IoU for {model} or more than {FAIL_GAP:.0f} points "
                     f"below {other}")
    parts = [f"{cls} (IoU {bad.loc[cls, model]:.1f} against {bad.loc[cls, other]:.1f})" for cls in bad.index]
    return bad, f"{model} fails on " + ", ".join(parts) + f", compared with {other}"
