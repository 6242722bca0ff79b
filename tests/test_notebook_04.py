"""Smoke runs of the evaluation (04), explorer (05) and quirks (07) chapters with the `smoke` profile's parameters,
then their outputs checked: glued numbers, Table 2 rows, charts through the offline renderer, the explorer's data."""
from __future__ import annotations

import json
import re
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import pytest
from chapters import glued

from stego_core import results, study

pytestmark = pytest.mark.slow

NOTEBOOKS = ("04_evaluate", "05_explorer", "07_quirks")
UPSTREAM = ("01_features", "03_dimension_study")  # the stores, kNN tables and runs the three chapters require


@pytest.fixture(scope="session")
def chapters(tmp_path_factory) -> Path:
    """The three chapters in <basetemp>/smoke-book (the folder the other smoke tests share; current ones skipped),
    after the chapters whose artifacts they read."""
    base = tmp_path_factory.getbasetemp()
    params = dict(study.load_profile("smoke"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STEGO_ARTIFACTS", str(base / "smoke-artifacts"))
        workdir = study.prepare_workdir(base / "smoke-book")
        for nb in UPSTREAM + NOTEBOOKS:
            study.run_notebook(nb, params[nb], workdir=workdir)
    return workdir / "book" / "chapters"


def _read(chapters: Path, name: str):
    nb = nbformat.read(chapters / f"{name}.ipynb", as_version=4)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o["output_type"] == "error"]
    assert not errors, f"{name}: {errors[:1]}"
    assert [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])] == [0]
    return nb


def _glued(nb) -> dict[str, str]:
    return glued(nb, prefer="plain")


def _html(nb) -> list[str]:
    return ["".join(o["data"]["text/html"]) for c in nb.cells if c.cell_type == "code" for o in c.outputs
            if "text/html" in o.get("data", {})]


def _spec(html: str) -> dict:
    return json.loads(html.split("var spec = ", 1)[1].split(";\n", 1)[0])


def test_evaluation_chapter(chapters):
    nb = _read(chapters, "04_evaluate")
    glued = _glued(nb)
    assert glued["n_val"] == "8" and glued["n_crf"] == "2"
    for name in ("stego", "dino"):
        assert 0 < float(glued[f"{name}_cluster_miou"]) <= 100
        assert -100 < float(glued[f"{name}_crf_gain"]) < 100
    html = _html(nb)
    table = next(h for h in html if "cluster Accuracy" in h and "with CRF" in h)
    # STEGO and DINO: all images without CRF, the CRF subset without and with CRF
    assert table.count("<tr>") == 2 * 3
    # the published rows (stego_core.papers), complete: all three datasets on the demo data, a source per row
    paper = next(h for h in html if "unsup. mIoU" in h and "source" in h)
    assert "n/a" not in paper and paper.count("<tr>") == 1 + 18
    for value in ("28.2", "41.1", "62.6", "74.8", "34.9", "≈26.9", "46.57", "Potsdam", "[1]"):
        assert value in paper, value
    notes = next(h for h in html if "all_datasets_miou.jpg" in h)
    assert "[6]" in notes and "issue 39" in notes
    charts = [h for h in html if 'class="stego-chart"' in h]
    assert len(charts) == 3  # per-class IoU (cluster, linear) and the class legend
    spec = _spec(charts[0])
    rows = next(iter(spec["datasets"].values()))
    assert {r["setting"] for r in rows} == {"STEGO, no CRF", "STEGO, with CRF", "DINO, no CRF", "DINO, with CRF"}
    # 2 examples x (image, ground truth, 2 models x 2 CRF settings)
    assert sum(h.count("data:image/png;base64,") for h in html if "stego-images" in h) == 2 * 6


def test_explorer_chapter(chapters):
    nb = _read(chapters, "05_explorer")
    glued = _glued(nb)
    # smoke: STEGO and PCA at dims 3 and 6, DINO once; 2 images, CRF on/off, two probes
    assert glued["n_models"] == "5" and glued["n_maps"] == str(5 * 2 * 2 * 2)
    charts = [h for h in _html(nb) if 'class="stego-chart"' in h]
    assert len(charts) == 1
    spec = _spec(charts[0])
    assert {p["name"] for p in spec["params"]} == {"image_id", "method", "dim", "crf", "probe", "opacity"}
    rows = next(iter(spec["datasets"].values()))
    assert len(rows) == 2 * 2 + 40 and all(r["url"].startswith("data:image/") for r in rows)
    assert not nb.metadata.get("widgets")  # live = False: no widget state that a static page could not serve


