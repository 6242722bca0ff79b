"""Smoke run of notebooks/02_train_stego.py: 01_features then 02 with the smoke profile's parameters, outputs checked
against the run artifacts they were computed from."""
from __future__ import annotations

import json
from pathlib import Path

import nbformat
import numpy as np
import pytest
from chapters import glued

from stego_core import study

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def chapter(tmp_path_factory):
    """(executed 02 chapter, artifacts root): 01_features and 02_train_stego run as the smoke profile runs them."""
    base = tmp_path_factory.mktemp("nb02")
    art = base / "artifacts"
    params = dict(study.load_profile("smoke"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STEGO_ARTIFACTS", str(art))
        study.run_notebook("01_features", params["01_features"], workdir=base, log=lambda _: None)
        result = study.run_notebook("02_train_stego", params["02_train_stego"], workdir=base, log=lambda _: None)
    assert not result.skipped
    return nbformat.read(result.output, as_version=4), art


def _glued(nb) -> dict[str, str]:
    return glued(nb, prefer="markdown")


def _html(nb) -> list[str]:
    return ["".join(o["data"]["text/html"]) if isinstance(o["data"]["text/html"], list) else o["data"]["text/html"]
            for c in nb.cells if c.cell_type == "code" for o in c.outputs if "text/html" in o.get("data", {})]


def _spec(chart_html: str) -> dict:
    return json.loads(chart_html.split("var spec = ", 1)[1].split(";\n", 1)[0])


def _runs(art: Path) -> dict[str, dict]:
    """model name -> meta.json of the three runs the chapter trained (told apart by method and loss weight)."""
    metas = [json.loads(p.read_text()) for p in sorted((art / "runs").glob("*/meta.json"))]
    out = {}
    for m in metas:
        cfg = m["config"]
        name = ("raw features" if cfg["method"] == "dino" else
                "STEGO head" if cfg["correspondence_weight"] > 0 else "untrained head")
        assert name not in out, f"two runs for {name}"
        out[name] = m
    return out


def test_chapter_runs_clean(chapter):
    nb, _ = chapter
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o["output_type"] == "error"]
    assert not errors, errors[:1]
    tags = [c.metadata.get("tags", []) for c in nb.cells]
    assert "parameters" in tags[0] and "injected-parameters" in tags[1]
    assert "steps = 6" in nb.cells[1].source and "n_neighbors = 4" in nb.cells[1].source


def test_three_runs_with_the_smoke_settings(chapter):
    _, art = chapter
    runs = _runs(art)
    assert set(runs) == {"STEGO head", "untrained head", "raw features"}
    for name, meta in runs.items():
        cfg = meta["config"]
        assert meta["status"] == "done"
        assert (cfg["steps"], cfg["batch_size"], cfg["val_freq"], cfg["n_neighbors"]) == (6, 4, 3, 4)
        assert cfg["code_dim"] == (meta["in_dim"] if name == "raw features" else 6)  # raw features: code = C
        # every other loss setting is the demo preset's
        assert cfg["pos_inter_weight"] == runs["STEGO head"]["config"]["pos_inter_weight"]
    assert runs["untrained head"]["config"]["correspondence_weight"] == 0.0


def test_headline_numbers_come_from_the_runs(chapter):
    nb, art = chapter
    glued = _glued(nb)
    runs = _runs(art)
    for key, model, metric in (("stego_cluster", "STEGO head", "cluster/mIoU"),
                               ("raw_cluster", "raw features", "cluster/mIoU"),
                               ("untrained_cluster", "untrained head", "cluster/mIoU"),
                               ("stego_linear", "STEGO head", "linear/mIoU"),
                               ("raw_linear", "raw features", "linear/mIoU")):
        value = float(glued[key])
        assert 0.0 <= value <= 100.0
        assert value == pytest.approx(runs[model]["best"][metric], abs=1e-6)
    gain = float(glued["stego_cluster"]) - float(glued["raw_cluster"])
    assert float(glued["cluster_gain"]) == pytest.approx(abs(gain))
    assert glued["verdict"].strip("'\"") == ("beats" if gain > 0 else "does not beat")


def test_charts_and_histograms(chapter):
    nb, art = chapter
    html = _html(nb)
    charts = [_spec(h) for h in html if 'class="stego-chart"' in h]
    # losses, mean code correlations, validation mIoU, correlation histograms, per-class IoU, class legend
    assert len(charts) == 6
    hist = next(s for s in charts if "facet" in s)
    rows = next(iter(hist["datasets"].values()))
    assert {r["model"] for r in rows} == {"STEGO head", "untrained head"}  # the raw features have no head
    assert {r["pair"] for r in rows} == {"intra", "inter", "neg"}
    for model in ("STEGO head", "untrained head"):
        for pair in ("intra", "inter", "neg"):
            shares = [r["share"] for r in rows if r["model"] == model and r["pair"] == pair]
            assert len(shares) == 40 and sum(shares) == pytest.approx(1.0)
    # the histogram of the STEGO run is the one its last step saved
    run_dir = next(p.parent for p in (art / "runs").glob("*/meta.json")
                   if _runs(art)["STEGO head"]["run_id"] == p.parent.name)
    with np.load(run_dir / "code_corr.npz") as z:
        intra = np.clip(z["intra"], -1, 1)
        neg_positive = 100 * float(np.mean(z["neg"] > 0))
    assert float(_glued(nb)["neg_pos"]) == pytest.approx(neg_positive)
    expected = np.histogram(intra, bins=np.linspace(-1, 1, 41))[0] / len(intra)
    got = [r["share"] for r in rows if r["model"] == "STEGO head" and r["pair"] == "intra"]
    assert np.allclose(got, expected)
    # training curves: every loss term of the STEGO run is a series; legend selection is bound
    losses = next(s for s in charts if s.get("title") == "STEGO training losses")
    terms = {r["term"] for r in next(iter(losses["datasets"].values()))}
    assert {"pos_intra", "pos_inter", "neg_inter", "cluster", "linear", "total"} <= terms
    assert any(p.get("bind") == "legend" for p in losses.get("params", []))


def test_example_predictions(chapter):
    nb, _ = chapter
    images = [h for h in _html(nb) if 'class="stego-images"' in h]
    assert len(images) == 1
    # 2 examples x (image, ground truth, STEGO cluster, STEGO linear, raw-feature cluster)
    assert images[0].count("data:image/png;base64,") == 10
    assert images[0].count("raw-feature cluster") == 2 * 2  # alt text and caption per example
