"""Pictures and charts for the notebooks: label overlays, image grids, PCA colourings, Altair charts that render
offline.

Images here are uint8 ``[H, W, 3]`` numpy arrays (RGB). Charts are Altair charts with tooltips and a legend that
highlights the clicked entries. Importing this module registers and enables the ``stego`` Altair renderer: it
writes a chart as HTML that loads vega, vega-lite and vega-embed from the book's own ``vendor/`` folder (see
``stego_core.book.vendor.vendor_js``), through require.js when the page has it (widget pages) and plain script tags
otherwise; outside a built book (a live notebook) it falls back to the jsDelivr CDN.
"""
from __future__ import annotations

import base64
import hashlib
import html
import io
import itertools
import json
from collections.abc import Sequence
from typing import Any

import altair as alt
import numpy as np
import pandas as pd
import torch
from IPython import get_ipython
from PIL import Image
from tqdm.auto import tqdm

from ..data import unnormalize

IGNORE_COLOR = (0, 0, 0)  # colour of ignored pixels (label -1) in colourised labels

# --------------------------------------------------------------------------------------------- images


def to_image(img: Any) -> np.ndarray:
    """An ImageNet-normalised float tensor/array [3,H,W] (a dataset item's ``img``) -> uint8 [H,W,3]."""
    t = torch.as_tensor(img, dtype=torch.float32)
    rgb01 = unnormalize(t)  # [3,H,W] in [0, 1]
    return (rgb01.permute(1, 2, 0).numpy() * 255.0).round().clip(0, 255).astype(np.uint8)  # [3,H,W] -> [H,W,3]


def colorize(label: Any, palette: Any) -> np.ndarray:
    """Label map [H,W] (int, -1 = ignore) -> uint8 [H,W,3] with ``palette[label]`` (ignored pixels black)."""
    label = np.asarray(label).astype(np.int64)
    palette = np.asarray(palette, dtype=np.uint8)
    out = np.empty(label.shape + (3,), dtype=np.uint8)
    out[...] = IGNORE_COLOR
    valid = (label >= 0) & (label < len(palette))
    out[valid] = palette[label[valid]]
    return out


def overlay(image: Any, label: Any, palette: Any, alpha: float = 0.5) -> np.ndarray:
    """Blend the colourised ``label`` over ``image`` (uint8 [H,W,3]); ignored pixels keep the image."""
    image = np.asarray(image, dtype=np.uint8)
    label = np.asarray(label).astype(np.int64)
    if image.shape[:2] != label.shape:
        raise ValueError(f"overlay: image {image.shape[:2]} and label {label.shape} differ in size")
    colors = colorize(label, palette).astype(np.float32)
    mix = (1.0 - alpha) * image.astype(np.float32) + alpha * colors
    valid = ((label >= 0) & (label < len(palette)))[..., None]
    return np.where(valid, mix.round(), image).clip(0, 255).astype(np.uint8)


