"""The segmentation explorer: finished runs, precomputed predictions per (image, method, dim, CRF, probe), the static
Altair explorer over them, and a Python-backed panel for a live kernel.

Finding models. ``find_runs`` lists the finished training runs under ``<root>/runs`` (written by
``stego_core.training.train``: notebook 02, the sweep of notebook 03); ``ensure_run`` returns the newest one that
matches (dataset, backbone, stores, method, dim, seed, protocol, overrides) and trains it with the preset only when
there is none, so a chapter reuses what earlier chapters trained. The evaluation and quirks chapters use them too.

Predictions (``predict_maps``) follow the evaluation protocol of ``stego_core.evaluation`` on a run's code:
code upsampled bilinearly to the image size, linear log-softmax or cluster log_softmax(2·cos), optional DenseCRF
(``stego_core.crf.CRFPool``), argmax; cluster ids are mapped to classes with the Hungarian assignment of the whole
validation split (``assignment`` of ``evaluate_codes`` without CRF), not of the few images shown.

``precompute`` runs every model over the validation store once (its metrics and assignment) and over the chosen
images with and without CRF; ``ExplorerData.table()`` turns the result into one row per picture with a ``data:``
URL (JPEG photos, palette PNG label maps). ``explorer_chart`` builds one Altair chart with parameters bound to
HTML controls (image, method, dim, CRF, probe, overlay opacity) that filter those rows, so the explorer works in
the static book without a kernel (vega-embed only). ``live_explorer`` adds ipywidgets controls and a FileUpload
whose callbacks recompute in Python; it only works with a running kernel.
"""
from __future__ import annotations

import base64
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch

from .config import PROTOCOLS, StegoError, artifacts_root, check_choice, check_int

__all__ = ["METHOD_LABELS", "find_runs", "ensure_run", "as_head", "model_label", "predict_maps", "ExplorerData", "precompute",
           "explorer_chart", "live_explorer", "jpeg_data_url", "label_data_url", "prepare_upload"]

#: How the book names the methods of ``stego_core.training.METHODS``.
METHOD_LABELS = {"stego": "STEGO", "pca": "PCA", "rp": "RP", "hnne": "h-NNE", "dino": "DINO"}
PROBES = ("cluster", "linear")


# ---------------------------------------------------------------------------------------------------------------
# runs
def _store_path(store: Any) -> str | None:
    if store is None:
        return None
    return str(getattr(store, "path", store))


def find_runs(root: str | os.PathLike | None = None, *, dataset: str | None = None, backbone: str | None = None,
              method: str | None = None, code_dim: int | None = None, seed: int | None = None,
              protocol: str | None = None, train_store: Any = None, val_store: Any = None,
              **config: Any) -> pd.DataFrame:
    """Finished runs under ``<root>/runs`` (folders with ``DONE``), newest first, filtered by the given values.

    Filters: any ``TrainConfig`` field (``dataset``, ``method``, ``extra_clusters``, ...; ``code_dim`` is ignored
    for the DINO baseline, whose code has the backbone's C channels) and the stores (FeatureStore or path) the run
    was trained and validated on. Columns: run_dir, run_id, the config fields, train_store, val_store, best
    (validation metrics at the selected step), finished (mtime of ``DONE``).
    """
    runs = artifacts_root(root) / "runs"
    rows = []
    want = {k: v for k, v in dict(dataset=dataset, backbone=backbone, method=method, seed=seed, protocol=protocol,
                                  **config).items() if v is not None}
    for done in runs.glob("*/DONE") if runs.is_dir() else []:
        try:
            meta = json.loads((done.parent / "meta.json").read_text())
        except (OSError, ValueError):
            continue
        cfg = meta.get("config") or {}
        if any(cfg.get(k) != v for k, v in want.items()):
            continue
        if code_dim is not None and cfg.get("method") != "dino" and cfg.get("code_dim") != int(code_dim):
            continue
        if train_store is not None and meta.get("train_store") != _store_path(train_store):
            continue
        if val_store is not None and meta.get("val_store") != _store_path(val_store):
            continue
        rows.append({"run_dir": done.parent, "run_id": done.parent.name, **cfg,
                     "train_store": meta.get("train_store"), "val_store": meta.get("val_store"),
                     "best": meta.get("best") or {}, "finished": done.stat().st_mtime})
    df = pd.DataFrame(rows)
    if df.empty:
        return pd.DataFrame(columns=["run_dir", "run_id", "dataset", "backbone", "method", "code_dim", "seed",
                                     "protocol", "train_store", "val_store", "best", "finished"])
    return df.sort_values("finished", ascending=False, kind="stable").reset_index(drop=True)