def test_quirks_chapter(chapters):
    nb = _read(chapters, "07_quirks")
    glued = _glued(nb)
    for key in ("knn_changed", "knn_agree_orig", "knn_agree_corr", "bytes_changed", "crf_pixels_changed"):
        assert 0 <= float(glued[key]) <= 100, key
    assert float(glued["pos_rel"]) > 0 and float(glued["batch_spread"]) >= 0
    # quirk 1's share of changed partners against the two kNN tables the chapter left beside the training store
    # (ranks 1..n_neighbors of the smoke profile, as sets per item; numpy alone)
    (store,) = (chapters.parents[2] / "smoke-artifacts" / "features").glob("mosaic-train-*")
    n = dict(study.load_profile("smoke"))["07_quirks"]["n_neighbors"]
    orig, corr = (np.load(store / f"knn-{p}.npy")[:, 1:n + 1] for p in ("original", "corrected"))
    same = sum(len(set(a) & set(b)) for a, b in zip(orig.tolist(), corr.tolist()))
    assert float(glued["knn_changed"]) == pytest.approx(round(100 * (1 - same / orig.size), 1))
    summary = _html(nb)[-1]
    for quirk in ("1 kNN dropout", "6 extra clusters dropped", "15 per-batch standardisation",
                  "9 CRF image round trip", "3 nearest resize", "13 pos-embed rule", "16 swapped metric names"):
        assert quirk in summary, quirk
    assert len(re.findall(r"<tr>", summary)) == 13


def test_table2_rows_go_through_the_results_store(chapters, tmp_path_factory):
    """Chapter 04 writes its rows (stage "final") under <root>/evaluations and shows what it reads back."""
    base = tmp_path_factory.getbasetemp()
    store = results.load_results(base / "smoke-artifacts")
    final = store[store["stage"] == "final"]
    assert set(final["method"]) == {"stego", "dino"} and set(final["split"]) == {"val[:8]", "val[:2]"}
    table = results.final_table(final, labels={"stego": "STEGO", "dino": "DINO"})
    glued = _glued(_read(chapters, "04_evaluate"))
    no_crf = table[(table["model"] == "STEGO") & (table["CRF"] == "no CRF") & (table["images"] == 8)]
    assert float(glued["stego_cluster_miou"]) == pytest.approx(round(no_crf["cluster mIoU"].item(), 1))
    # every glued number of the chapter against the rows file it wrote (read with pandas alone)
    rows = pd.concat([pd.read_csv(f) for f in (base / "smoke-artifacts" / "evaluations").glob("*/results.csv")])
    mi = rows[(rows["probe"] == "cluster") & (rows["metric"] == "mIoU")].set_index(["method", "crf", "split"])["value"]
    for method in ("stego", "dino"):
        assert float(glued[f"{method}_cluster_miou"]) == pytest.approx(round(mi[(method, False, "val[:8]")], 1))
        gain = mi[(method, True, "val[:2]")] - mi[(method, False, "val[:2]")]
        assert float(glued[f"{method}_crf_gain"]) == pytest.approx(round(gain, 1))


@pytest.mark.parametrize("notebook", ["04_evaluate", "05_explorer"])
def test_downstream_chapters_require_the_protocols_runs(chapters, tmp_path_factory, notebook):
    """12§4.4: with protocol "corrected" the chapters used the original-protocol runs; now they stop, naming the
    command that trains the corrected ones (the smoke profile's sweep trains the original protocol only)."""
    base = tmp_path_factory.getbasetemp()
    params = {**dict(study.load_profile("smoke"))[notebook], "protocol": "corrected"}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STEGO_ARTIFACTS", str(base / "smoke-artifacts"))
        workdir = study.prepare_workdir(base / f"protocol-{notebook}")
        with pytest.raises(study.StegoError) as info:
            study.run_notebook(notebook, params, workdir=workdir, log=lambda _: None)
    msg = str(info.value)
    assert "protocol 'corrected'" in msg and "03_dimension_study" in msg, msg
