"""The live explorer behind ``stego-study explore``: Python-callback widgets served with a real kernel by Voilà.

The book's explorer (chapter 05) is precomputed so that it works in a static page; this one recomputes. It offers
the finished runs under the artifacts root (``stego_core.runs.find_runs``; ``$STEGO_ARTIFACTS`` or ``./artifacts``)
grouped by the feature stores they were trained on, and released STEGO checkpoints; the reader picks a method and a
code dimension among a group's runs (or a checkpoint), the probe (cluster / linear) and DenseCRF on or off, and a
validation image of the run's store or a photo of their own (upload). Every prediction is ``segment.label_map`` —
the recipe of ``stego-study segment`` through ``Segmenter.image_code`` / ``log_probs`` / ``refine`` — with the run's
clusters matched to classes once on its whole validation store (``evaluation.evaluate_store``, as the book does);
a checkpoint's clusters stay cluster ids. Nothing trains here: without runs the app says which command makes them.

``explore_app(...)`` builds the widget (``LiveExplorer``) in a kernel; ``write_app_notebook`` writes the one-cell
notebook that Voilà renders; ``serve(...)`` runs Voilà on localhost (``stego-study explore``).
"""
from __future__ import annotations

import html
import io
import json
import os
import sys
import tempfile
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ipywidgets as w
import nbformat
import numpy as np
import pandas as pd
from IPython.display import Markdown
from PIL import Image, ImageOps, UnidentifiedImageError
from voila.app import Voila  # the server, only for this command

from ..backbones import load_backbone
from ..cache import open_store
from ..config import StegoError, artifacts_root, check_int, resolve_device
from ..evaluation import evaluate_store
from ..explorer import METHOD_LABELS, model_label
from ..runs import find_runs
from ..segment import id_names, label_map, load_segmenter
from ..segmenter import PROBES, Segmenter
from .parameters import load_profile
from .runner import ensure_kernel
from .viz import overlay

__all__ = ["LiveExplorer", "Source", "explore_app", "explore_settings", "find_sources", "no_runs_message",
           "read_upload", "serve", "write_app_notebook"]

UPLOAD = -1  # the image dropdown's value for "your photo"


# ---------------------------------------------------------------------------------------------------------------
# what can be explored
@dataclass
class Source:
    """A group of finished runs on one pair of feature stores (the reader picks method and dim among them), or one
    released checkpoint."""

    key: str
    label: str
    kind: str  # "runs" or "checkpoint"
    models: dict[tuple[str, int], str] = field(default_factory=dict)  # (method, dim) -> run folder
    val_store: str | None = None  # the runs' validation store (images to pick, cluster -> class matching)
    protocol: str = "original"
    checkpoint: Any = None  # a .ckpt path (or a checkpoints.LoadedCheckpoint)


def _pick(rows: pd.DataFrame) -> str:
    """The run shown for one (method, dim): the newest, but a STEGO run trained with the correspondence loss
    before a probes-only control run (chapter 02's untrained head, correspondence_weight 0)."""
    if "correspondence_weight" in rows:
        trained = rows[rows["correspondence_weight"].fillna(1.0).astype(float) > 0]
        if len(trained):
            rows = trained
    return str(rows.iloc[0]["run_dir"])


def find_sources(root: Any = None, *, dataset: str | None = None, backbone: str | None = None,
                 checkpoints: Sequence[str | os.PathLike] = ()) -> list[Source]:
    """The run groups under ``root`` (one per training store, validation store, protocol and seed; newest first)
    whose dataset and backbone match the given ones (None = any), then one source per checkpoint file."""
    runs = find_runs(root, dataset=dataset, backbone=backbone)
    sources = []
    if len(runs):
        keys = ["train_store", "val_store", "dataset", "backbone", "protocol", "seed"]
        for values, group in runs.groupby(keys, sort=False, dropna=False):
            info = dict(zip(keys, values))
            models = {}
            for (method, dim), rows in group.groupby(["method", "code_dim"], sort=False):
                models[(str(method), int(dim))] = _pick(rows)
            store = Path(str(info["train_store"])).name
            label = (f"runs · {info['dataset']} · {info['backbone']} · {store} · seed {info['seed']} · "
                     f"{info['protocol']} ({len(models)})")
            sources.append(Source(key=f"runs:{info['train_store']}|{info['protocol']}|{info['seed']}", label=label,
                                  kind="runs", models=models, val_store=info["val_store"],
                                  protocol=str(info["protocol"])))
    for ck in checkpoints:
        path = Path(ck)
        if not path.is_file():
            raise StegoError(f"checkpoint: file {path} not found; expected a released STEGO .ckpt file")
        sources.append(Source(key=f"checkpoint:{path.resolve()}", label=f"checkpoint · {path.name}",
                              kind="checkpoint", checkpoint=str(path.resolve())))
    return sources


