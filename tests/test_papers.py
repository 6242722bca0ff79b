"""stego_core.papers against the reference file it was copied from: every number of paper-numbers.md, parsed here.

The reference file (tests/golden/paper-numbers.md, a copy of the project's shared/reference/paper-numbers.md) is
read with a small Markdown-table parser of this test, independent of the module's own tables.
"""
from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest

from stego_core import papers
from stego_core.config import StegoError

HERE = Path(__file__).resolve().parent
DATASET = {"Coco": "cocostuff27", "City": "cityscapes", "Potsdam": "potsdam", "CocoStuff": "cocostuff27",
           "Cityscapes": "cityscapes"}


@pytest.fixture(scope="module")
def reference() -> str:
    shared = HERE.parent.parent / "shared" / "reference" / "paper-numbers.md"
    for cand in (HERE / "golden" / "paper-numbers.md", shared):
        if cand.exists():
            return cand.read_text()
    pytest.skip("paper-numbers.md not found")


def _section(text: str, heading: str) -> str:
    start = text.index(heading)
    nxt = text.find("\n## ", start + 1)
    return text[start:nxt if nxt > 0 else len(text)]


def _tables(text: str) -> list[list[list[str]]]:
    """Every Markdown table of ``text`` as rows of stripped cells (header first, the |---| line dropped)."""
    tables, current = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not all(set(c) <= {"-", ":"} for c in cells):
                current.append(cells)
        elif current:
            tables.append(current)
            current = []
    return tables


def _cell(text: str) -> tuple[float | None, bool]:
    """'56.9' -> (56.9, False); '≈26.9' -> (26.9, True); '46.57 (exact: ...)' -> (46.57, False); '–' -> None."""
    if text in ("–", "-", ""):
        return None, False
    approx = text.startswith("≈")
    return float(re.match(r"≈?\s*([0-9.]+)", text).group(1)), approx


def _published(values: pd.DataFrame) -> dict[tuple, tuple[float, bool]]:
    return {(r.dataset, r.row, r.crf, r.probe, r.metric): (r.value, r.approx) for r in values.itertuples()}


def test_table2_with_crf_equals_the_reference(reference):
    (table,) = _tables(_section(reference, "## Table 2"))[:1]
    header, rows = table[0], table[1:]
    got = _published(papers.table2_values(crf=True))
    expected = {}
    for row in rows:
        for col, cell in zip(header[1:], row[1:]):
            ds, probe, metric = col.split(" ", 2)
            value, approx = _cell(cell)
            if value is None:
                continue
            key = (DATASET[ds], row[0], True, "cluster" if probe == "unsup" else "linear",
                   "Accuracy" if metric == "acc" else "mIoU")
            expected[key] = (value, approx)
    mine = {k: v for k, v in got.items() if "issue report" not in k[1]}
    assert mine == expected
    assert len(expected) == 7 + 12 + 4 + 12  # the four rows' reported numbers ("–" left out)


def test_independent_confirmations_equal_the_reference(reference):
    text = _section(reference, "## Table 2")
    got = _published(papers.table2_values(crf=True))
    for issue, ds in (("issue 3", "cocostuff27"), ("issue 39", "potsdam")):
        line = next(x for x in text.splitlines() if x.startswith("- ") and issue + ")" in x)
        numbers = dict(re.findall(r"(linear mIoU|linear acc|cluster mIoU|cluster acc) ([0-9.]+)", line))
        assert len(numbers) == 4
        for name, value in numbers.items():
            probe, metric = name.split()
            key = (ds, "STEGO (released checkpoint, issue report)", True, probe,
                   "Accuracy" if metric == "acc" else "mIoU")
            assert got[key] == (float(value), False), key
        source = papers.table2_values(ds, crf=True)
        source = source[source["row"].str.contains("issue")]["source"].unique()
        assert len(source) == 1 and f"{issue}:" in papers.SOURCES[source[0]]


def test_table2_without_crf_equals_the_reference(reference):
    tables = _tables(_section(reference, "## Table 2"))
    table = next(t for t in tables if t[0][1] == "Coco unsup")
    header, rows = table[0], table[1:]
    got = _published(papers.table2_values(crf=False))
    expected = {}
    for row in rows:
        name = {"STEGO (released checkpoint)": "STEGO (ours, released checkpoint)"}.get(row[0], row[0])
        for col, cell in zip(header[1:], row[1:]):
            ds, probe = col.split(" ")
            value, approx = _cell(cell)
            expected[(DATASET[ds], name, False, "cluster" if probe == "unsup" else "linear", "mIoU")] = (value, approx)
    assert got == expected
    exact = papers.table2_values("potsdam", crf=False)
    exact = exact[~exact["approx"]]
    assert len(exact) == 1 and "46.57" in papers.SOURCES[exact["source"].item()]


