"""Smoke run of the dimension-study chapter (03) on a tiny grid, then of the Results chapter (06) on its results."""
from __future__ import annotations

import json

import nbformat
import pandas as pd
import pytest
from chapters import glued

from stego_core import results, study

pytestmark = pytest.mark.slow

TINY = dict(dataset="mosaic", res=64, dataset_options={"n_images": 6, "scene_size": 96},
            methods=["stego", "pca", "dino"], dims=[3, 200], seeds=[0, 1], steps=2, n_fit_images=6, progress=False,
            overrides={"n_neighbors": 3, "batch_size": 3, "val_freq": 2})


def _glued(nb) -> dict[str, str]:
    return glued(nb, prefer="markdown")


def _charts(nb) -> list[dict]:
    specs = []
    for c in nb.cells:
        for o in c.get("outputs", []):
            html = o.get("data", {}).get("text/html", "")
            html = "".join(html) if isinstance(html, list) else html
            if 'class="stego-chart"' in html:
                specs.append(json.loads(html.split("var spec = ", 1)[1].split(";\n", 1)[0]))
    return specs


def _errors(nb) -> list:
    return [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o["output_type"] == "error"]


FEATURES = dict(dataset="mosaic", res=64, dataset_options={"n_images": 6, "scene_size": 96}, k=5, n_queries=2,
                n_neighbors_shown=2, n_pca=2, progress=False)  # chapter 01 for TINY: its stores and kNN table


def test_dimension_study_and_results_chapters(tmp_path, monkeypatch):
    monkeypatch.setenv("STEGO_ARTIFACTS", str(tmp_path / "artifacts"))
    study.run_notebook("01_features", FEATURES, workdir=tmp_path / "book")
    run = study.run_notebook("03_dimension_study", TINY, workdir=tmp_path / "book")
    nb = nbformat.read(run.output, as_version=4)
    assert not _errors(nb)
    glued = _glued(nb)
    # stego d3, d200 and pca d3 per seed, plus the DINO baseline per seed; PCA at D = 200 > C = 112 is skipped
    assert glued["dim_n_runs"] == "8" and glued["dim_n_ran"] == "8"
    assert "mosaic-pca-d200-s0" in glued["dim_skip_note"]
    assert glued["dim_C"] == "112"
    assert glued["dim_min_dim"] == "3" and glued["dim_n_dims_pca"] == "1"
    charts = _charts(nb)
    assert len(charts) == 3  # Figure 3, Figure 4 (mIoU), accuracies
    fig3_points = [r for rows in charts[0]["datasets"].values() for r in rows if "paper" in str(r.get("source"))]
    assert len(fig3_points) == 6  # the paper's Figure 3 values, 2 per dataset, beside the demo's curve
    fig4 = charts[1]
    rows = next(iter(fig4["datasets"].values()))
    assert {r["series"] for r in rows} == {"STEGO", "PCA", "DINO baseline"}
    assert {r["n_seeds"] for r in rows} == {2}
    assert any(lay["mark"]["type"] == "area" for lay in fig4["spec"]["layer"])  # the seed band

    # every run wrote its rows to the results store
    store = results.load_results(tmp_path / "artifacts")
    assert store["run_id"].nunique() == 8
    # the chapter's key numbers against the runs' own files (read with pandas, not through stego_core): STEGO's
    # cluster mIoU at the smallest D is the seed mean of each run's best validation cluster mIoU (the study selects
    # the step of maximal cluster mIoU)
    csv = pd.concat([pd.read_csv(f) for f in sorted((tmp_path / "artifacts" / "runs").glob("*/results.csv"))])
    val = csv[(csv["stage"] == "train") & (csv["split"] == "val") & (csv["probe"] == "cluster")
              & (csv["metric"] == "mIoU") & (csv["protocol"] == "original") & ~csv["crf"].astype(bool)]
    best = val.groupby(["method", "code_dim", "seed"])["value"].max().groupby(["method", "code_dim"]).mean()
    assert float(glued["dim_stego_cluster_min"]) == pytest.approx(best[("stego", 3)])
    assert float(glued["dim_pca_cluster_min"]) == pytest.approx(best[("pca", 3)])
    assert glued["dim_n_runs"] == str(csv["run_id"].nunique())

    # a second call finds every run finished
    again = study.run_notebook("03_dimension_study", TINY, workdir=tmp_path / "book", force=True)
    assert _glued(nbformat.read(again.output, as_version=4))["dim_n_skipped"] == "8"

    # the Results chapter draws from the store alone
    res = study.run_notebook("06_results", {"slider": False}, workdir=tmp_path / "book")
    nb6 = nbformat.read(res.output, as_version=4)
    assert not _errors(nb6)
    g6 = _glued(nb6)
    assert g6["res_n_runs"] == "8" and g6["res_n_curves"] == "1"
    assert float(g6["res_stego_cluster_min"]) == pytest.approx(float(glued["dim_stego_cluster_min"]))
    charts6 = _charts(nb6)
    # Figure 3, Figure 4, the published Figure 4, the paired differences, accuracies (no h-NNE runs: a note)
    assert len(charts6) == 5
    published = next(iter(charts6[2]["datasets"].values()))
    assert {r["dataset"] for r in published} == {"cocostuff27", "cityscapes", "potsdam"}
    assert "read off" in json.dumps(charts6[2]["title"])
    # the demo's data is none of the paper's datasets: no reference lines in its Figure 4
    assert all(r["kind"] == "ours" for r in next(iter(charts6[1]["datasets"].values())))

    # in the book the Results pages paste the figures: 06 then glues them without drawing them itself
    quiet = study.run_notebook("06_results", {"slider": False, "show_figures": False}, workdir=tmp_path / "book")
    nb6q = nbformat.read(quiet.output, as_version=4)
    assert not _errors(nb6q) and _charts(nb6q) == []
    gq = _glued(nb6q)
    for key in ("fig3", "fig4", "fig4_paper", "fig4_diffs", "fig_accuracy", "fig_hnne", "fig4_table"):
        assert key in gq, key
    assert gq["res_var_n_components"] == g6["res_var_n_components"] == "96"  # 6 images x 4 x 4 tokens < C
    assert gq["res_verdict_pca"] == g6["res_verdict_pca"] and "STEGO" in g6["res_verdict_pca"]