def ensure_run(preset: str, *, train_store: Any, val_store: Any, method: str = "stego", code_dim: int | None = None,
               seed: int = 0, protocol: str = "original", which: str = "best", root: str | os.PathLike | None = None,
               progress: bool = True, device: str = "cpu", **overrides: Any) -> Any:
    """A finished run of ``method`` (at ``code_dim``; None = the preset's) on these stores as a ``LoadedRun``.

    The newest finished run that matches (training store, method, dim, seed, protocol and every override, e.g.
    ``extra_clusters=3``) is loaded, whatever validation store selected its checkpoint; when there is none, ``training.train`` trains one from ``preset`` with the
    overrides (and skips/resumes whatever it finds in its own keyed folder). ``which``: "best" (model selection of
    the study) or "last".
    """
    from .training import PRESETS, load_run, make_config, train

    check_choice("preset", preset, PRESETS)
    check_choice("protocol", protocol, PROTOCOLS)
    dim = int(code_dim if code_dim is not None else PRESETS[preset].get("code_dim", 70))
    if method == "stego" and "correspondence_weight" not in overrides:
        # A STEGO run means one trained with the correspondence loss: never pick up a probes-only control run
        # (chapter 02's "untrained head", correspondence_weight 0) in its place.
        overrides = {**overrides, "correspondence_weight": PRESETS[preset].get("correspondence_weight", 1.0)}
    found = find_runs(root, dataset=PRESETS[preset]["dataset"], backbone=PRESETS[preset]["backbone"], method=method,
                      code_dim=dim, seed=int(seed), protocol=protocol, train_store=train_store, **overrides)
    if not found.empty:
        return load_run(found.loc[0, "run_dir"], which=which)
    cfg = make_config(preset, method=method, code_dim=dim, seed=int(seed), protocol=protocol, **overrides)
    # A missing run trains on ``device``; the loaded modules stay on the CPU, where the explorer's drawing runs.
    result = train(cfg, train_store=train_store, val_store=val_store, root=root, progress=progress, device=device)
    return load_run(result.run_dir, which=which)


class _RunCode(torch.nn.Module):
    """A run's feats -> code map (its fixed projection) as an eval-mode module for ``evaluation.evaluate``."""

    def __init__(self, run: Any):
        super().__init__()
        self.run = run
        self.eval()

    def forward(self, feats: Any) -> Any:
        return self.run.code(feats)


def as_head(run: Any) -> Any:
    """The module ``evaluation.evaluate`` / ``flip_code`` apply after the backbone for a LoadedRun: its STEGO head,
    None for the DINO baseline (code = features), else a module that applies the run's fitted projection (so the
    flip average is taken on the projected code, the head output of the reference)."""
    if getattr(run, "head", None) is not None:
        return run.head
    if getattr(run, "projection", None) is None:
        return None
    return _RunCode(run)


def model_label(method: str, code_dim: int | None) -> str:
    """"STEGO d=24", "PCA d=6", "DINO (C=112)"."""
    name = METHOD_LABELS.get(method, method)
    return f"{name} (C={code_dim})" if method == "dino" else f"{name} d={code_dim}"


