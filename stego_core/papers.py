"""The papers' published numbers as data, every value with the source it was copied from.

What the book compares its own numbers with: Table 2 of Koenig et al. 2023 (released STEGO checkpoints against the
DINO baseline, with CRF, and the no-CRF values of the same models read off the study's Figure 4), the two
independent reports of the released checkpoints' numbers, the Figure 3 points (cumulative explained variance of
PCA), the Figure 4 curves (probe mIoU against the code dimension, per dataset and method) and later methods on the
same benchmarks. The values were taken from the sources named in ``SOURCES``; ``approx=True`` marks values read
off a plotted figure by eye (about ±1 point), which the book prints with "≈". Entries a source does not report are
absent (the tables show "–"). The papers' conclusions are prose and live in the book, not here.

Tidy accessors (pandas DataFrames, one row per number):

- ``table2_values(dataset=None, crf=None)``: dataset, backbone, code_dim, row (the table's row name), method
  ("stego" / "dino"), crf, probe ("cluster" = the unsupervised cluster probe, "linear"), metric ("Accuracy",
  "mIoU"), value (%), approx, source (a key of ``SOURCES``);
- ``table2_frame(dataset=None)``: the same as the book shows it (one row per model and CRF setting, the four
  numbers as text, a short source column) and the table of notes that spells the sources out;
- ``figure3_points()``: dataset, fraction (of the C components kept), cumulative (explained variance, 0..1);
- ``figure4_values(datasets=None)``: dataset, backbone, method ("stego" retrained per D, "pca", "rp", "dino" the
  raw-feature baseline at D = C), code_dim, probe, metric ("mIoU"), value, approx, source;
- ``later_methods()``: method, backbone, dataset, Accuracy, mIoU, source.

Datasets use this package's names (``cocostuff27``, ``cityscapes``, ``potsdam``); ``DATASET_LABELS`` has the
paper's; ``PAPER_SETTINGS`` the backbone and dimensions of each.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import pandas as pd

from .config import StegoError, check_choice
from .probes import PROBES

__all__ = ["SOURCES", "DATASETS", "DATASET_LABELS", "PAPER_SETTINGS", "FIGURE4_DIMS", "TABLE2_LABELS",
           "TABLE2_DATASETS", "table2_values", "table2_frame", "figure3_points", "figure4_values", "later_methods",
           "LATER_PROTOCOLS", "later_methods_frame"]

_POSTER = ("axkoenig/axkoenig.github.io, content/research/stego/media/cvpr23_poster.pdf: table \"Validation results "
           "of reproducibility study\"")
_README = "github.com/merantix-momentum/stego-studies README"
#: Where each number comes from (the ``source`` column holds these keys).
SOURCES: dict[str, str] = {
    "stego-paper": ("the STEGO paper (Hamilton et al., ICLR 2022), as quoted in Table 2 of Koenig et al. 2023 "
                    f"(the first author's CVPR 2023 workshop poster, {_POSTER})"),
    "koenig-table2": (f"Table 2 of Koenig et al. 2023, the study's own evaluation with CRF (poster, {_POSTER}; "
                      f"{_README}, \"Reproducing Table 2\": eval_segmentation.py run_crf=True)"),
    "stego-issue-3": ("mhamilton723/STEGO issue 3: a user's evaluation of the released CocoStuff ViT-B/8 checkpoint "
                      "with CRF"),
    "stego-issue-39": "mhamilton723/STEGO issue 39: a user's evaluation of the released potsdam_test.ckpt with CRF",
    "koenig-figure4": (f"read off Figure 4 of Koenig et al. 2023 ({_README} figure results/figures/"
                       "all_datasets_miou.jpg), without CRF; by eye, about ±1 point"),
    "koenig-checkpoint": (f"{_README}: the DINO-baseline checkpoint name 1809-cluster_miou46.57.ckpt "
                          "(exact, without CRF)"),
    "koenig-figure3": ("read off Figure 3 of Koenig et al. 2023 (the poster's PCA figure, stego-studies "
                       "plot_pca_cumvar; PCA on 5,000 training images per dataset); by eye"),
    "cause": "ByungKwanLee/Causal-Unsupervised-Segmentation README",
    "primaps": "visinf/primaps README",
    "u2seg": "the U2Seg paper's abstract (+7.0 pixel accuracy over STEGO)",
}

DATASETS = ("cocostuff27", "cityscapes", "potsdam")
DATASET_LABELS = {"cocostuff27": "COCO-Stuff-27", "cityscapes": "Cityscapes", "potsdam": "Potsdam-3"}
#: backbone, the released STEGO model's code dimension and the backbone's C, per dataset (stego-spec §9.1)
PAPER_SETTINGS: dict[str, dict[str, Any]] = {
    "cocostuff27": {"backbone": "dino_vitb8", "stego_dim": 90, "vit_dim": 768},
    "cityscapes": {"backbone": "dino_vitb8", "stego_dim": 100, "vit_dim": 768},
    "potsdam": {"backbone": "dino_vits8", "stego_dim": 70, "vit_dim": 384},
}
_NUMBERS = ("cluster/Accuracy", "cluster/mIoU", "linear/Accuracy", "linear/mIoU")

# ---------------------------------------------------------------------------------------------------------------
# Table 2 (with CRF): row -> dataset -> (cluster acc, cluster mIoU, linear acc, linear mIoU); None = not reported
_TABLE2_CRF: dict[str, tuple[str, str, dict[str, tuple]]] = {
    "STEGO (theirs)": ("stego", "stego-paper", {
        "cocostuff27": (56.9, 28.2, 76.1, 41.0), "cityscapes": (73.2, 21.0, None, None),
        "potsdam": (77.0, None, None, None)}),
    "STEGO (ours, released checkpoint)": ("stego", "koenig-table2", {
        "cocostuff27": (56.9, 28.2, 76.1, 41.1), "cityscapes": (73.2, 21.0, 89.6, 28.0),
        "potsdam": (77.0, 62.6, 85.9, 74.8)}),
    "DINO (theirs)": ("dino", "stego-paper", {
        "cocostuff27": (30.5, 9.6, 66.8, 29.4)}),
    "DINO (ours)": ("dino", "koenig-table2", {
        "cocostuff27": (42.4, 13.0, 75.8, 44.4), "cityscapes": (52.6, 15.2, 91.3, 34.9),
        "potsdam": (71.3, 54.3, 84.5, 72.8)}),
    "STEGO (released checkpoint, issue report)": ("stego", "", {
        "cocostuff27": (56.93, 28.19, 76.13, 41.07), "potsdam": (77.03, 62.57, 85.85, 74.83)}),
}
_ISSUE_SOURCE = {"cocostuff27": "stego-issue-3", "potsdam": "stego-issue-39"}

# Without CRF, mIoU only (cluster, linear), read off Figure 4 except the one exact checkpoint value.
_TABLE2_NO_CRF: dict[str, tuple[str, dict[str, tuple]]] = {
    "STEGO (ours, released checkpoint)": ("stego", {
        "cocostuff27": (26.9, 39.6), "cityscapes": (19.7, 27.2), "potsdam": (58.5, 69.6)}),
    "DINO (ours)": ("dino", {
        "cocostuff27": (12.7, 39.6), "cityscapes": (14.5, 34.2), "potsdam": (46.57, 66.4)}),
}
_EXACT_NO_CRF = {("DINO (ours)", "potsdam", "cluster"): "koenig-checkpoint"}

# ---------------------------------------------------------------------------------------------------------------
# Figure 3: cumulative explained variance at D_ViT/4 and D_ViT/2 components
_FIGURE3 = {"cityscapes": (0.70, 0.86), "potsdam": (0.57, 0.79), "cocostuff27": (0.55, 0.78)}

# ---------------------------------------------------------------------------------------------------------------
# Figure 4: mIoU against D without CRF, read off the figure; None = not run (768 exceeds Potsdam's ViT-S)
FIGURE4_DIMS = (3, 6, 12, 24, 48, 96, 192, 384, 768)
_FIGURE4: dict[str, dict[str, dict[str, tuple]]] = {
    "linear": {
        "cocostuff27": {"stego": (11, 20.5, 31, 36, 40, 40.5, 39.6, 36.5, 33.8),
                        "pca": (6, 10, 14.5, 20.5, 26, 31, 35, 37.5, 40.3),
                        "rp": (2, 3, 5, 9, 15, 21.5, 29, 34, 39)},
        "cityscapes": {"stego": (10.5, 15.5, 19.8, 22, 25, 28.3, 27.4, 30.4, 24.6),
                       "pca": (9.8, 11, 17, 20.6, 24, 29.6, 33.7, 32.7, 34.7),
                       "rp": (3.7, 6.6, 10.4, 15.8, 21.4, 25, 27.4, 31.5, 32.2)},
        "potsdam": {"stego": (60, 63, 64.5, 67.5, 67.2, 72, 65, 67, None),
                    "pca": (43, 46.5, 49.7, 51.5, 53.3, 55, 57, 59.5, None),
                    "rp": (17.5, 20.7, 30, 36.7, 42.6, 49.3, 54.5, 59, None)},
    },
    "cluster": {
        "cocostuff27": {"stego": (13, 19.7, 23.4, 25.4, 26.8, 26.2, 27.2, 25.7, 24.1),
                        "pca": (5, 8.5, 9.6, 12.7, 12, 13.3, 12.2, 11, 14.3),
                        "rp": (2.4, 3.3, 4.5, 5.8, 6.5, 8.8, 10.6, 12.6, 12.6)},
        "cityscapes": {"stego": (11.3, 14.3, 16.1, 18.2, 19, 19.8, 19.2, 18.7, 19.4),
                       "pca": (6.8, 10.6, 11.7, 13.2, 13.8, 13.8, 12.5, 12.7, 13.6),
                       "rp": (2.5, 4.7, 6.7, 9, 10.5, 10.7, 12.1, 11.8, 12.1)},
        "potsdam": {"stego": (58.6, 61.4, 58.3, 52, 45.3, 37.7, 37.3, 41.8, None),
                    "pca": (35.4, 36.3, 36, 36, 36.3, 36, 42, 42, None),
                    "rp": (21.8, 22.4, 25, 26.8, 29.6, 32.7, 36.5, 35.8, None)},
    },
}

# ---------------------------------------------------------------------------------------------------------------
# later methods: (method, backbone, {dataset: (accuracy, mIoU)}, source)
_LATER = (
    ("CAUSE-TR", "DINO ViT-B/8", {"cocostuff27": (74.9, 41.9), "cityscapes": (90.8, 28.0)}, "cause"),
    ("CAUSE-TR", "DINOv2 ViT-B/14", {"cocostuff27": (78.0, 45.3), "cityscapes": (89.8, 29.9)}, "cause"),
    ("PriMaPs-EM", "DINO ViT-B/8", {"cocostuff27": (48.5, 21.9), "cityscapes": (59.6, 17.6),
                                    "potsdam": (80.5, 67.0)}, "primaps"),
    ("STEGO + PriMaPs", "DINO ViT-B/8", {"cocostuff27": (57.9, 29.7), "cityscapes": (78.6, 21.6),
                                         "potsdam": (83.3, 71.0)}, "primaps"),
    ("U2Seg", "ResNet-50 (DINO init)", {"cocostuff27": (63.9, 30.2)}, "u2seg"),
)


def _check_datasets(datasets: Iterable[str] | str | None) -> list[str]:
    if datasets is None:
        return list(DATASETS)
    datasets = [datasets] if isinstance(datasets, str) else list(datasets)
    for d in datasets:
        check_choice("dataset", d, DATASETS)
    return datasets


def _code_dim(dataset: str, method: str) -> int:
    key = "stego_dim" if method == "stego" else "vit_dim"
    return int(PAPER_SETTINGS[dataset][key])


def table2_values(dataset: str | Iterable[str] | None = None, crf: bool | None = None) -> pd.DataFrame:
    """Every published Table 2 number (module docstring for the columns); ``crf`` None = with and without."""
    datasets = _check_datasets(dataset)
    if crf is not None and not isinstance(crf, bool):
        raise StegoError(f"crf: expected True, False or None, got {crf!r}")
    rows = []
    for row, (method, source, per_dataset) in _TABLE2_CRF.items():
        for ds in datasets:
            for key, value in zip(_NUMBERS, per_dataset.get(ds, ())):
                if value is None:
                    continue
                probe, metric = key.split("/")
                rows.append(dict(dataset=ds, row=row, method=method, crf=True, probe=probe, metric=metric,
                                 value=float(value), approx=False, source=source or _ISSUE_SOURCE[ds]))
    for row, (method, per_dataset) in _TABLE2_NO_CRF.items():
        for ds in datasets:
            for probe, value in zip(PROBES, per_dataset.get(ds, ())):
                exact = _EXACT_NO_CRF.get((row, ds, probe))
                rows.append(dict(dataset=ds, row=row, method=method, crf=False, probe=probe, metric="mIoU",
                                 value=float(value), approx=exact is None, source=exact or "koenig-figure4"))
    out = pd.DataFrame(rows)
    if crf is not None:
        out = out[out["crf"] == crf]
    out.insert(1, "backbone", out["dataset"].map(lambda d: PAPER_SETTINGS[d]["backbone"]))
    out.insert(2, "code_dim", [_code_dim(d, m) for d, m in zip(out["dataset"], out["method"])])
    return out.reset_index(drop=True)


def _number(value: float, approx: bool) -> str:
    text = f"{value:.2f}" if round(value, 1) != value else f"{value:.1f}"
    return ("≈" if approx else "") + text


#: the short model names of the book's table (row name in the sources -> label)
TABLE2_LABELS = {
    "STEGO (theirs)": "STEGO, paper",
    "STEGO (ours, released checkpoint)": "STEGO, study",
    "STEGO (released checkpoint, issue report)": "STEGO, issue",
    "DINO (theirs)": "DINO, paper",
    "DINO (ours)": "DINO, study",
}
#: the short dataset names of the book's table
TABLE2_DATASETS = {"cocostuff27": "COCO", "cityscapes": "City", "potsdam": "Potsdam"}


def table2_frame(dataset: str | Iterable[str] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Table 2 as the book prints it, and the table of its sources.

    dataset: one of ``DATASETS`` (or several); None, or a dataset the papers did not use (the demo's "mosaic", a
    "directory" of photos), gives all three.

    One row per (dataset, model, CRF setting), grouped by dataset, STEGO before DINO, with CRF before without;
    columns ``dataset`` (only when several; ``TABLE2_DATASETS``), ``model`` (``TABLE2_LABELS``: "paper" = printed in
    the STEGO paper, "study" = evaluated by Koenig et al., the STEGO rows on the released checkpoint, "issue" = a
    user's report of the released checkpoint), ``CRF``, ``unsup. acc``, ``unsup. mIoU``, ``linear acc``,
    ``linear mIoU`` (text: "≈" = read off a figure, "–" = the source does not report it) and ``source`` (note
    numbers). The sources table has the columns ``note`` ("[1]", ...) and ``source`` (the text of ``SOURCES``).
    """
    if isinstance(dataset, str) and dataset not in DATASETS:
        dataset = None
    values = table2_values(dataset)
    order = {row: i for i, row in enumerate(TABLE2_LABELS)}
    values = values.assign(_d=values["dataset"].map({d: i for i, d in enumerate(DATASETS)}),
                           _r=values["row"].map(order), _c=~values["crf"])
    values = values.sort_values(["_d", "_r", "_c"], kind="stable")
    keys = list(dict.fromkeys(values["source"]))
    mark = {k: f"[{i + 1}]" for i, k in enumerate(keys)}
    several = values["dataset"].nunique() > 1
    rows = []
    for (ds, row, crf), part in values.groupby(["dataset", "row", "crf"], sort=False):
        cells = {f"{p}/{m}": _number(v, a) for p, m, v, a in
                 zip(part["probe"], part["metric"], part["value"], part["approx"])}
        line = {"dataset": TABLE2_DATASETS[ds]} if several else {}
        line.update({"model": TABLE2_LABELS[row], "CRF": "yes" if crf else "no",
                     "unsup. acc": cells.get("cluster/Accuracy", "–"),
                     "unsup. mIoU": cells.get("cluster/mIoU", "–"),
                     "linear acc": cells.get("linear/Accuracy", "–"), "linear mIoU": cells.get("linear/mIoU", "–"),
                     "source": " ".join(sorted({mark[k] for k in part["source"]}))})
        rows.append(line)
    notes = pd.DataFrame({"note": [mark[k] for k in keys], "source": [SOURCES[k] for k in keys]})
    return pd.DataFrame(rows), notes


