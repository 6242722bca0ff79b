"""Pictures and charts of stego_core.viz, checked against naive loops, scikit-learn's PCA and the chart specs."""
from __future__ import annotations

import json

import altair as alt
import numpy as np
import pandas as pd
import pytest

from stego_core.book import viz

PALETTE = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255]], dtype=np.uint8)


def test_overlay_matches_a_pixel_loop():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    label = rng.integers(-1, 3, (5, 7))
    out = viz.overlay(image, label, PALETTE, alpha=0.25)
    for y in range(5):
        for x in range(7):
            if label[y, x] < 0:
                expected = image[y, x]
            else:
                expected = np.round(0.75 * image[y, x].astype(float) + 0.25 * PALETTE[label[y, x]]).astype(np.uint8)
            assert (out[y, x] == expected).all(), (y, x)
    assert (viz.colorize(label, PALETTE)[label < 0] == 0).all()
    with pytest.raises(ValueError, match="differ in size"):
        viz.overlay(image, label[:4], PALETTE)


def test_image_grid_places_tiles_row_by_row():
    tiles = [np.full((2, 3, 3), v, dtype=np.uint8) for v in (10, 20, 30)]
    grid = viz.image_grid(tiles, ncols=2, pad=1, pad_value=255)
    assert grid.shape == (2 * 2 + 1, 2 * 3 + 1, 3)
    assert (grid[0:2, 0:3] == 10).all() and (grid[0:2, 4:7] == 20).all() and (grid[3:5, 0:3] == 30).all()
    assert (grid[2] == 255).all() and (grid[3:5, 4:7] == 255).all()


def test_pca_rgb_follows_sklearn_pca():
    from sklearn.decomposition import PCA

    rng = np.random.default_rng(1)
    feats = rng.normal(size=(2, 8, 4, 5)) * np.linspace(3, 0.1, 8)[None, :, None, None]
    rgb = viz.pca_rgb(feats, q=0.0)
    assert rgb.shape == (2, 4, 5, 3) and rgb.dtype == np.uint8
    tokens = feats.transpose(0, 2, 3, 1).reshape(-1, 8)
    ref = PCA(3).fit_transform(tokens)
    ours = rgb.reshape(-1, 3).astype(float)
    for c in range(3):
        assert abs(np.corrcoef(ours[:, c], ref[:, c])[0, 1]) > 0.999
        assert ours[:, c].min() == 0 and ours[:, c].max() == 255
    single = viz.pca_rgb(feats[0], size=8)
    assert single.shape == (8, 8, 3)


def test_class_statistics_counts_pixels():
    import torch

    labels = [torch.tensor([[0, 0], [1, -1]]), torch.tensor([[2, 2], [2, 0]])]
    fake = type("Fake", (), {"__len__": lambda self: 2, "__getitem__": lambda self, i: {"label": labels[i]},
                             "n_classes": 3, "class_names": ["a", "b", "c"], "palette": PALETTE})()
    stats = viz.class_statistics(fake, progress=False).set_index("class")
    assert stats.loc["a", "pixels"] == 3 and stats.loc["b", "pixels"] == 1 and stats.loc["c", "pixels"] == 3
    assert stats.loc["ignore", "pixels"] == 1 and stats.loc["a", "images"] == 2
    assert stats.loc["a", "fraction"] == pytest.approx(3 / 7)
    assert stats.loc["b", "color"] == "#00ff00"


def test_charts_have_tooltips_and_legend_selection():
    df = pd.DataFrame({"dim": [3, 6, 3, 6], "mIoU": [10.0, 20.0, 15.0, 25.0], "method": ["a", "a", "b", "b"]})
    spec = viz.line_chart(df, "dim", "mIoU", "method", log_x=True).to_dict()
    assert spec["encoding"]["tooltip"] and spec["params"][0]["bind"] == "legend"
    assert spec["encoding"]["x"]["scale"]["type"] == "log"
    bars = viz.class_histogram_chart(pd.DataFrame({"class": ["x", "y"], "fraction": [0.4, 0.6],
                                                   "color": ["#000000", "#ffffff"]})).to_dict()
    assert bars["encoding"]["color"]["scale"] is None and bars["params"]
    legend = viz.label_legend(["x", "y"], PALETTE).to_dict()
    assert [r["class"] for r in legend["datasets"][next(iter(legend["datasets"]))]] == ["x", "y"]


def test_the_renderer_writes_offline_html():
    assert alt.renderers.active == "stego"
    chart = viz.bar_chart(pd.DataFrame({"stage": ["a"], "seconds": [1.0]}), "stage", "seconds")
    bundle = alt.renderers.get()(chart.to_dict())
    html = bundle["text/html"]
    assert 'class="stego-chart"' in html and '"../vendor/"' in html  # the book's own copy first
    spec = json.loads(html.split("var spec = ", 1)[1].split(";\n", 1)[0])
    assert spec["mark"]["type"] == "bar"
    assert "</script>" not in html.split("<script", 1)[1][:-len("</script>")]  # data cannot close the script


def test_show_images_embeds_pngs():
    import base64
    import io

    from PIL import Image

    pic = np.zeros((4, 4, 3), dtype=np.uint8)
    pic[1, 2] = (1, 2, 3)
    html = viz.show_images([pic], ["<t>"])._repr_html_()
    assert "&lt;t&gt;" in html
    data = html.split("data:image/png;base64,", 1)[1].split('"', 1)[0]
    back = np.asarray(Image.open(io.BytesIO(base64.b64decode(data))))
    assert (back == pic).all()