def image_grid(images: Sequence[np.ndarray], ncols: int | None = None, *, pad: int = 2,
               pad_value: int = 255) -> np.ndarray:
    """Tile uint8 [H,W,3] images (same size) row by row into one image with ``pad`` pixels between them."""
    images = [np.asarray(im, dtype=np.uint8) for im in images]
    if not images:
        raise ValueError("image_grid: no images")
    h, w = images[0].shape[:2]
    if any(im.shape[:2] != (h, w) for im in images):
        raise ValueError("image_grid: images differ in size")
    ncols = ncols or len(images)
    nrows = -(-len(images) // ncols)
    grid = np.full((nrows * h + (nrows - 1) * pad, ncols * w + (ncols - 1) * pad, 3), pad_value, dtype=np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, ncols)
        grid[r * (h + pad): r * (h + pad) + h, c * (w + pad): c * (w + pad) + w] = im if im.ndim == 3 else im[..., None]
    return grid


def png_data_url(image: np.ndarray) -> str:
    """uint8 [H,W,3] (or [H,W]) -> ``data:image/png;base64,...``."""
    buf = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


class _HTML:
    """A bit of HTML that IPython displays as ``text/html`` (kept local: no IPython import needed to build it)."""

    def __init__(self, text: str):
        self.text = text

    def _repr_html_(self) -> str:
        return self.text

    def __repr__(self) -> str:
        return f"<HTML {len(self.text)} chars>"


def note(text: str) -> _HTML:
    """A one-paragraph note as ``text/html`` (e.g. "No results yet."), which a page of the book can paste from
    another page's glue (Markdown outputs cannot be pasted across pages)."""
    return _HTML(f'<p class="stego-note">{html.escape(text)}</p>')


def show_images(images: Sequence[np.ndarray], titles: Sequence[str] | None = None, *, width: int = 160,
                ncols: int | None = None) -> _HTML:
    """Small inline PNGs with captions, wrapped in a flex row (display it, or leave it as a cell's last value)."""
    titles = list(titles) if titles is not None else [""] * len(images)
    if len(titles) != len(images):
        raise ValueError(f"show_images: {len(images)} images but {len(titles)} titles")
    style = f"flex: 0 0 calc({100 / ncols:.3f}% - 8px);" if ncols else ""
    figs = "".join(
        f'<figure style="margin:0;{style}"><img src="{png_data_url(im)}" '
        f'alt="{html.escape(t or f"picture {i + 1} of {len(images)}")}" '
        f'style="width:{width}px;max-width:100%;image-rendering:pixelated;display:block"/>'
        f'<figcaption style="font-size:0.8em;text-align:center">{html.escape(t)}</figcaption></figure>'
        for i, (im, t) in enumerate(zip(images, titles)))
    return _HTML(f'<div class="stego-images" style="display:flex;flex-wrap:wrap;gap:8px">{figs}</div>')


def pca_rgb(feats: Any, *, size: int | tuple[int, int] | None = None, q: float = 0.01) -> np.ndarray:
    """The first 3 principal components of feature maps as RGB.

    ``feats`` [C,h,w] -> uint8 [h,w,3], or [n,C,h,w] -> uint8 [n,h,w,3] with one PCA fitted on all n maps (so
    colours are comparable across images). Each component is scaled to [0, 255] between its ``q`` and ``1-q``
    quantiles; signs are fixed (largest loading positive). ``size`` upsamples (nearest) to (H, W).
    """
    x = np.asarray(feats.float() if hasattr(feats, "float") else feats, dtype=np.float64)
    single = x.ndim == 3
    if single:
        x = x[None]
    if x.ndim != 4:
        raise ValueError(f"pca_rgb: expected feats [C,h,w] or [n,C,h,w], got shape {x.shape}")
    n, c, h, w = x.shape
    tokens = x.transpose(0, 2, 3, 1).reshape(-1, c)  # [n,C,h,w] -> [n*h*w, C]
    tokens = tokens - tokens.mean(axis=0)
    _, _, vt = np.linalg.svd(tokens, full_matrices=False)
    comps = vt[:3]  # [3, C] (fewer when C < 3)
    signs = np.sign(comps[np.arange(len(comps)), np.abs(comps).argmax(axis=1)])
    proj = tokens @ (comps * signs[:, None]).T  # [n*h*w, 3]
    if proj.shape[1] < 3:
        proj = np.pad(proj, ((0, 0), (0, 3 - proj.shape[1])))
    lo, hi = np.quantile(proj, q, axis=0), np.quantile(proj, 1 - q, axis=0)
    rgb = ((proj - lo) / np.where(hi > lo, hi - lo, 1.0)).clip(0, 1)
    out = (rgb * 255).round().astype(np.uint8).reshape(n, h, w, 3)  # [n*h*w, 3] -> [n,h,w,3]
    if size is not None:
        hh, ww = (size, size) if isinstance(size, int) else size
        rows = (np.arange(hh) * h // hh)
        cols = (np.arange(ww) * w // ww)
        out = out[:, rows][:, :, cols]
    return out[0] if single else out


# --------------------------------------------------------------------------------------------- data for charts


def class_statistics(dataset: Any, n_images: int | None = None, *, progress: bool = True) -> pd.DataFrame:
    """Pixel counts per class over the first ``n_images`` items (all when None): one row per class.

    Columns: class, class_id, pixels, fraction (of labelled pixels), images (items where the class occurs),
    color (hex). A final row ``ignore`` (class_id -1) counts unlabelled pixels.
    """
    n = len(dataset) if not n_images else min(int(n_images), len(dataset))
    k = dataset.n_classes
    pixels = np.zeros(k + 1, dtype=np.int64)  # slot 0 = ignore (-1), slot c+1 = class c
    images = np.zeros(k + 1, dtype=np.int64)
    for i in tqdm(range(n), desc="counting labels", disable=not progress):
        label = np.asarray(dataset[i]["label"]).astype(np.int64).ravel()
        counts = np.bincount(np.clip(label, -1, k - 1) + 1, minlength=k + 1)
        pixels += counts
        images += counts > 0
    labelled = max(int(pixels[1:].sum()), 1)
    colors = hex_colors(dataset.palette)
    rows = [{"class": name, "class_id": c, "pixels": int(pixels[c + 1]), "fraction": pixels[c + 1] / labelled,
             "images": int(images[c + 1]), "color": colors[c]} for c, name in enumerate(dataset.class_names)]
    rows.append({"class": "ignore", "class_id": -1, "pixels": int(pixels[0]), "fraction": pixels[0] / labelled,
                 "images": int(images[0]), "color": "#000000"})
    return pd.DataFrame(rows)


def hex_colors(palette: Any) -> list[str]:
    """uint8 [K,3] -> ["#rrggbb", ...]."""
    return ["#{:02x}{:02x}{:02x}".format(*(int(v) for v in rgb)) for rgb in np.asarray(palette, dtype=np.uint8)]


# --------------------------------------------------------------------------------------------- charts


def label_legend(class_names: Sequence[str], palette: Any, *, title: str = "classes") -> alt.Chart:
    """A legend-only chart: one coloured square per class, with the class name (and its id in the tooltip)."""
    df = pd.DataFrame({"class": list(class_names), "class_id": range(len(class_names)),
                       "color": hex_colors(palette)[: len(class_names)]})
    return (alt.Chart(df, title=title).mark_square(size=180)
            .encode(y=alt.Y("class:N", sort=None, axis=alt.Axis(title=None, domain=False, ticks=False)),
                    color=alt.Color("color:N", scale=None),
                    tooltip=["class", "class_id"])
            .properties(width=20))


def class_histogram_chart(df: pd.DataFrame, *, x: str = "class", y: str = "fraction", color: str = "color",
                          column: str | None = None, title: str | None = None) -> alt.Chart:
    """Bars per class (``df`` from :func:`class_statistics`) in the classes' own colours; click to highlight."""
    pick = alt.selection_point(fields=[x], on="click", clear="dblclick")
    tooltip = [c for c in df.columns if c not in (color,)]
    enc = {"x": alt.X(f"{x}:N", sort=None, title=None),
               "y": alt.Y(f"{y}:Q", title=y, axis=alt.Axis(format="%" if y == "fraction" else "")),
               "color": alt.Color(f"{color}:N", scale=None) if color in df.columns else alt.Color(f"{x}:N"),
               "opacity": alt.condition(pick, alt.value(1.0), alt.value(0.3)),
               "tooltip": tooltip}
    chart = alt.Chart(df, title=title or "").mark_bar().encode(**enc).add_params(pick)
    if column:
        chart = chart.encode(column=alt.Column(f"{column}:N", title=None))
    return chart.properties(width=alt.Step(28) if column else alt.Step(36), height=180)


def line_chart(df: pd.DataFrame, x: str, y: str, color: str | None = None, *, tooltip: Sequence[str] | None = None,
               title: str | None = None, log_x: bool = False, points: bool = True, width: int = 500,
               height: int = 260) -> alt.Chart:
    """Lines of ``y`` over ``x`` per ``color`` group; clicking legend entries highlights those lines."""
    tooltip = list(tooltip) if tooltip is not None else [c for c in (color, x, y) if c]
    scale = alt.Scale(type="log", base=2) if log_x else alt.Scale(zero=False)
    enc: dict[str, Any] = {"x": alt.X(f"{x}:Q", scale=scale), "y": alt.Y(f"{y}:Q", scale=alt.Scale(zero=False)),
                               "tooltip": tooltip}
    base = alt.Chart(df, title=title or "")
    if color:
        pick = alt.selection_point(fields=[color], bind="legend")
        enc.update(color=alt.Color(f"{color}:N"), opacity=alt.condition(pick, alt.value(1.0), alt.value(0.15)))
        chart = base.mark_line(point=points).encode(**enc).add_params(pick)
    else:
        chart = base.mark_line(point=points).encode(**enc)
    return chart.properties(width=width, height=height)


def bar_chart(df: pd.DataFrame, x: str, y: str, color: str | None = None, *, tooltip: Sequence[str] | None = None,
              title: str | None = None, width: int = 480, height: int = 220) -> alt.Chart:
    """Horizontal-label bars of ``y`` per ``x`` (e.g. timings per stage), coloured by ``color``."""
    tooltip = list(tooltip) if tooltip is not None else list(df.columns)
    enc: dict[str, Any] = {"x": alt.X(f"{x}:N", sort=None, title=None), "y": alt.Y(f"{y}:Q"), "tooltip": tooltip}
    if color:
        pick = alt.selection_point(fields=[color], bind="legend")
        enc.update(color=alt.Color(f"{color}:N"), xOffset=alt.XOffset(f"{color}:N"),
                   opacity=alt.condition(pick, alt.value(1.0), alt.value(0.25)))
        return alt.Chart(df, title=title or "").mark_bar().encode(**enc).add_params(pick).properties(
            width=width, height=height)
    return alt.Chart(df, title=title or "").mark_bar().encode(**enc).properties(width=width, height=height)


PAIR_LABELS = {"self": "self (image with itself)", "knn": "kNN partner", "random": "random image"}


def pair_correlation_chart(pairs: pd.DataFrame, shifts: dict[str, float] | None = None, *, bins: int = 40,
                           title: str | None = None, width: int = 560, height: int = 240) -> alt.Chart:
    """Histograms of the feature correlation F per pair type (``knn.pair_statistics``), each normalised to its
    pair type's count, with the loss's shifts (``{"self": b, "knn": b, "random": b}``) as labelled vertical rules:
    a pair of that type is pulled together where F exceeds its rule and pushed apart below it."""
    need = {"pair", "F"}
    if not isinstance(pairs, pd.DataFrame) or not need <= set(pairs.columns):
        raise ValueError("pairs: expected the frame of stego_core.knn.pair_statistics (columns pair, F)")
    lo = float(min(pairs["F"].min(), *(shifts or {}).values(), -0.2))
    hi = float(max(pairs["F"].max(), *(shifts or {}).values(), 0.6))
    edges = np.linspace(lo, hi, bins + 1)
    rows = []
    for pair, values in pairs.groupby("pair", sort=False)["F"]:
        counts = np.histogram(values, bins=edges)[0]
        rows += [{"pair": PAIR_LABELS.get(pair, pair), "from": float(a), "to": float(b), "share": c / len(values)}
                 for a, b, c in zip(edges[:-1], edges[1:], counts)]
    hist = pd.DataFrame(rows)
    order = [PAIR_LABELS.get(p, p) for p in pairs["pair"].drop_duplicates()]
    pick = alt.selection_point(fields=["pair"], bind="legend")
    color = alt.Color("pair:N", sort=order, title="pair type")
    areas = alt.Chart(hist).mark_area(interpolate="step-after", line=True).encode(
        x=alt.X("from:Q", title="feature correlation F"), y=alt.Y("share:Q", stack=None, title="share of pairs"),
        color=color, opacity=alt.condition(pick, alt.value(0.35), alt.value(0.04)),
        tooltip=["pair", alt.Tooltip("from:Q", format=".2f"), alt.Tooltip("to:Q", format=".2f"),
                 alt.Tooltip("share:Q", format=".3f")]).add_params(pick)
    layers = [areas]
    if shifts:
        rules = pd.DataFrame([{"pair": PAIR_LABELS.get(p, p), "shift": float(b), "label": f"shift {p} = {b:g}"}
                              for p, b in shifts.items()])
        base = alt.Chart(rules).encode(x="shift:Q", color=color)
        layers += [base.mark_rule(strokeDash=[4, 3], strokeWidth=2).encode(tooltip=["pair", "shift"]),
                   base.mark_text(angle=270, align="left", baseline="bottom", dx=4, dy=-2).encode(
                       text="label:N", y=alt.value(4))]
    return alt.layer(*layers, title=title or "").properties(width=width, height=height)


# --------------------------------------------------------------------------------------------- offline renderer

CDN = "https://cdn.jsdelivr.net/npm/"
_counter = itertools.count()
# Loads vega/vega-lite/vega-embed once per page, from <book root>/vendor/ when the page is part of a Sphinx build
# (found from the documentation_options.js script's URL), else from the CDN; AMD (require.js) when it is present.
_LOADER = """
(function () {
  var el = document.getElementById(%(id)s);
  var spec = %(spec)s;
  var opts = %(opts)s;
  function fail(err) { el.innerHTML = '<pre class="stego-chart-error">chart failed: ' + err + '</pre>'; console.error(err); }
  function draw(vegaEmbed) { vegaEmbed(el, spec, opts).catch(fail); }
  var doc = document.querySelector('script[src*="documentation_options.js"]');
  var root = doc ? new URL("../vendor/", doc.src).href : null;
  var libs = root ? {vega: root + "vega/vega.min", "vega-lite": root + "vega-lite/vega-lite.min",
                     "vega-embed": root + "vega-embed/vega-embed.min"}
                  : {vega: "%(cdn)svega@%(vega)s/build/vega.min", "vega-lite": "%(cdn)svega-lite@%(vl)s/build/vega-lite.min",
                     "vega-embed": "%(cdn)svega-embed@%(ve)s/build/vega-embed.min"};
  if (window.vegaEmbed) { draw(window.vegaEmbed); return; }
  if (typeof window.requirejs === "function" && window.define && window.define.amd) {
    window.requirejs.config({paths: libs});
    window.requirejs(["vega-embed"], draw, fail);
    return;
  }
  if (!window.__stegoVega) {
    window.__stegoVega = ["vega", "vega-lite", "vega-embed"].reduce(function (prev, name) {
      return prev.then(function () {
        return new Promise(function (resolve, reject) {
          var s = document.createElement("script");
          s.src = libs[name] + ".js";
          s.onload = resolve;
          s.onerror = function () { reject(new Error("could not load " + s.src)); };
          document.head.appendChild(s);
        });
      });
    }, Promise.resolve());
  }
  window.__stegoVega.then(function () { draw(window.vegaEmbed); }, fail);
})();
"""  # noqa: E501 (JavaScript)


def chart_html(spec: dict, *, embed_options: dict | None = None) -> str:
    """The HTML (a div and a script) that draws a Vega-Lite ``spec`` with vega-embed, offline inside the book."""
    digest = hashlib.sha1(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:10]
    div = f"stego-chart-{digest}-{next(_counter)}"
    opts = {"actions": {"export": True, "source": False, "compiled": False, "editor": False}, "renderer": "svg"}
    opts.update(embed_options or {})
    script = _LOADER % {
        "id": json.dumps(div), "spec": json.dumps(spec, default=str).replace("</", "<\\/"),
        "opts": json.dumps(opts), "cdn": CDN, "vega": alt.VEGA_VERSION, "vl": alt.VEGALITE_VERSION,
        "ve": alt.VEGAEMBED_VERSION,
    }
    alt_text, caption = chart_alt(spec), chart_caption(spec)
    return (f'<figure class="stego-figure"><div id="{div}" class="stego-chart" role="img" '
            f'aria-label="{html.escape(alt_text)}"></div>'
            f'<figcaption>{html.escape(caption)}</figcaption></figure>\n'
            f'<script type="text/javascript">{script}</script>')


def _title_text(title: Any) -> str:
    if isinstance(title, dict):
        title = title.get("text", "")
    if isinstance(title, (list, tuple)):
        title = " ".join(str(s) for s in title)
    return str(title or "").strip()


def _walk_specs(spec: Any):
    """Every (sub)view of a Vega-Lite spec: layers, concatenations, facets, repeats."""
    if not isinstance(spec, dict):
        return
    yield spec
    for key in ("layer", "hconcat", "vconcat", "concat"):
        for sub in spec.get(key, []) or []:
            yield from _walk_specs(sub)
    if isinstance(spec.get("spec"), dict):
        yield from _walk_specs(spec["spec"])


def chart_alt(spec: dict) -> str:
    """Alt text of a chart, read from its spec: its description (when the chart sets one) or its title, the kinds of
    marks and what the axes show (e.g. "Chart: ... line and rule marks; x: code dimension D, y: mIoU (%)")."""
    if spec.get("description"):
        return str(spec["description"])
    marks, axes = [], {}
    for view in _walk_specs(spec):
        mark = view.get("mark")
        mark = mark.get("type") if isinstance(mark, dict) else mark
        if mark and mark not in marks:
            marks.append(mark)
        for channel in ("x", "y"):
            enc = (view.get("encoding") or {}).get(channel)
            if isinstance(enc, dict) and channel not in axes and (enc.get("title") or enc.get("field")):
                axes[channel] = str(enc.get("title") or enc.get("field"))
    title = _title_text(spec.get("title"))
    text = f"Chart “{title}”" if title else "Chart"
    if marks:
        text += " drawn with " + ", ".join(marks) + " marks"
    if axes:
        text += "; " + ", ".join(f"{c}: {v}" for c, v in sorted(axes.items()))
    return text


def chart_caption(spec: dict) -> str:
    """The caption under a chart: its description, else its title, else its alt text."""
    return str(spec.get("description") or "") or _title_text(spec.get("title")) or chart_alt(spec)


def _render(spec: dict, **metadata: Any) -> dict:
    return {"text/html": chart_html(spec, embed_options=metadata.get("embed_options")),
            "text/plain": "<Altair chart>"}


# column names as a reader reads them (the rest: underscores become spaces)
COLUMN_NAMES = {"code_dim": "D", "n_seeds": "seeds", "n_images": "images", "best_step": "selected step",
                "wall_s": "seconds", "n_components": "components"}


def human_column(name: Any) -> Any:
    """``code_dim`` -> ``D``, ``cluster_miou`` -> ``cluster miou``; other names unchanged."""
    if not isinstance(name, str):
        return name
    return COLUMN_NAMES.get(name, name.replace("_", " "))


def _number(value: Any) -> str:
    """Floats rounded for reading: integers without decimals, else two decimals (trailing zeros dropped), tiny
    values with two significant digits."""
    if not isinstance(value, (float, np.floating)) or not np.isfinite(value):
        return "–" if value is None or (isinstance(value, (float, np.floating)) and np.isnan(value)) else str(value)
    if float(value).is_integer() and abs(value) < 1e15:
        return f"{int(value)}"
    if abs(value) < 0.01:
        return f"{value:.2g}"
    return f"{value:.2f}".rstrip("0").rstrip(".")


def frame_html(df: pd.DataFrame) -> str:
    """A DataFrame as the book shows it: no default 0, 1, 2 … index, human column names, rounded numbers, inside a
    box that scrolls when the table is wider than the text column (CSS ``.stego-table``)."""
    shown = df if isinstance(df.columns, pd.MultiIndex) else df.rename(columns=human_column)
    default_index = isinstance(df.index, pd.RangeIndex) and df.index.name is None
    floats = {c: _number for c, dtype in zip(shown.columns, df.dtypes) if pd.api.types.is_float_dtype(dtype)}
    table = shown.to_html(index=not default_index, formatters=floats or None, na_rep="–", border=0,
                          escape=True, max_rows=60)
    return f'<div class="stego-table">{table}</div>'


def enable_table_format() -> None:
    """In an IPython kernel (a chapter being executed), show every DataFrame through :func:`frame_html`."""
    shell = get_ipython()
    if shell is not None:
        shell.display_formatter.formatters["text/html"].for_type(pd.DataFrame, frame_html)


def enable_renderer() -> None:
    """Make ``stego`` (offline-capable HTML, see the module doc) Altair's active renderer."""
    alt.renderers.register("stego", _render)
    alt.renderers.enable("stego")


enable_renderer()
enable_table_format()