def no_runs_message(root: Any = None, profile: str | None = None) -> str:
    """What to run when there is nothing to explore (Markdown)."""
    name = profile or "demo"
    return (f"**No finished runs yet** under `{artifacts_root(root) / 'runs'}` (the artifacts root: "
            f"`$STEGO_ARTIFACTS`, else `./artifacts`).\n\nThe explorer only reads runs; make them with\n\n"
            f"```bash\nstego-study book --profile {name}\n```\n\nor stage by stage: `stego-study run 01_features "
            f"--profile {name}`, then `stego-study run 02_train_stego --profile {name}` and `stego-study run "
            f"03_dimension_study --profile {name}`. A released checkpoint works without runs: "
            f"`stego-study explore --checkpoint FILE.ckpt`.")


def explore_settings(profile: str | None = None) -> dict[str, Any]:
    """The settings a profile gives the explorer: dataset and backbone of its runs, device, artifacts root and the
    released checkpoints of its evaluation chapter. No profile: every run under the artifacts root, on the CPU."""
    out: dict[str, Any] = {"dataset": None, "backbone": None, "device": "cpu", "root": None, "checkpoints": []}
    if profile is None:
        return out

    stages = dict(load_profile(profile))
    explorer = stages.get("05_explorer") or {}
    evaluate = stages.get("04_evaluate") or {}
    for name in ("dataset", "backbone", "device", "root"):
        if explorer.get(name) is not None:
            out[name] = explorer[name]
    out["checkpoints"] = [str(evaluate[k]) for k in ("checkpoint", "baseline_checkpoint") if evaluate.get(k)]
    return out


# ---------------------------------------------------------------------------------------------------------------
# pictures
def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _legend_html(label: np.ndarray, palette: np.ndarray, names: Sequence[str]) -> str:
    """The ids present in ``label`` with their colour, name and share of the pixels, largest first."""
    ids, counts = np.unique(np.asarray(label), return_counts=True)
    total = max(int(counts.sum()), 1)
    rows = []
    for i, c in sorted(zip(ids.tolist(), counts.tolist()), key=lambda t: -t[1]):
        if 0 <= i < len(names):
            r, g, b = (int(v) for v in palette[i])
            name = html.escape(names[i])
            swatch = f"background: rgb({r},{g},{b})"
        else:
            name, swatch = "no class (unmatched cluster)", "background: transparent; border: 1px solid #999"
        rows.append(f'<li class="stego-legend-item" data-id="{i}"><span style="display:inline-block; width:14px; '
                    f'height:14px; margin-right:6px; vertical-align:middle; {swatch}"></span>{name} '
                    f"<small>{100 * c / total:.1f} %</small></li>")
    return '<ul class="stego-legend" style="list-style:none; padding-left:0; margin:0">' + "".join(rows) + "</ul>"


def _upload_image(value: Any) -> tuple[str, bytes] | None:
    """(name, bytes) of the file in a FileUpload value (ipywidgets 8: a tuple of dicts), or None."""
    files = list(value.values()) if isinstance(value, dict) else list(value or ())
    if not files:
        return None
    item = files[-1]
    return str(item.get("name", "upload")), bytes(item["content"])


def read_upload(content: bytes) -> np.ndarray:
    """An uploaded file -> uint8 RGB [H,W,3] at its own size (EXIF orientation applied), or a StegoError."""
    try:
        with Image.open(io.BytesIO(content)) as im:
            return np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    except (UnidentifiedImageError, OSError) as exc:
        raise StegoError(f"upload: not an image file ({exc}); expected a JPEG/PNG/WebP photo") from None


def _fit(image: np.ndarray, longest: int) -> np.ndarray:
    """A large photo shrunk so that its longer side is ``longest`` (the explorer shows, it does not archive)."""
    h, w = image.shape[:2]
    if max(h, w) <= longest:
        return image
    scale = longest / max(h, w)
    return np.asarray(Image.fromarray(image).resize((max(1, round(w * scale)), max(1, round(h * scale))),
                                                    Image.BILINEAR))