# ---------------------------------------------------------------------------------------------------------------
# pictures
def jpeg_data_url(image: np.ndarray, quality: int = 85) -> str:
    """uint8 [H,W,3] photo -> ``data:image/jpeg;base64,...`` (photos compress far better as JPEG than PNG)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buf, format="JPEG", quality=int(quality))
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def label_data_url(label: np.ndarray, palette: Any) -> str:
    """Label map [H,W] (int, -1 = ignore / unmatched cluster) -> a palette PNG data URL (a few hundred bytes).

    Class c gets ``palette[c]``; -1 is transparent, so an overlay shows the photo there.
    """
    from PIL import Image

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


# ---------------------------------------------------------------------------------------------------------------
# predictions
def _normalised(images_u8: np.ndarray) -> Any:
    import torch

    from .data import normalize

    x = torch.as_tensor(np.asarray(images_u8, dtype=np.uint8)).permute(0, 3, 1, 2).float() / 255.0  # [n,H,W,3]->[n,3,H,W]
    return normalize(x)


def predict_maps(run: Any, code: Any, images_u8: np.ndarray, *, probe: str = "cluster", crf: bool = False,
                 to_class: np.ndarray | None = None, pool: Any = None, workers: int | None = 1,
                 protocol: str = "original") -> np.ndarray:
    """Class maps [n,H,W] (int64, -1 = a cluster without a class) of the code [n,D,h,w] of ``images_u8``
    (uint8 [n,H,W,3]) with ``run``'s probe, optionally refined by DenseCRF.

    to_class: cluster id -> class (-1 unmatched) for the cluster probe (identity when None). pool: a
    ``CRFPool`` to reuse (else one with ``workers`` processes is opened for this call).
    """
    import torch
    import torch.nn.functional as F

    from .crf import CRFPool

    check_choice("probe", probe, PROBES)
    images_u8 = np.asarray(images_u8, dtype=np.uint8)
    code = torch.as_tensor(code).float()
    if code.ndim != 4 or code.shape[0] != images_u8.shape[0]:
        raise StegoError(f"code: expected [{images_u8.shape[0]},D,h,w] (one map per image), got {tuple(code.shape)}")
    size = images_u8.shape[1:3]
    with torch.no_grad():
        up = F.interpolate(code, size=size, mode="bilinear", align_corners=False)  # [n,D,H,W]
        if probe == "linear":
            logp = torch.log_softmax(run.linear_probe(up), dim=1)  # [n,K,H,W]
        else:
            logp = run.cluster_probe.log_probs(up, alpha=2.0)  # [n,K+E,H,W]
    if crf:
        own = pool is None
        pool = pool or CRFPool(workers, protocol=protocol, progress=False)
        try:
            q = pool.map(list(_normalised(images_u8)), list(logp))
        finally:
            if own:
                pool.close()
        pred = np.stack([m.argmax(0) for m in q]).astype(np.int64)  # [n,H,W]
    else:
        pred = logp.argmax(1).numpy().astype(np.int64)
    if probe == "cluster" and to_class is not None:
        pred = np.asarray(to_class, dtype=np.int64)[pred]
    return pred


def _to_class(assignment: tuple, n_clusters: int) -> np.ndarray:
    rows, cols = assignment
    out = np.full(n_clusters, -1, dtype=np.int64)  # cluster id -> class (-1: unmatched)
    out[np.asarray(rows, dtype=np.int64)] = np.asarray(cols, dtype=np.int64)
    return out


@dataclass
class ExplorerData:
    """Precomputed explorer content (see ``precompute``)."""

    indices: list[int]  # validation-store items shown
    images: np.ndarray  # uint8 [n,H,W,3]
    labels: np.ndarray  # int64 [n,H,W] ground truth (-1 ignore)
    class_names: list[str]
    palette: np.ndarray  # uint8 [K,3]
    models: dict[tuple[str, int], Any]  # (method, dim) -> LoadedRun (dim = C for "dino")
    to_class: dict[tuple[str, int], np.ndarray]  # cluster id -> class per model (validation-split Hungarian)
    predictions: dict[tuple[int, str, int, bool, str], np.ndarray]  # (item, method, dim, crf, probe) -> [H,W]
    metrics: pd.DataFrame  # method, label, code_dim, probe, crf, mIoU, Accuracy (+ split "val" or "shown")
    protocol: str = "original"
    dims: list[int] = field(default_factory=list)  # the code dims offered (DINO excluded)

    def table(self, *, quality: int = 85) -> pd.DataFrame:
        """One row per picture: item, method (label), dim (0 = any, for DINO), crf, probe, kind
        ("image"/"label"/"prediction"), url (data URL), caption."""
        rows = []
        for i, item in enumerate(self.indices):
            rows.append(dict(item=item, method="", dim=0, crf=False, probe="", kind="image",
                             url=jpeg_data_url(self.images[i], quality), caption=f"#{item}"))
            rows.append(dict(item=item, method="", dim=0, crf=False, probe="", kind="label",
                             url=label_data_url(self.labels[i], self.palette), caption=f"#{item} ground truth"))
        val = self.metrics[self.metrics["split"] == "val"].set_index(["method", "code_dim", "probe", "crf"])
        for (item, method, dim, crf, probe), pred in self.predictions.items():
            i = self.indices.index(item)
            shown = float(_image_miou(pred, self.labels[i], len(self.class_names)))
            key = (method, dim, probe, False)
            val_miou = float(val.loc[key, "mIoU"]) if key in val.index else float("nan")
            caption = (f"{model_label(method, dim)} · {probe} probe · CRF {'on' if crf else 'off'} · "
                       f"this image mIoU {shown:.1f} · val mIoU (no CRF) {val_miou:.1f}")
            rows.append(dict(item=item, method=METHOD_LABELS.get(method, method), dim=0 if method == "dino" else dim,
                             crf=bool(crf), probe=probe, kind="prediction", url=label_data_url(pred, self.palette),
                             caption=caption))
        return pd.DataFrame(rows)


def _image_miou(pred: np.ndarray, label: np.ndarray, k: int) -> float:
    """mIoU of one image's class map (NaN-skipping over classes present in prediction or label)."""
    valid = (label >= 0) & (label < k)
    p, t = pred[valid], label[valid]
    ious = []
    for c in range(k):
        union = np.sum((p == c) | (t == c))
        if union:
            ious.append(np.sum((p == c) & (t == c)) / union)
    return 100.0 * float(np.mean(ious)) if ious else float("nan")


