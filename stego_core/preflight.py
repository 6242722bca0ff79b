"""``stego-study preflight``: will this profile run, and on what? The check a researcher runs before the GPU-days.

One call answers it as a table of checks, each "ok" or what to do:

- data: the dataset tree is there for every split the profile reads, its image counts match the expected ones
  (COCO-Stuff's curated lists 49,629 / 2,175, Cityscapes 2,975 / 500, Potsdam's lists 4,545 / 855:
  ``stego_core.costs.DATASET_FACTS``), the five-crop tree is prepared where the profile trains on it (or the command
  that prepares it), and a few files of each split decode;
- weights: which file the profile's backbone loads, and that it loads into the architecture and gives features;
- device: present, and its memory; disk: free space under the artifacts folder against the cost model's need
  (``stego_core.costs.dataset_costs``: feature stores, kNN table, five-crop tree);
- run: a tiny end-to-end run of every notebook of the profile, in a temporary artifacts and book folder, on a
  miniature copy of the tree (links to the first few real images of each split, lists cut to them) with the
  profile's ``pilot`` settings (a few steps), so a parameter mismatch between chapters shows in minutes. Where the
  backbone has the released checkpoint layout (DINO v1), the run also writes the STEGO run of chapter 02 as a
  released checkpoint, evaluates Table 2 with it (chapter 04's ``checkpoint``) and segments images with it
  (``stego-study segment --checkpoint``).

``synthetic=True`` runs all of it on a miniature tree written in the dataset's exact layout
(``stego_core.datatrees.write_synthetic_tree``: 12 training and 4 validation images of the real size) with random
backbone weights, on the CPU unless a device is given: the paper path end to end without data, weights or GPU.

The exit status of the command is 0 when every check passed, 1 otherwise.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from . import costs, data
from .backbones import BACKBONES, load_backbone, weights_source
from .book import parameters, runner
from .checkpoints import RELEASED_BACKBONES, save_stego_checkpoint
from .config import StegoError, artifacts_root
from .costs import DATASET_FACTS
from .data import data_root, five_crop_dir
from .datatrees import miniature_copy, write_synthetic_tree
from .fivecrop import FIVE_CROP_DATASETS, prepare_five_crops
from .runs import find_runs
from .segment import main as segment_main
from .training import PRESETS

__all__ = ["Check", "PreflightReport", "expected_counts", "check_data", "check_weights", "check_device",
           "check_disk", "preflight", "format_table", "main"]

PAPER_DATASETS = ("cocostuff27", "cityscapes", "potsdam")
N_DECODE = 3  # files decoded per split (first, middle, last)
MINI_TRAIN, MINI_VAL = 12, 4  # images per split of the miniature tree of the end-to-end run
_PREPARE = "python -c \"from stego_core.fivecrop import prepare_five_crops as p; p('{dataset}', 'train')\""


@dataclass
class Check:
    """One row of the preflight table."""

    area: str  # "data", "weights", "device", "disk" or "run"
    name: str  # what was checked, e.g. "train images" or "02_train_stego"
    ok: bool  # passed
    detail: str  # what was found (one line)
    fix: str = ""  # what to do when it failed ("" when ok)

    @property
    def status(self) -> str:
        return "ok" if self.ok else "FAIL"


@dataclass
class PreflightReport:
    """All checks of one preflight; ``ok`` when every one passed."""

    profile: str
    synthetic: bool
    checks: list[Check]

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# --------------------------------------------------------------------------------------------- data
def expected_counts(dataset: str) -> dict[str, int]:
    """The images per split of a paper dataset (the cost model's facts, with their sources there)."""
    if dataset not in DATASET_FACTS:
        return {}
    facts = DATASET_FACTS[dataset]
    return {"train": facts.train_images, "val": facts.val_images}


def check_data(dataset: str, root: str | os.PathLike | None = None, *, expected: dict[str, int] | None = None,
               crop: str = "center", protocol: str = "original", n_decode: int = N_DECODE) -> list[Check]:
    """Tree, image counts, decodable files per split, and the five-crop tree when ``crop`` is "five"."""
    root = data.data_root(root)
    expected = expected_counts(dataset) if expected is None else expected
    checks: list[Check] = []
    layout = data.EXPECTED_TREES.get(dataset, "").splitlines()
    how = f"lay the dataset out under {root} (STEGO_DATA) as book/reproduce.md shows: " + "; ".join(layout[:2])
    sizes: dict[str, int] = {}
    for split in ("train", "val"):
        try:
            ds = data.load_dataset(dataset, split, root=root, crop="center", protocol=protocol)
        except StegoError as exc:
            checks.append(Check("data", f"{split} split", False, _first_line(exc), how))
            continue
        n = sizes[split] = len(ds)
        checks.append(Check("data", f"{split} split", True, f"{dataset} {split}: {n:,} images under {root}"))
        want = expected.get(split)
        if want is not None:
            ok = n == want
            checks.append(Check("data", f"{split} count", ok, f"{n:,} images, expected {want:,}",
                                "" if ok else f"the {split} list or folder holds {n:,} images instead of {want:,}: "
                                              f"use the complete split with the curated lists (book/reproduce.md)"))
        picks = sorted({0, n // 2, n - 1})[:n_decode] if n else []
        bad = []
        for i in picks:
            try:
                ds.raw(i)
            except Exception as exc:  # noqa: BLE001 - any decoder error means the same: the file is unusable
                bad.append(_first_line(exc))
        checks.append(Check("data", f"{split} files decode", not bad,
                            f"{len(picks) - len(bad)} of {len(picks)} decode" + (f": {bad[0]}" if bad else ""),
                            "" if not bad else "download the file again (or re-extract the archive)"))
    if crop == "five" and dataset in FIVE_CROP_DATASETS:
        checks.append(_check_five_crop(dataset, root, protocol, sizes.get("train")))
    return checks


def _check_five_crop(dataset: str, root: Path, protocol: str, n_source: int | None) -> Check:

    folder = five_crop_dir(dataset, root=root, protocol=protocol)
    marker = folder / "done-train.json"
    prepare = _PREPARE.format(dataset=dataset)
    if not marker.exists():
        return Check("data", "five-crop tree", False, f"not prepared ({marker} is missing)",
                     f"prepare it once (about 1 GB per 10,000 images): {prepare}")
    meta = json.loads(marker.read_text())
    if n_source is not None and int(meta.get("n_source", -1)) != n_source:
        return Check("data", "five-crop tree", False,
                     f"prepared from {meta.get('n_source')} images but the train split has {n_source}",
                     f"delete {folder} and prepare it again: {prepare}")
    return Check("data", "five-crop tree", True, f"prepared: {meta.get('n_crops')} crops in {folder}")


# --------------------------------------------------------------------------------------------- weights, device, disk
def check_weights(backbone: str, weights: str | os.PathLike | None, *, protocol: str = "original") -> Check:
    """Which weights the backbone loads, and that they load into its architecture and give [1, C, h, w] features."""

    try:
        source = weights_source(backbone, weights)
        net = load_backbone(backbone, weights, device="cpu", protocol=protocol)
        side = 2 * BACKBONES[backbone].stride
        with torch.no_grad():
            feats = net(torch.zeros(1, 3, side, side))
    except StegoError as exc:
        fix = ("pass the weights file of this architecture as the profile's weights "
               "(book/reproduce.md lists the file of each backbone)")
        return Check("weights", backbone, False, _first_line(exc), fix)
    want = BACKBONES[backbone].dim
    ok = feats.ndim == 4 and feats.shape[1] == want
    return Check("weights", backbone, ok, f"loads {source} into {backbone} ({want} channels, stride "
                 f"{BACKBONES[backbone].stride})", "" if ok else f"features have shape {tuple(feats.shape)}")


def check_device(device: str) -> Check:
    """The profile's device is there (CUDA: its name and memory)."""
    name = str(device)
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            return Check("device", name, False, "CUDA is not available on this machine",
                         "run on a machine with an NVIDIA GPU, or set device: cpu (days at paper scale)")
        dev = torch.device(name)
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            return Check("device", name, False, f"only {torch.cuda.device_count()} CUDA device(s)",
                         "pick an existing device, e.g. device: cuda:0")
        props = torch.cuda.get_device_properties(index)
        free, total = torch.cuda.mem_get_info(index)
        return Check("device", name, True, f"{props.name}, {total / 2**30:.0f} GiB ({free / 2**30:.0f} GiB free)")
    if name == "cpu":
        return Check("device", "cpu", True, f"CPU, {os.cpu_count()} cores (paper scale takes days here)")
    return Check("device", name, False, f"unknown device {name!r}", "set device: cuda or cpu")


def _existing_parent(path: Path) -> Path:
    path = path.resolve()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_disk(dataset: str, backbone: str, *, artifacts: str | os.PathLike | None = None,
               data: str | os.PathLike | None = None, five_crop: bool = False,
               free: Callable[[Path], int] | None = None) -> Check:
    """Free space under the artifacts folder against the cost model's feature stores + kNN table (+ the five-crop
    tree under the data root when it still has to be written)."""
    free = free or (lambda p: shutil.disk_usage(p).free)
    if dataset not in costs.DATASET_FACTS or backbone not in costs.BACKBONE_SHAPES:
        return Check("disk", "free space", True, f"no cost model for {dataset} on {backbone}; not checked")
    need = costs.dataset_costs(dataset, backbone=backbone)
    art = _existing_parent(artifacts_root(artifacts))
    want = need["feature_store_bytes"] + need["knn_bytes"]
    parts = [f"feature stores and kNN {costs.format_bytes(want)} under {art}"]
    have = free(art)
    ok = have >= want
    if five_crop:
        dat = _existing_parent(data_root(data))
        crops = need["five_crop_bytes"]
        parts.append(f"five-crop tree {costs.format_bytes(crops)} under {dat}")
        if dat.stat().st_dev == art.stat().st_dev:
            want += crops
            ok = have >= want
        else:
            ok = ok and free(dat) >= crops
    detail = "need " + " + ".join(parts) + f"; {costs.format_bytes(have)} free"
    return Check("disk", "free space", ok, detail,
                 "" if ok else "free space or point STEGO_ARTIFACTS (and STEGO_DATA) at a bigger disk")


# --------------------------------------------------------------------------------------------- the end-to-end run
@contextlib.contextmanager
def _environ(**values: str) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _profile_settings(runs: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """dataset, backbone, weights, device, protocol, crop, res of a profile (its feature chapter's values)."""
    values = dict(runs)
    feats = values.get("01_features") or next((p for _, p in runs if "backbone" in p), {})
    return {"dataset": feats.get("dataset"), "backbone": feats.get("backbone"), "weights": feats.get("weights"),
            "device": feats.get("device", "cpu"), "protocol": feats.get("protocol", "original"),
            "crop": feats.get("crop", "center"), "res": feats.get("res", 224),
            "preset": (values.get("02_train_stego") or {}).get("preset", "demo")}


# The tiny run's settings, given to every notebook that has a parameter of the name: a few steps, one code dimension,
# two examples. The same run values (PILOT_RUN) go into the `overrides` of the chapters that look runs up, so they
# find chapter 02's and 03's runs. (Issue 12 §4.6 plans one profile-level pilot block; this is preflight's own
# until it exists, and should then be read from there.)
PILOT = dict(n_examples=2, n_stats=4, batch_size=4, k=30, n_queries=2, n_neighbors_shown=2, n_pca=2, steps=4,
             val_freq=2, n_neighbors=4, dims=[6], n_fit_images=8, hnne_tokens=2000, crf_images=2, workers=1,
             n_images=2, batch_sizes=[1, 4, 0])
PILOT_RUN = dict(steps=4, batch_size=4, val_freq=2, n_neighbors=4)


def _pilot_runs(profile: str, **shared: Any) -> list[tuple[str, dict[str, Any]]]:
    """The profile's notebooks with the pilot settings, then ``shared`` given to every notebook that has them."""
    out = []
    for nb, params in parameters.load_profile(profile):
        names = {p.name for p in parameters.read_parameters(nb)}
        pilot = {k: v for k, v in PILOT.items() if k in names}
        if "overrides" in names:
            pilot["overrides"] = {**params.get("overrides", {}), **PILOT_RUN}
        out.append((nb, {**params, **pilot, **{k: v for k, v in shared.items() if k in names}}))
    return out


def _timed(area: str, name: str, fn: Callable[[], Any], checks: list[Check], fix: str) -> Any:
    t0 = time.perf_counter()
    try:
        out = fn()
    except Exception as exc:  # noqa: BLE001 - every failure of a stage is a failed check, named in the table
        detail = _first_line(exc) if isinstance(exc, StegoError) else \
            f"{type(exc).__name__}: {_first_line(exc)} ({traceback.extract_tb(exc.__traceback__)[-1].name})"
        checks.append(Check(area, name, False, detail, fix))
        return None
    checks.append(Check(area, name, True, f"ran in {time.perf_counter() - t0:.0f} s"))
    return out


def _end_to_end(profile: str, settings: dict[str, Any], data_root: Path, work: Path, *, weights: Any,
                device: str, log: Callable[[str], None]) -> list[Check]:
    """Five-crop preparation, every notebook of the profile with its pilot settings, and (DINO v1) Table 2 and
    ``segment`` with the STEGO run written as a released checkpoint; all inside ``work``."""
    checks: list[Check] = []
    artifacts, book = work / "artifacts", work / "book"
    dataset, backbone = settings["dataset"], settings["backbone"]
    with _environ(STEGO_DATA=str(data_root), STEGO_ARTIFACTS=str(artifacts)):
        if settings["crop"] == "five":
            _timed("run", "five-crop preparation",
                   lambda: prepare_five_crops(dataset, "train", root=data_root, protocol=settings["protocol"],
                                              progress=False), checks, f"see {_PREPARE.format(dataset=dataset)}")
        quiet = lambda msg: log(f"  {msg}")  # noqa: E731
        runs = _pilot_runs(profile, weights=weights, device=device, progress=False)
        for nb, params in runs:
            log(f"run {nb}")
            done = _timed("run", nb, lambda nb=nb, params=params: runner.run_notebook(
                nb, params, workdir=book, force=True, log=quiet), checks,
                f"the notebook with its traceback is {book / runner.CHAPTERS / f'.{nb}.failed.ipynb'}")
            if done is None:
                return checks  # later chapters need this one's artifacts
        if backbone not in RELEASED_BACKBONES:
            checks.append(Check("run", "released checkpoint", True,
                                f"not applicable: the released layout holds DINO v1 ViTs, not {backbone}"))
            return checks
        found = find_runs(artifacts, method="stego", dataset=dataset, protocol=settings["protocol"],
                          code_dim=PRESETS[settings["preset"]]["code_dim"])  # chapter 02's run, as 04 asks for it
        found = found[[float(w) > 0 for w in found["correspondence_weight"]]] if len(found) else found
        if not len(found):
            checks.append(Check("run", "released checkpoint", False, "no STEGO run in the artifacts of the run",
                                "chapter 02 should have trained one: see its executed notebook"))
            return checks
        ckpt = work / "checkpoints" / f"{dataset}_preflight.ckpt"
        if _timed("run", "released checkpoint", lambda: save_stego_checkpoint(
                found.iloc[0]["run_dir"], ckpt, weights=weights), checks, "see the traceback above") is None:
            return checks
        params04 = dict(next((p for nb, p in runs if nb == "04_evaluate"), {}), checkpoint=str(ckpt))
        log("run 04_evaluate with the released checkpoint")
        _timed("run", "Table 2 from the checkpoint", lambda: runner.run_notebook(
            "04_evaluate", params04, workdir=work / "book-checkpoint", force=True, log=quiet), checks,
            f"the notebook is {work / 'book-checkpoint' / runner.CHAPTERS / '.04_evaluate.failed.ipynb'}")
        images = _segment_inputs(dataset, data_root, work / "photos")
        log("stego-study segment --checkpoint")
        code = _timed("run", "segment --checkpoint", lambda: segment_main(
            ["--checkpoint", str(ckpt), *map(str, images), "--out", str(work / "segmented"), "--device", device,
             "--res", str(settings["res"]), "--quiet"]), checks, "see the error above")
        if code not in (None, 0):
            checks[-1] = Check("run", "segment --checkpoint", False, f"exit status {code}", "see the error above")
    return checks


def _segment_inputs(dataset: str, data_root: Path, dest: Path) -> list[Path]:
    """Two validation images as image files (``segment`` reads photos; Potsdam's tiles are .mat arrays)."""

    ds = data.load_dataset(dataset, "val", root=data_root)
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(min(2, len(ds))):
        image, _ = ds.raw(i)
        out.append(dest / f"val_{i}.png")
        Image.fromarray(image).save(out[-1])
    return out


# --------------------------------------------------------------------------------------------- the whole preflight
def preflight(profile: str, *, synthetic: bool = False, data_root: str | os.PathLike | None = None,
              weights: str | os.PathLike | None = None, device: str | None = None,
              expected: dict[str, int] | None = None, run: bool = True, workdir: str | os.PathLike | None = None,
              log: Callable[[str], None] | None = None) -> PreflightReport:
    """Check ``profile`` (a name of ``notebooks/profiles``) and return the table of checks.

    synthetic: write a miniature tree in the dataset's layout and use random backbone weights (device: cpu unless
    ``device`` says otherwise). data_root: the datasets' root (default ``$STEGO_DATA``); weights / device: instead of
    the profile's; expected: images per split instead of the paper's counts (the synthetic tree's own counts when
    synthetic); run: also the tiny end-to-end run; workdir: keep its artifacts and chapters there (default: a
    temporary folder, removed afterwards).
    """
    log = log or (lambda msg: print(f"[preflight] {msg}", file=sys.stderr, flush=True))
    settings = _profile_settings(parameters.load_profile(profile))
    dataset, backbone = settings["dataset"], settings["backbone"]
    if dataset not in PAPER_DATASETS:
        raise StegoError(f"--profile: {profile} runs on {dataset!r}; preflight checks the paper datasets' profiles "
                         f"({', '.join(PAPER_DATASETS)} and their DINOv2 / DINOv3 variants)")
    if synthetic:
        weights = "random" if weights is None else weights
        device = device or "cpu"
    else:
        weights = settings["weights"] if weights is None else weights
        device = device or settings["device"]
    checks: list[Check] = []
    with contextlib.ExitStack() as stack:
        work = Path(workdir) if workdir is not None else \
            Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="stego-preflight-")))
        work.mkdir(parents=True, exist_ok=True)
        if synthetic:
            data_root = work / "data"
            log(f"writing a synthetic {dataset} tree to {data_root}")
            expected = write_synthetic_tree(dataset, data_root) if expected is None else expected
        checks += check_data(dataset, data_root, expected=expected, crop="center",
                             protocol=settings["protocol"])
        if settings["crop"] == "five" and not synthetic:  # the synthetic run prepares its own
            checks.append(_check_five_crop(dataset, data.data_root(data_root), settings["protocol"],
                                           (expected or {}).get("train")))
        log(f"loading {backbone} ({weights or 'default weights'})")
        checks.append(check_weights(backbone, weights, protocol=settings["protocol"]))
        checks.append(check_device(device))
        if not synthetic:
            checks.append(check_disk(dataset, backbone, data=data_root, five_crop=settings["crop"] == "five"))
        if run:
            if any(not c.ok for c in checks if c.area in ("data", "weights", "device") and c.name != "five-crop tree"):
                checks.append(Check("run", "end-to-end run", False, "not started: a check above failed",
                                    "fix the checks above, then run preflight again"))
            else:
                mini = data_root if synthetic else \
                    miniature_copy(dataset, _data_root(data_root), work / "mini-data", n_train=MINI_TRAIN,
                                   n_val=MINI_VAL)
                checks += _end_to_end(profile, settings, Path(mini), work, weights=weights, device=device, log=log)
    return PreflightReport(profile, synthetic, checks)


def _data_root(root: Any) -> Path:
    return data_root(root)


def format_table(report: PreflightReport) -> str:
    """The checks as a plain-text table: area, check, status, what was found / what to do."""
    rows = [("area", "check", "status", "found / what to do")]
    for c in report.checks:
        rows.append((c.area, c.name, c.status, c.detail + (f" -> {c.fix}" if c.fix else "")))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  ".join(r[i].ljust(widths[i]) for i in range(3)) + "  " + r[3] for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths) + "  " + "-" * 18)
    verdict = "all checks passed" if report.ok else f"{len(report.failed)} check(s) failed"
    what = " (synthetic tree, random weights)" if report.synthetic else ""
    return "\n".join([f"preflight of profile {report.profile}{what}: {verdict}", *lines])


def add_arguments(ap: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of ``stego-study preflight``."""
    ap.add_argument("--profile", required=True, help="notebooks/profiles/NAME.yaml, e.g. cocostuff27")
    ap.add_argument("--synthetic", action="store_true",
                    help="run on a miniature tree in the dataset's layout with random backbone weights (no data, "
                         "weights or GPU needed)")
    ap.add_argument("--data-root", help="the datasets' root (default: $STEGO_DATA, else ./data)")
    ap.add_argument("--weights", help="backbone weights file instead of the profile's")
    ap.add_argument("--device", help="device instead of the profile's (synthetic: cpu)")
    ap.add_argument("--no-run", action="store_true", help="only the static checks, no end-to-end run")
    ap.add_argument("--workdir", help="keep the end-to-end run's artifacts and chapters in this folder")
    return ap


def run_cli(args: argparse.Namespace) -> int:
    """``stego-study preflight``: print the table; 0 when every check passed, 1 otherwise."""
    report = preflight(args.profile, synthetic=args.synthetic, data_root=args.data_root, weights=args.weights,
                       device=args.device, run=not args.no_run, workdir=args.workdir)
    print(format_table(report))
    return 0 if report.ok else 1


def main(argv: list[str] | None = None) -> int:
    """``python -m stego_core.preflight`` (the same as ``stego-study preflight``)."""
    ap = add_arguments(argparse.ArgumentParser(prog="stego-study preflight", description=__doc__.splitlines()[0]))
    args = ap.parse_args(argv)
    try:
        return run_cli(args)
    except StegoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