# ---------------------------------------------------------------------------------------------------------------
# the app
class LiveExplorer:
    """The widgets and their callbacks (``widget`` is the ipywidgets box to display).

    Caches what is slow to make: one backbone per (name, weights, protocol), one segmenter per run (with its
    validation-store cluster -> class map), the stores' images.
    """

    def __init__(self, sources: Sequence[Source], *, device: Any = "cpu", n_images: int = 8, width: int = 320,
                 max_side: int = 640, res: int | None = None):
        if not sources:
            raise StegoError("sources: nothing to explore (find_sources found no runs and no checkpoint)")
        self.sources = {s.key: s for s in sources}
        self.device = resolve_device(device)
        self.n_images = check_int("n_images", n_images, minimum=0)
        self.res, self.max_side = res, int(max_side)
        self._backbones: dict[tuple, Any] = {}
        self._segmenters: dict[str, tuple[Segmenter, dict[str, Any]]] = {}
        self._stores: dict[str, Any] = {}
        self._upload: np.ndarray | None = None
        self._quiet = False
        self.source = w.Dropdown(options=[(s.label, s.key) for s in sources], value=sources[0].key,
                                 description="model", layout=w.Layout(width="100%", max_width="860px"))
        self.method = w.Dropdown(description="method")
        self.dim = w.Dropdown(description="code dim")
        self.probe = w.ToggleButtons(options=list(PROBES), value="cluster", style={"button_width": "80px"},
                                     tooltips=["unsupervised clusters (matched to classes)", "supervised read-out"])
        self.crf = w.Checkbox(value=False, description="DenseCRF")
        self.image = w.Dropdown(description="image")
        self.upload = w.FileUpload(accept="image/*", multiple=False, description="your photo")
        self.photo = w.Image(format="png", width=width)
        self.segmentation = w.Image(format="png", width=width)
        self.legend = w.HTML()
        self.info = w.HTML()
        self.status = w.HTML()
        for widget, name in ((self.source, "source"), (self.method, "method"), (self.dim, "dim"),
                             (self.probe, "probe"), (self.crf, "crf"), (self.image, "image"),
                             (self.upload, "upload"), (self.photo, "photo"), (self.segmentation, "segmentation"),
                             (self.legend, "legend"), (self.status, "status")):
            widget.add_class(f"stego-explore-{name}")
        self.source.observe(lambda _: self._on_source(), names="value")
        self.method.observe(lambda _: self._on_method(), names="value")
        for ctl in (self.dim, self.probe, self.crf, self.image):
            ctl.observe(lambda _: self._refresh(), names="value")
        self.upload.observe(self._on_upload, names="value")
        pictures = w.HBox([w.VBox([w.HTML("<b>image</b>"), self.photo]),
                           w.VBox([w.HTML("<b>segmentation</b>"), self.segmentation]),
                           w.VBox([w.HTML("<b>classes</b>"), self.legend])])
        probe_row = w.HBox([w.Label("probe", layout=w.Layout(width="90px")), self.probe, self.crf])
        self.widget = w.VBox([self.source, w.HBox([self.method, self.dim]), probe_row,
                              w.HBox([self.image, self.upload]), pictures, self.info, self.status])
        self.widget.add_class("stego-explore")
        self._on_source()

    # ---- loading ---------------------------------------------------------------------------------------------------
    @property
    def current(self) -> Source:
        return self.sources[self.source.value]

    def _store(self, path: str | None) -> Any:
        if path is None:
            return None
        if path not in self._stores:
            try:
                self._stores[path] = open_store(path)
            except (StegoError, OSError, ValueError):
                self._stores[path] = None  # the run's store was removed: uploads still work
        return self._stores[path]

    def _segmenter(self) -> tuple[Segmenter, dict[str, Any]]:
        src = self.current
        if src.kind == "checkpoint":
            if src.key not in self._segmenters:
                self._segmenters[src.key] = load_segmenter(checkpoint=src.checkpoint, device=self.device)
            return self._segmenters[src.key]
        run_dir = src.models[(self.method.value, self.dim.value)]
        if run_dir not in self._segmenters:
            seg = Segmenter.from_run(run_dir)
            bkey = (seg.info["backbone"], seg.info.get("weights"), src.protocol)
            if bkey not in self._backbones:
                self._backbones[bkey] = load_backbone(bkey[0], bkey[1], protocol=src.protocol, device=self.device)
            seg, description = load_segmenter(seg, backbone=self._backbones[bkey], device=self.device,
                                              protocol=src.protocol)
            store = self._store(src.val_store)
            if store is not None:  # clusters -> classes on the whole validation split, as the book matches them
                self._say("matching clusters to classes on the validation store ...")
                res = evaluate_store(seg, store, batch_size=int(_run_config(run_dir).get("val_batch_size", 8)),
                                     protocol=src.protocol, progress=False)
                seg = seg.match(res["cluster"]["assignment"])
                description = {**description, "val": {p: res[f"{p}/mIoU"] for p in PROBES}}
            self._segmenters[run_dir] = (seg, description)
        return self._segmenters[run_dir]

    # ---- callbacks ---------------------------------------------------------------------------------------------------
    def _say(self, text: str, *, error: bool = False) -> None:
        cls = "stego-explore-error" if error else "stego-explore-ok"
        self.status.value = f'<span class="{cls}">{html.escape(text)}</span>'

    def _on_source(self) -> None:
        src = self.current
        self._quiet = True
        try:
            if src.kind == "runs":
                methods = list(dict.fromkeys(m for m, _ in src.models))
                self.method.options = [(METHOD_LABELS.get(m, m), m) for m in methods]
                self.method.value = "stego" if "stego" in methods else methods[0]
                self.method.disabled = self.dim.disabled = False
            else:
                self.method.options, self.dim.options = [("from the checkpoint", "checkpoint")], []
                self.method.disabled = self.dim.disabled = True
            store = self._store(src.val_store)
            shown = min(self.n_images, len(store)) if store is not None else 0
            options = [(f"validation #{i}", i) for i in range(shown)] + [("your photo (upload)", UPLOAD)]
            self.image.options = options
            self.image.value = UPLOAD if self._upload is not None or not shown else 0
            self._set_dims()
        finally:
            self._quiet = False
        self._refresh()

    def _set_dims(self) -> None:
        src = self.current
        if src.kind != "runs":
            return
        dims = sorted(d for m, d in src.models if m == self.method.value)
        old = self.dim.value
        self.dim.options = [(f"C = {d} (all features)" if self.method.value == "dino" else str(d), d) for d in dims]
        self.dim.value = old if old in dims else dims[len(dims) // 2]

    def _on_method(self) -> None:
        if self._quiet:
            return
        self._quiet = True
        try:
            self._set_dims()
        finally:
            self._quiet = False
        self._refresh()

    def _on_upload(self, change: Any) -> None:
        got = _upload_image(change["new"])
        if got is None:
            return
        try:
            self._upload = _fit(read_upload(got[1]), self.max_side)
        except StegoError as exc:
            self._say(str(exc), error=True)
            return
        if self.image.value == UPLOAD:
            self._refresh()
        else:
            self.image.value = UPLOAD  # refreshes

    def _picture(self) -> np.ndarray | None:
        if self.image.value == UPLOAD or self.image.value is None:
            return self._upload
        store = self._store(self.current.val_store)
        return np.asarray(store.read(np.asarray([int(self.image.value)]))["image"][0])

    def _refresh(self) -> None:
        if self._quiet:
            return
        try:
            image = self._picture()
            if image is None:
                self._say("upload a photo (\"your photo\") to segment it")
                return
            self._say("computing ...")
            seg, description = self._segmenter()
            src = self.current
            res = self.res or (self._store(src.val_store).res if self._store(src.val_store) is not None else 320)
            label, net = label_map(seg, image, res=res, probe=self.probe.value, crf=bool(self.crf.value),
                                   protocol=src.protocol)
            palette, names = id_names(seg, self.probe.value)
            self.photo.value = _png(image)
            self.segmentation.value = _png(overlay(image, label, palette, 0.6))
            self.legend.value = _legend_html(label, palette, names)
            name = (model_label(self.method.value, self.dim.value) if src.kind == "runs"
                    else f"{METHOD_LABELS.get(seg.method, seg.method)} d={seg.code_dim} (checkpoint)")
            val = description.get("val")
            scores = (f" · validation mIoU (no CRF): cluster {val['cluster']:.1f}, linear {val['linear']:.1f}"
                      if val else "")
            self.info.value = (f"<small>{html.escape(name)} · {self.probe.value} probe · CRF "
                               f"{'on' if self.crf.value else 'off'} · backbone input {net[0]}×{net[1]} px"
                               f"{html.escape(scores)} · {html.escape(str(seg.info.get('run_id', '')))}</small>")
            self._say("ready")
        except Exception as exc:  # noqa: BLE001 - shown in the app and the kernel log; the controls keep working
            traceback.print_exc()
            self._say(f"error: {exc}", error=True)


def explore_app(*, root: Any = None, profile: str | None = None, checkpoints: Sequence[str] = (),
                device: Any = None, n_images: int = 8) -> Any:
    """The widget to display in a kernel (``LiveExplorer.widget``), or a Markdown note with the command that makes
    runs when there is nothing to explore. ``profile``: its dataset, backbone, device and checkpoints (see
    ``explore_settings``); ``root``: the artifacts folder (None: the profile's, else ``$STEGO_ARTIFACTS``)."""
    settings = explore_settings(profile)
    root = root if root is not None else settings["root"]
    sources = find_sources(root, dataset=settings["dataset"], backbone=settings["backbone"],
                           checkpoints=[*settings["checkpoints"], *checkpoints])
    if not sources:
        return Markdown(no_runs_message(root, profile))
    return LiveExplorer(sources, device=device or settings["device"], n_images=n_images).widget


def _run_config(run_dir: str) -> dict[str, Any]:
    try:
        return dict(json.loads((Path(run_dir) / "meta.json").read_text()).get("config") or {})
    except (OSError, ValueError):
        return {}


# ---------------------------------------------------------------------------------------------------------------
# serving
_TITLE = "STEGO live explorer"
_TEMPLATES = Path(__file__).resolve().parent / "jupyter"  # a Jupyter data folder holding voila/templates/stego
# The JupyterLab extensions the page loads: the widget managers only (Voilà loads every installed one by default, and
# some need JupyterLab parts Voilà does not have: jupytext's fails on @jupyterlab/docmanager).
_LAB_EXTENSIONS = ("@jupyter-widgets/jupyterlab-manager", "@voila-dashboards/widgets-manager8", "jupyterlab_pygments")


def write_app_notebook(path: str | os.PathLike, *, kernel: str, **kwargs: Any) -> Path:
    """The notebook Voilà renders: a title and one cell ``explore_app(**kwargs)`` (literals only)."""
    args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": kernel, "display_name": "Python 3 (stego-study)", "language": "python"}
    nb.cells = [nbformat.v4.new_markdown_cell(
                    f"# {_TITLE}\n\nPick runs or a checkpoint, a method, a code dimension, the probe and DenseCRF; "
                    "pick a validation image or upload a photo of your own. Every prediction is computed live by "
                    "the study's own segmenter."),
                nbformat.v4.new_code_cell(f"from stego_core.book.explore import explore_app\n\nexplore_app({args})")]
    path = Path(path)
    nbformat.write(nb, str(path))
    return path


def serve(*, profile: str | None = None, port: int = 8866, open_browser: bool = True, root: Any = None,
          checkpoints: Sequence[str] = (), device: Any = None, n_images: int = 8) -> int:
    """Run Voilà on ``127.0.0.1:port`` with the app notebook until interrupted (the kernel is this interpreter's,
    ``runner.ensure_kernel``); the app notebook lives in a temporary folder removed afterwards. Returns 0."""
    check_int("port", port, minimum=1)
    if port > 65535:
        raise StegoError(f"--port: expected a port number up to 65535, got {port}")
    if profile is not None:
        explore_settings(profile)  # a wrong profile name stops here, not in the browser
    for ck in checkpoints:
        if not Path(ck).is_file():
            raise StegoError(f"--checkpoint: file {ck} not found; expected a released STEGO .ckpt file")
    if root is not None:
        os.environ["STEGO_ARTIFACTS"] = str(Path(root).resolve())  # the kernel inherits it
    kernel = ensure_kernel()
    with tempfile.TemporaryDirectory(prefix="stego-explore-") as folder:
        nb = write_app_notebook(Path(folder) / "explore.ipynb", kernel=kernel, profile=profile,
                                checkpoints=[str(Path(c).resolve()) for c in checkpoints], device=device,
                                n_images=int(n_images))
        _launch(nb, port, open_browser)
    return 0


def _launch(nb: Path, port: int, open_browser: bool) -> None:
    # Voilà's lab template without its CDN links (stego_core/book/jupyter/voila/templates/stego): works offline
    os.environ["JUPYTER_PATH"] = os.pathsep.join([str(_TEMPLATES), *filter(None, [os.environ.get("JUPYTER_PATH")])])
    argv = [str(nb), f"--port={int(port)}", "--Voila.ip=127.0.0.1", "--Voila.port_retries=0", "--template=stego",
            *[f"--VoilaConfiguration.extension_allowlist={name}" for name in _LAB_EXTENSIONS],
            f"--Voila.open_browser={bool(open_browser)}", "--VoilaConfiguration.show_tracebacks=True"]
    print(f"stego-study explore: http://127.0.0.1:{port}/ (Ctrl-C stops it)", file=sys.stderr, flush=True)
    Voila.launch_instance(argv=argv)
