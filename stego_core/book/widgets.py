"""The segmentation explorer's views: the static Altair explorer over precomputed predictions
(``stego_core.explorer.precompute``) and the ipywidgets panel for a live kernel.

``explorer_table(data)`` turns the precomputed content into one row per picture with a ``data:`` URL (JPEG photos,
palette PNG label maps). ``explorer_chart`` builds one Altair chart with parameters bound to HTML controls (image,
method, dim, CRF, probe, overlay opacity) that filter those rows, so the explorer works in the static book without a
kernel (vega-embed only). ``live_explorer`` adds ipywidgets controls and a FileUpload whose callbacks recompute in
Python (``Segmenter.predict``); it only works with a running kernel.
"""
from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from typing import Any

import altair as alt
import ipywidgets as w
import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

from ..backbones import extract_features
from ..config import StegoError
from ..data import normalize_uint8, transform_pair
from ..explorer import METHOD_LABELS, ExplorerData, image_miou, model_label
from ..segmenter import PROBES
from . import viz  # noqa: F401 - registers the offline "stego" Altair renderer the book needs
from .viz import overlay

__all__ = ["explorer_chart", "explorer_table", "jpeg_data_url", "label_data_url", "live_explorer", "prepare_upload"]


# ---------------------------------------------------------------------------------------------------------------
# pictures
def jpeg_data_url(image: np.ndarray, quality: int = 85) -> str:
    """uint8 [H,W,3] photo -> ``data:image/jpeg;base64,...`` (photos compress far better as JPEG than PNG)."""
    buf = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buf, format="JPEG", quality=int(quality))
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def label_data_url(label: np.ndarray, palette: Any) -> str:
    """Label map [H,W] (int, -1 = ignore / unmatched cluster) -> a palette PNG data URL (a few hundred bytes).

    Class c gets ``palette[c]``; -1 is transparent, so an overlay shows the photo there.
    """
    label = np.asarray(label).astype(np.int64)
    pal = np.asarray(palette, dtype=np.uint8)[:255]
    k = len(pal)
    idx = np.where((label >= 0) & (label < k), label, k).astype(np.uint8)  # index k = transparent
    im = Image.fromarray(idx, mode="P")
    flat = np.zeros((256, 3), dtype=np.uint8)
    flat[:k] = pal
    im.putpalette(flat.ravel().tolist())
    im.info["transparency"] = k
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=True, transparency=k)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def explorer_table(data: ExplorerData, *, quality: int = 85) -> pd.DataFrame:
    """The explorer's content (``explorer.precompute``) as one row per picture: item, method (label), dim (0 = any,
    for DINO), crf, probe, kind ("image"/"label"/"prediction"), url (data URL), caption."""
    rows = []
    for i, item in enumerate(data.indices):
        rows.append({"item": item, "method": "", "dim": 0, "crf": False, "probe": "", "kind": "image",
                         "url": jpeg_data_url(data.images[i], quality), "caption": f"#{item}"})
        rows.append({"item": item, "method": "", "dim": 0, "crf": False, "probe": "", "kind": "label",
                         "url": label_data_url(data.labels[i], data.palette), "caption": f"#{item} ground truth"})
    val = data.metrics[data.metrics["split"] == "val"].set_index(["method", "code_dim", "probe", "crf"])
    for (item, method, dim, crf, probe), pred in data.predictions.items():
        i = data.indices.index(item)
        shown = float(image_miou(pred, data.labels[i], len(data.class_names)))
        key = (method, dim, probe, False)
        val_miou = float(val.loc[key, "mIoU"]) if key in val.index else float("nan")
        caption = (f"{model_label(method, dim)} · {probe} probe · CRF {'on' if crf else 'off'} · "
                   f"this image mIoU {shown:.1f} · val mIoU (no CRF) {val_miou:.1f}")
        rows.append({"item": item, "method": METHOD_LABELS.get(method, method),
                     "dim": 0 if method == "dino" else dim, "crf": bool(crf), "probe": probe, "kind": "prediction",
                     "url": label_data_url(pred, data.palette), "caption": caption})
    return pd.DataFrame(rows)