def test_figure3_points_equal_the_reference(reference):
    text = _section(reference, "## Figure 3")
    num = r"([0-9]+\.[0-9]+)"
    quarter = re.search(rf"D_ViT/4 components: Cityscapes ≈{num}, Potsdam ≈{num}, CocoStuff ≈{num}", text)
    half = re.search(rf"D_ViT/2:\s*≈{num} / ≈{num} / ≈{num}", text)
    expected = {}
    for frac, match in ((0.25, quarter), (0.5, half)):
        for ds, value in zip(("cityscapes", "potsdam", "cocostuff27"), match.groups()):
            expected[(ds, frac)] = float(value)
    points = papers.figure3_points()
    assert {(r.dataset, r.fraction): r.cumulative for r in points.itertuples()} == expected
    assert points["approx"].all() and (points["source"] == "koenig-figure3").all()


def test_figure4_curves_equal_the_reference(reference):
    text = _section(reference, "## Figure 4")
    linear = text[text.index("Linear probe mIoU"):text.index("Cluster probe mIoU")]
    cluster = text[text.index("Cluster probe mIoU"):]
    values = papers.figure4_values()
    got = {(r.dataset, r.method, r.code_dim, r.probe): r.value for r in values.itertuples() if r.method != "dino"}
    expected = {}
    for probe, part in (("linear", linear), ("cluster", cluster)):
        (table,) = _tables(part)[:1]
        dims = [int(d) for d in table[0][1:]]
        for row in table[1:]:
            ds, method = row[0].split(" ")
            for d, cell in zip(dims, row[1:]):
                value, _ = _cell(cell)
                if value is not None:
                    expected[(DATASET[ds], method.lower(), d, probe)] = value
    assert got == expected
    assert values[values["method"] != "dino"]["approx"].all() and len(expected) == 2 * 3 * (9 + 9 + 8)
    # the raw-feature baseline of the figure (its dashed line) is Table 2's no-CRF "DINO (ours)" at D = C
    dino = values[values["method"] == "dino"].set_index(["dataset", "probe"])["code_dim"]
    assert dino.to_dict() == {(d, p): c for d, c in (("cocostuff27", 768), ("cityscapes", 768), ("potsdam", 384))
                              for p in ("cluster", "linear")}


def test_later_methods_equal_the_reference(reference):
    text = _section(reference, "## Later methods")
    (table,) = _tables(text)[:1]
    expected = {}
    for row in table[1:]:
        method, backbone = row[0], row[1]
        for ds, cell in zip(("cocostuff27", "cityscapes", "potsdam"), row[2:5]):
            if cell != "–":
                acc, miou = (float(x) for x in cell.split("/"))
                expected[(method, backbone, ds)] = (acc, miou)
    got = {(r.method, r.backbone, r.dataset): (r.Accuracy, r.mIoU) for r in papers.later_methods().itertuples()}
    assert got == expected


def test_every_number_names_its_source_and_the_table_shows_them():
    values = papers.table2_values()
    assert values["source"].isin(list(papers.SOURCES)).all()
    assert papers.figure4_values()["source"].isin(list(papers.SOURCES)).all()
    frame, notes = papers.table2_frame("potsdam")
    assert "dataset" not in frame.columns and len(frame) == 6
    assert not frame.isin(["n/a"]).any().any()
    ours = frame[(frame["model"] == "STEGO, study") & (frame["CRF"] == "yes")].iloc[0]
    assert (ours["unsup. acc"], ours["unsup. mIoU"], ours["linear acc"], ours["linear mIoU"]) == \
        ("77.0", "62.6", "85.9", "74.8")
    no_crf = frame[(frame["model"] == "DINO, study") & (frame["CRF"] == "no")].iloc[0]
    assert no_crf["unsup. mIoU"] == "46.57" and no_crf["linear mIoU"] == "≈66.4"
    assert set(" ".join(frame["source"]).split()) == set(notes["note"])  # every note used, every mark explained
    assert set(notes["source"]) <= set(papers.SOURCES.values())
    everything, _ = papers.table2_frame("mosaic")  # not a paper dataset: all three
    assert set(everything["dataset"]) == {"COCO", "City", "Potsdam"} and len(everything) == 18
    with pytest.raises(StegoError, match="dataset"):
        papers.table2_values("mosaic")