def figure3_points() -> pd.DataFrame:
    """The Figure 3 values: cumulative explained variance at a quarter and half of the components."""
    rows = [dict(dataset=ds, fraction=frac, cumulative=value, approx=True, source="koenig-figure3")
            for ds, pair in _FIGURE3.items() for frac, value in zip((0.25, 0.5), pair)]
    return pd.DataFrame(rows)


def figure4_values(datasets: str | Iterable[str] | None = None) -> pd.DataFrame:
    """The Figure 4 curves (no CRF): STEGO retrained per D, PCA and RP per D, and the DINO baseline at D = C."""
    datasets = _check_datasets(datasets)
    rows = []
    for probe, per_dataset in _FIGURE4.items():
        for ds in datasets:
            for method, values in per_dataset[ds].items():
                rows += [dict(dataset=ds, method=method, code_dim=d, probe=probe, metric="mIoU", value=float(v),
                              approx=True, source="koenig-figure4") for d, v in zip(FIGURE4_DIMS, values)
                         if v is not None]
    dino = table2_values(datasets, crf=False)
    dino = dino[dino["row"] == "DINO (ours)"]
    rows += [dict(dataset=r.dataset, method="dino", code_dim=r.code_dim, probe=r.probe, metric=r.metric,
                  value=r.value, approx=r.approx, source=r.source) for r in dino.itertuples()]
    out = pd.DataFrame(rows)
    out.insert(1, "backbone", out["dataset"].map(lambda d: PAPER_SETTINGS[d]["backbone"]))
    return out