# ---------------------------------------------------------------------------------------------------------------
# the static explorer
def explorer_chart(data: ExplorerData, *, size: int = 200, opacity: float = 0.65, quality: int = 85) -> Any:
    """One Altair chart: photo | ground truth over the photo | prediction over the photo, plus a caption line.

    HTML controls (vega-embed bindings; parameters ``image_id``, ``method``, ``dim``, ``crf``, ``probe``,
    ``opacity`` — not ``item``, a reserved name in Vega expressions): image, method, code dim (ignored by DINO),
    CRF, probe, overlay opacity.
    Every picture is a precomputed data URL in the chart's data; the controls only filter rows, so the explorer
    needs no kernel.
    """
    df = explorer_table(data, quality=quality)
    preds = df[df["kind"] == "prediction"]
    if preds.empty:
        raise StegoError("data: no predictions to explore")
    methods = list(dict.fromkeys(preds["method"]))
    dims = data.dims or [0]
    probes = list(dict.fromkeys(preds["probe"]))
    items = list(data.indices)

    p_item = alt.param(name="image_id", value=items[0],
                       bind=alt.binding_select(options=items, labels=[f"#{i}" for i in items], name="image "))
    p_method = alt.param(name="method", value=methods[0], bind=alt.binding_select(options=methods, name="method "))
    p_dim = alt.param(name="dim", value=dims[len(dims) // 2],
                      bind=alt.binding_select(options=dims, name="code dim (not DINO) "))
    p_crf = alt.param(name="crf", value=False, bind=alt.binding_checkbox(name="DenseCRF "))
    p_probe = alt.param(name="probe", value=probes[0], bind=alt.binding_radio(options=probes, name="probe "))
    p_alpha = alt.param(name="opacity", value=float(opacity),
                        bind=alt.binding_range(min=0, max=1, step=0.05, name="overlay opacity "))

    same_item = alt.datum.item == p_item
    is_pred = ((alt.datum.kind == "prediction") & same_item & (alt.datum.method == p_method)
               & ((alt.datum.dim == p_dim) | (alt.datum.dim == 0)) & (alt.datum.crf == p_crf)
               & (alt.datum.probe == p_probe))
    base = alt.Chart(df)
    enc = {"url": "url:N", "x": alt.value(size / 2), "y": alt.value(size / 2), "tooltip": ["caption:N"]}

    def photo(title):
        return (base.transform_filter((alt.datum.kind == "image") & same_item)
                .mark_image(width=size, height=size).encode(**enc).properties(width=size, height=size, title=title))

    gt = base.transform_filter((alt.datum.kind == "label") & same_item).mark_image(
        width=size, height=size, opacity=p_alpha).encode(**enc)
    pred = base.transform_filter(is_pred).mark_image(width=size, height=size, opacity=p_alpha).encode(**enc)
    caption = (base.transform_filter(is_pred).mark_text(align="left", baseline="middle", fontSize=12)
               .encode(text="caption:N", x=alt.value(0), y=alt.value(10), tooltip=["caption:N"])
               .properties(width=3 * size + 40, height=20))
    panels = alt.hconcat(photo("image"), alt.layer(photo("ground truth"), gt),
                         alt.layer(photo("prediction"), pred), spacing=10)
    legend = _legend(data.class_names, data.palette)
    return (alt.vconcat(alt.hconcat(panels, legend), caption)
            .add_params(p_item, p_method, p_dim, p_crf, p_probe, p_alpha)
            .configure_view(stroke=None))


def _legend(class_names: Sequence[str], palette: Any) -> Any:
    colors = ["#{:02x}{:02x}{:02x}".format(*tuple(int(v) for v in c)) for c in np.asarray(palette, dtype=np.uint8)]
    df = pd.DataFrame({"class": list(class_names), "class_id": range(len(class_names)),
                       "color": colors[: len(class_names)]})
    return (alt.Chart(df, title="classes").mark_square(size=160)
            .encode(y=alt.Y("class:N", sort=None, axis=alt.Axis(title=None, domain=False, ticks=False)),
                    color=alt.Color("color:N", scale=None), tooltip=["class", "class_id"])
            .properties(width=16))


# ---------------------------------------------------------------------------------------------------------------
# the live panel
def prepare_upload(content: bytes, res: int, *, protocol: str = "original") -> np.ndarray:
    """An uploaded image file -> uint8 [res,res,3]: shorter side resized to ``res``, centre crop (as the data)."""
    try:
        image = np.asarray(Image.open(io.BytesIO(bytes(content))).convert("RGB"))
    except (UnidentifiedImageError, OSError) as exc:
        raise StegoError(f"upload: not an image file ({exc})") from None
    dummy = np.zeros(image.shape[:2], dtype=np.int64)
    out, _ = transform_pair(image, dummy, int(res), crop="center", protocol=protocol)
    return np.ascontiguousarray(out)


def live_explorer(data: ExplorerData, backbone: Any, *, res: int = 224, workers: int | None = 1,
                  width: int = 220) -> Any:
    """ipywidgets panel for a live kernel: pick a shown image or upload your own, pick model, probe and CRF; the
    prediction is recomputed in Python (backbone -> the model's code -> probe -> CRF, ``Segmenter.predict``). In a
    static page it is inert."""
    keys = list(data.models)
    model_dd = w.Dropdown(options=[(model_label(m, d), (m, d)) for m, d in keys], value=keys[0], description="model")
    image_dd = w.Dropdown(options=[(f"#{i}", i) for i in data.indices] + [("upload", -1)], value=data.indices[0],
                          description="image")
    probe_tb = w.ToggleButtons(options=list(PROBES), value="cluster", description="probe")
    crf_cb = w.Checkbox(value=False, description="DenseCRF")
    upload = w.FileUpload(accept="image/*", multiple=False, description="your image")
    photo_w = w.Image(format="png", width=width)
    pred_w = w.Image(format="png", width=width)
    status = w.Label("")
    state: dict[str, Any] = {"upload": None}

    def png(arr: np.ndarray) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG")
        return buf.getvalue()

    def refresh(*_: Any) -> None:
        try:
            if image_dd.value == -1:
                if state["upload"] is None:
                    status.value = "upload an image first"
                    return
                image = state["upload"]
            else:
                image = data.images[data.indices.index(image_dd.value)]
            status.value = "computing ..."
            seg = data.models[model_dd.value]
            code = seg.code(extract_features(backbone, normalize_uint8(image[None])))  # [1,D,h,w]
            pred = seg.predict(code, image.shape[:2], probe_tb.value, crf=crf_cb.value, images=image[None],
                               workers=workers or 1, protocol=data.protocol)[0].numpy()
            photo_w.value = png(image)
            pred_w.value = png(overlay(image, pred, data.palette, 0.6))
            crf = "on" if crf_cb.value else "off"
            status.value = f"{model_label(*model_dd.value)}, {probe_tb.value} probe, CRF {crf}"
        except Exception as exc:  # noqa: BLE001 - shown in the panel, the kernel keeps running
            status.value = f"error: {exc}"

    def on_upload(change: Any) -> None:
        files = change["new"]
        if not files:
            return
        item = files[0] if isinstance(files, (list, tuple)) else next(iter(files.values()))
        try:
            state["upload"] = prepare_upload(item["content"], res, protocol=data.protocol)
        except StegoError as exc:
            status.value = str(exc)
            return
        image_dd.value = -1
        refresh()

    for ctl in (model_dd, image_dd, probe_tb, crf_cb):
        ctl.observe(refresh, names="value")
    upload.observe(on_upload, names="value")
    refresh()
    return w.VBox([w.HBox([image_dd, upload]), w.HBox([model_dd, crf_cb]), probe_tb,
                   w.HBox([photo_w, pred_w]), status])
