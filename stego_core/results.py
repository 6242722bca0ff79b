"""The tidy results store: one schema for every method, one row per (run, step, probe, metric), and loading.

Each run writes ``<run_dir>/results.csv`` (``write_rows``, atomic, overwritten as a whole when the run adds rows);
``load_results(root)`` gathers every ``results.csv`` under the artifacts root into one DataFrame with a fixed dtype
per column, so STEGO, the DINO baseline, PCA, RP and h-NNE runs all land in the same table.

Columns (``RESULT_COLUMNS``; dtypes in ``RESULT_DTYPES``):
- ``run_id`` (str): unique per training run (e.g. the run folder's name);
- ``dataset``, ``backbone``, ``method`` ("stego" | "dino" | "pca" | "rp" | "hnne"), ``code_dim`` (int: the code's
  channels; for "dino" the backbone's C), ``seed`` (int), ``protocol`` ("original" | "corrected");
- ``crf`` (bool), ``probe`` ("cluster" | "linear"), ``metric`` ("mIoU", "Accuracy", or per-class names such as
  "IoU/<class>"), ``value`` (float, x100 like the metrics module);
- ``step`` (int, nullable): training step of a validation row; the last step for a final evaluation;
- ``split`` ("val" | "train"): which data the metric was measured on;
- ``stage``: ``"train"`` = the training-time validation history (one row per validation step; single pass, no
  flip, no CRF: the study's Figure 4), ``"best"`` = the rows at the step a run selected itself (written by
  ``stego_core.training``), ``"final"`` = the final evaluation (flip-averaged, with or without CRF: Table 2, written
  by ``stego_core.evaluation.write_final_rows`` under ``<root>/evaluations``; ``split`` is ``"val[:N]"``, the first
  N validation images, and ``run_id`` the run's folder name or ``checkpoint:<file>``).

Selection (``best_rows``) follows the study's figure script (spec §8.6, quirk 21): for every run with a history
(stage "train"), the validation step with the highest cluster-probe mIoU on the validation split (first such step
on ties), and *all* of that run's history rows at that step — so the linear-probe numbers are not their own maxima;
they are returned with stage "best" and replace the run's own "best" rows (recomputed from the history, the trusted
source). A run without history keeps its "best" rows. Final-evaluation rows are kept (the latest step per metric).
``summarise`` gives mean, std (ddof 1) and the number of seeds per cell. ``final_table`` is Table 2 read back: one
row per model, CRF setting and image subset.
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from .config import StegoError, artifacts_root, atomic_write
from .probes import PROBES

__all__ = ["RESULT_COLUMNS", "RESULT_DTYPES", "STAGES", "PROBES", "RESULTS_FILE", "empty_results", "write_rows",
           "read_rows", "load_results", "best_rows", "summarise", "final_table", "GROUP_COLUMNS"]

RESULTS_FILE = "results.csv"
STAGES = ("train", "best", "final")

RESULT_DTYPES: dict[str, str] = {
    "run_id": "string",
    "dataset": "string",
    "backbone": "string",
    "method": "string",
    "code_dim": "Int64",
    "seed": "Int64",
    "protocol": "string",
    "crf": "boolean",
    "probe": "string",
    "metric": "string",
    "step": "Int64",
    "value": "float64",
    "split": "string",
    "stage": "string",
}
RESULT_COLUMNS: tuple[str, ...] = tuple(RESULT_DTYPES)

# One (method, setting) cell of a figure or table: everything but the run, seed, step and value.
GROUP_COLUMNS = ("dataset", "backbone", "method", "code_dim", "protocol", "crf", "probe", "metric", "split", "stage")
_ROW_KEY = ("run_id", "stage", "split", "crf", "probe", "metric")


def empty_results() -> pd.DataFrame:
    """A results frame with no rows and the full schema."""
    return pd.DataFrame({c: pd.Series(dtype=t) for c, t in RESULT_DTYPES.items()})


def _coerce(df: pd.DataFrame, source: str) -> pd.DataFrame:
    """Check the columns and cast each to its schema dtype (StegoError naming ``source`` otherwise)."""
    missing = [c for c in RESULT_COLUMNS if c not in df.columns]
    if missing:
        raise StegoError(f"{source}: missing result columns {missing}; expected {list(RESULT_COLUMNS)}")
    extra = [c for c in df.columns if c not in RESULT_DTYPES]
    if extra:
        raise StegoError(f"{source}: unknown result columns {extra}; the schema is {list(RESULT_COLUMNS)}")
    df = df.loc[:, list(RESULT_COLUMNS)].copy()
    for col, dtype in RESULT_DTYPES.items():
        try:
            if dtype == "boolean" and df[col].dtype == object:
                df[col] = df[col].map(_to_bool)
            df[col] = df[col].astype(dtype)
        except (TypeError, ValueError) as exc:
            raise StegoError(f"{source}: column {col!r} does not fit dtype {dtype} ({exc})") from None
    bad = sorted(set(df["probe"].dropna()) - set(PROBES))
    if bad:
        raise StegoError(f"{source}: column 'probe' has {bad}; expected one of {list(PROBES)}")
    bad = sorted(set(df["stage"].dropna()) - set(STAGES))
    if bad:
        raise StegoError(f"{source}: column 'stage' has {bad}; expected one of {list(STAGES)}")
    return df


def _to_bool(v: Any) -> Any:
    if isinstance(v, str):
        low = v.strip().lower()
        if low in ("true", "1", "yes"):
            return True
        if low in ("false", "0", "no"):
            return False
        if low in ("", "nan", "<na>"):
            return pd.NA
        raise ValueError(f"not a boolean: {v!r}")
    return v


def write_rows(run_dir: str | os.PathLike, rows: Iterable[Mapping[str, Any]] | pd.DataFrame) -> Path:
    """Write a run's rows (dicts or a DataFrame with exactly ``RESULT_COLUMNS``) to ``<run_dir>/results.csv``.

    The file is replaced atomically (temporary file + rename), so readers never see half a table.
    """
    df = rows.copy() if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows))
    df = empty_results() if df.empty and len(df.columns) == 0 else _coerce(df, "rows")
    path = Path(run_dir) / RESULTS_FILE
    with atomic_write(path, "w", newline="") as fh:
        df.to_csv(fh, index=False)
    return path


def read_rows(path: str | os.PathLike) -> pd.DataFrame:
    """One ``results.csv`` with the schema dtypes."""
    path = Path(path)
    try:
        df = pd.read_csv(path, dtype={c: "string" for c, t in RESULT_DTYPES.items() if t == "string"},
                         keep_default_na=True)
    except FileNotFoundError:
        raise StegoError(f"path: {path} does not exist; expected a results.csv written by write_rows") from None
    except pd.errors.EmptyDataError:
        return empty_results()
    return _coerce(df, str(path))


def load_results(root: str | os.PathLike | None = None) -> pd.DataFrame:
    """All ``results.csv`` files under the artifacts root, concatenated (an empty frame with the schema if none)."""
    base = artifacts_root(root)
    files = sorted(base.rglob(RESULTS_FILE)) if base.exists() else []
    frames = [df for df in (read_rows(f) for f in files) if len(df)]
    if not frames:
        return empty_results()
    df = pd.concat(frames, ignore_index=True)
    df = df.astype(RESULT_DTYPES)
    return df.sort_values(["run_id", "stage", "split", "step", "probe", "metric", "crf"],
                          kind="stable", na_position="first").reset_index(drop=True)


def best_rows(df: pd.DataFrame) -> pd.DataFrame:
    """The study's selection: per run, all history rows at the step of maximal val cluster mIoU (as stage "best").

    Runs without history keep their own "best" rows; "final" rows are kept (latest step per metric). Idempotent.
    """
    df = _coerce(df, "df")
    if df.empty:
        return df
    hist = df[df["stage"] == "train"]
    sel = hist[(hist["split"] == "val") & (hist["probe"] == "cluster") & (hist["metric"] == "mIoU")
               & hist["value"].notna()]
    parts = []
    selected_runs: set = set()
    if len(sel):
        # the first step with the maximal value per run: sort by step, idxmax returns the first maximum
        sel = sel.sort_values(["run_id", "step"], kind="stable")
        best = sel.loc[sel.groupby("run_id", sort=False)["value"].idxmax(), ["run_id", "step"]]
        chosen = hist.merge(best, on=["run_id", "step"], how="inner")
        chosen["stage"] = "best"
        parts.append(chosen)
        selected_runs = set(best["run_id"])
    own = df[(df["stage"] == "best") & ~df["run_id"].isin(selected_runs)]
    if len(own):
        parts.append(own)
    fin = df[df["stage"] == "final"]
    if len(fin):
        fin = fin.sort_values(["step"], kind="stable", na_position="first")
        parts.append(fin.groupby(list(_ROW_KEY), sort=False, dropna=False).tail(1))
    if not parts:
        return empty_results()
    out = pd.concat(parts, ignore_index=True).astype(RESULT_DTYPES)
    return out.sort_values(["run_id", "stage", "split", "probe", "metric", "crf"], kind="stable").reset_index(drop=True)


def summarise(df: pd.DataFrame) -> pd.DataFrame:
    """Mean, std (ddof 1; NaN for one seed) and number of seeds per ``GROUP_COLUMNS`` cell, after ``best_rows``."""
    best = best_rows(df)
    cols = list(GROUP_COLUMNS)
    if best.empty:
        out = best.loc[:, cols].copy()
        for name, dtype in (("mean", "float64"), ("std", "float64"), ("n_seeds", "int64"),
                            ("best_step_mean", "float64")):
            out[name] = pd.Series(dtype=dtype)
        return out
    grouped = best.groupby(cols, dropna=False, sort=True)
    out = grouped.agg(mean=("value", "mean"), std=("value", "std"), n_seeds=("seed", "nunique"),
                      best_step_mean=("step", "mean")).reset_index()
    return out


def final_table(df: pd.DataFrame, labels: Mapping[str, str] | None = None) -> pd.DataFrame:
    """Final-evaluation rows (stage ``"final"``) as Table 2: one row per model, CRF setting and image subset, in
    the order the rows were written, with columns model, CRF ("no CRF" / "with CRF"), images, cluster mIoU, cluster
    Accuracy, linear mIoU, linear Accuracy. ``labels``: method -> display name (a projection shows "NAME d=D")."""
    df = _coerce(df, "df")
    fin = df[df["stage"] == "final"]
    columns = ["model", "CRF", "images"] + [f"{p} {m}" for p in PROBES for m in ("mIoU", "Accuracy")]
    if fin.empty:
        return pd.DataFrame(columns=columns)
    labels = dict(labels or {})
    rows: dict[tuple, dict[str, Any]] = {}
    for r in fin.itertuples(index=False):
        name = labels.get(r.method, r.method)
        if r.method not in ("stego", "dino"):
            name = f"{name} d={r.code_dim}"
        images = int(str(r.split).rsplit(":", 1)[-1].rstrip("]")) if str(r.split).startswith("val[:") else pd.NA
        key = (r.run_id, bool(r.crf), r.split)
        row = rows.setdefault(key, {"model": name, "CRF": "with CRF" if r.crf else "no CRF", "images": images})
        row[f"{r.probe} {r.metric}"] = float(r.value)
    return pd.DataFrame(list(rows.values())).reindex(columns=columns)