def precompute(models: dict[tuple[str, int], Any], store: Any, indices: Sequence[int], *,
               crf: Sequence[bool] = (False, True), probes: Sequence[str] = PROBES, workers: int | None = None,
               protocol: str = "original", batch_size: int = 8, progress: bool = True) -> ExplorerData:
    """Predictions of every model for the validation-store items ``indices`` with and without CRF.

    models: (method, dim) -> LoadedRun (``ensure_run``). store: the validation FeatureStore; each model first runs
    over all of it (batches of ``batch_size``, as validation does: the per-batch standardisation of PCA/RP/h-NNE
    depends on it) for its no-CRF metrics and the cluster -> class assignment; the chosen items' code is kept.
    """
    import torch
    from tqdm.auto import tqdm

    from .crf import CRFPool
    from .evaluation import evaluate_codes

    check_choice("protocol", protocol, PROTOCOLS)
    check_int("batch_size", batch_size, minimum=1)
    for p in probes:
        check_choice("probes", p, PROBES)
    if not models:
        raise StegoError("models: expected at least one (method, dim) -> run")
    indices = [int(i) for i in indices]
    if not indices or min(indices) < 0 or max(indices) >= len(store):
        raise StegoError(f"indices: expected item numbers in [0, {len(store)}), got {indices}")
    shown = store.read(np.asarray(indices))
    images = np.asarray(shown["image"], dtype=np.uint8)
    labels = torch.as_tensor(shown["label"]).numpy().astype(np.int64)
    class_names = list(store.class_names)
    palette = store.palette if store.palette is not None else np.zeros((len(class_names), 3), np.uint8)
    predictions: dict = {}
    to_class: dict = {}
    metric_rows = []
    pool = CRFPool(workers, protocol=protocol, progress=False) if any(crf) else None
    try:
        for (method, dim), run in tqdm(list(models.items()), desc="explorer", unit="model", disable=not progress):
            kept: dict[int, Any] = {}

            def batches():
                for start in range(0, len(store), batch_size):
                    idx = np.arange(start, min(start + batch_size, len(store)))
                    rec = store.read(idx)
                    code = run.code(torch.as_tensor(rec["feats"]).float())  # [b,D,h,w]
                    for j, item in enumerate(idx.tolist()):
                        if item in indices:
                            kept[item] = code[j]
                    yield {"code": code, "label": rec["label"]}

            res = evaluate_codes(batches(), run.cluster_probe, run.linear_probe, crf=False, protocol=protocol,
                                 class_names=class_names, progress=False)
            n_clusters = int(run.cluster_probe.centres.shape[0])
            to_class[(method, dim)] = _to_class(res["cluster"]["assignment"], n_clusters)
            for probe in PROBES:
                metric_rows.append(dict(method=method, label=model_label(method, dim), code_dim=dim, probe=probe,
                                        crf=False, split="val", n_images=res["n_images"],
                                        mIoU=res[f"{probe}/mIoU"], Accuracy=res[f"{probe}/Accuracy"]))
            code = torch.stack([kept[i] for i in indices])  # [n,D,h,w]
            for use_crf in crf:
                for probe in probes:
                    maps = predict_maps(run, code, images, probe=probe, crf=bool(use_crf),
                                        to_class=to_class[(method, dim)], pool=pool, protocol=protocol)
                    for item, m in zip(indices, maps):
                        predictions[(item, method, dim, bool(use_crf), probe)] = m
    finally:
        if pool is not None:
            pool.close()
    dims = sorted({d for (m, d) in models if m != "dino"})
    return ExplorerData(indices=indices, images=images, labels=labels, class_names=class_names,
                        palette=np.asarray(palette, dtype=np.uint8), models=dict(models), to_class=to_class,
                        predictions=predictions, metrics=pd.DataFrame(metric_rows), protocol=protocol, dims=dims)


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
    import altair as alt

    from . import viz  # noqa: F401 - registers the offline "stego" Altair renderer the book needs

    df = data.table(quality=quality)
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
    enc = dict(url="url:N", x=alt.value(size / 2), y=alt.value(size / 2), tooltip=["caption:N"])

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
    import altair as alt

    colors = ["#%02x%02x%02x" % tuple(int(v) for v in c) for c in np.asarray(palette, dtype=np.uint8)]
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
    from PIL import Image, UnidentifiedImageError

    from .data import transform_pair

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
    prediction is recomputed in Python (backbone -> run's code -> probe -> CRF). In a static page it is inert."""
    import ipywidgets as w
    import torch

    from .backbones import extract_features

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
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG")
        return buf.getvalue()

    def refresh(*_: Any) -> None:
        from .viz import overlay

        try:
            if image_dd.value == -1:
                if state["upload"] is None:
                    status.value = "upload an image first"
                    return
                image = state["upload"]
            else:
                image = data.images[data.indices.index(image_dd.value)]
            status.value = "computing ..."
            run = data.models[model_dd.value]
            with torch.no_grad():
                feats = extract_features(backbone, _normalised(image[None])).float()  # [1,C,h,w]
                code = run.code(feats)
            pred = predict_maps(run, code, image[None], probe=probe_tb.value, crf=crf_cb.value,
                                to_class=data.to_class[model_dd.value], workers=workers, protocol=data.protocol)[0]
            photo_w.value = png(image)
            pred_w.value = png(overlay(image, pred, data.palette, 0.6))
            status.value = f"{model_label(*model_dd.value)}, {probe_tb.value} probe, CRF {'on' if crf_cb.value else 'off'}"
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