def test_chapter_02_runs_are_the_sweeps_runs(tmp_path, monkeypatch):
    """Issue 14 §3: the sweep's STEGO run at chapter 02's dimension and its DINO baseline are chapter 02's own keyed
    runs (same config, same stores): the sweep loads them instead of training them again."""
    monkeypatch.setenv("STEGO_ARTIFACTS", str(tmp_path / "artifacts"))
    study.run_notebook("01_features", FEATURES, workdir=tmp_path / "book")
    shared = dict(dataset="mosaic", res=64, dataset_options={"n_images": 6, "scene_size": 96}, progress=False)
    training = dict(batch_size=3, n_neighbors=3, val_freq=2)
    study.run_notebook("02_train_stego", dict(shared, code_dim=3, steps=2, n_examples=2, **training),
                       workdir=tmp_path / "book")
    runs = tmp_path / "artifacts" / "runs"
    assert len(list(runs.glob("*/DONE"))) == 3  # STEGO, untrained head, raw features
    before = {p.parent.name: p.stat().st_mtime_ns for p in runs.glob("*/DONE")}
    run = study.run_notebook("03_dimension_study", dict(shared, methods=["stego", "dino"], dims=[3], seeds=[0],
                                                        steps=2, overrides=training), workdir=tmp_path / "book")
    nb = nbformat.read(run.output, as_version=4)
    assert not _errors(nb)
    assert _glued(nb)["dim_n_runs"] == "2"
    after = {p.parent.name: p.stat().st_mtime_ns for p in runs.glob("*/DONE")}
    assert after == before, "the sweep trained runs that chapter 02 had trained already"
    recorded = {json.loads(p.read_text())["train_run_dir"].rsplit("/", 1)[-1]
                for p in (tmp_path / "artifacts" / "sweeps").glob("*/run.json")}
    assert len(recorded) == 2 and recorded <= set(before)
    assert {r.split("-")[1] for r in recorded} == {"stego", "dino"}