def later_methods() -> pd.DataFrame:
    """Later methods on the same benchmarks (protocols differ; for orientation only)."""
    rows = [dict(method=m, backbone=bb, dataset=ds, Accuracy=acc, mIoU=miou, source=src)
            for m, bb, per_dataset, src in _LATER for ds, (acc, miou) in per_dataset.items()]
    return pd.DataFrame(rows)


#: how each source evaluated: the later methods follow their own papers' protocols (CRF, resolution and crops are
#: not checked against Table 2's), so the rows orient, they do not rank
LATER_PROTOCOLS: dict[str, str] = {
    "cause": "unsupervised, as its repository reports it (its own protocol)",
    "primaps": "unsupervised, as its repository reports it (its own protocol)",
    "u2seg": "unsupervised, as the paper's abstract reports it (its own protocol)",
    "koenig-table2": "Table 2 of Koenig et al.: cluster probe, CRF, 320 px",
}


def later_methods_frame() -> tuple[pd.DataFrame, pd.DataFrame]:
    """The later methods as the book prints them, with the released STEGO checkpoint's row of Table 2 first for
    orientation: one row per method and backbone; ``COCO`` / ``City`` / ``Potsdam`` as "accuracy / mIoU" text
    ("–" not reported), ``protocol`` and a note number; and the table of notes (note, source)."""
    stego = table2_values(crf=True)
    stego = stego[(stego["row"] == "STEGO (ours, released checkpoint)") & (stego["probe"] == "cluster")]
    later = later_methods()
    entries: list[tuple[str, str, str, dict[str, str]]] = []
    cells = {ds: f"{part.set_index('metric').loc['Accuracy', 'value']:.1f} / "
                 f"{part.set_index('metric').loc['mIoU', 'value']:.1f}"
             for ds, part in stego.groupby("dataset")}
    entries.append(("STEGO (released checkpoints)", "DINO ViT-B/8 (Potsdam ViT-S/8)", "koenig-table2", cells))
    for (method, backbone, source), part in later.groupby(["method", "backbone", "source"], sort=False):
        entries.append((method, backbone, source, {r.dataset: f"{r.Accuracy:.1f} / {r.mIoU:.1f}"
                                                   for r in part.itertuples()}))
    keys = list(dict.fromkeys(e[2] for e in entries))
    mark = {k: f"[{i + 1}]" for i, k in enumerate(keys)}
    rows = [{"method": m, "backbone": bb, **{TABLE2_DATASETS[ds]: c.get(ds, "–") for ds in DATASETS},
             "protocol": LATER_PROTOCOLS[src], "source": mark[src]} for m, bb, src, c in entries]
    notes = pd.DataFrame({"note": [mark[k] for k in keys], "source": [SOURCES[k] for k in keys]})
    return pd.DataFrame(rows), notes
