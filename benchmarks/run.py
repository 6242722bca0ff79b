"""Benchmark suite: how fast the study's stages run here, against the original code's way of doing the same work.

Prints one table (benchmark, config, value, unit, ratio to the original-style path measured in the same run) and a
small storage table, and writes both with the machine's description to ``benchmarks/out/benchmark.json`` (``--out``
changes the path). Not a test: nothing is asserted; numbers depend on the machine and on what else runs on it.

What is measured (each "original" row is what the reference implementation does; "ours" is what this project does):
- backbone: images/s of the frozen backbone on images already on the device (no data loading), per backbone x
  resolution x precision. Original: fp32 with unfused attention (timm ``Attention.fused_attn = False``, as DINO's own
  ViT computes softmax(q k^T) v explicitly). Ours: bf16 autocast + fused SDPA attention
  (``extract_features(amp=True)``).
  An extra fp32 + fused row separates the two effects. EfficientNet-Lite0 (bundled real weights) has no attention.
  DINO ViTs use random weights (no hub here); speed does not depend on the weights.
- bf16 error: |bf16 - fp32| relative to the fp32 features (max over elements / max |fp32|, mean / mean |fp32|) and the
  smallest per-token cosine similarity, on photos from scikit-image.
- train step: one STEGO step (head on the features of the batch and of its kNN partners, correspondence loss,
  cluster and linear probes, backward, three Adam steps) with features read from a float16 feature store ("cached",
  ours) against two fp32 backbone passes per step on the stored images ("live fp32", the original's way: it never
  cached) and the same in bf16 + SDPA ("live bf16"). The live paths read the stored uint8 images (no JPEG decoding,
  which would only add to the original's cost).
- sweep: seconds per run and per run-step of a group of runs trained independently (``training.train`` run by
  run, the original's one job per run) and fused (``training.train_group``: one pass over the batches), same group,
  same store, side by side; on the demo store and on a synthetic ViT-B/8-shaped store (benchmarks/README.md).
- CRF: DenseCRF images/s at 320x320 with 27 classes, by worker count, with a warm ``CRFPool``; plus ``crf_batch``
  including the pool start-up, as a one-off evaluation call pays it.
- feature store: images/s and MB/s of shuffled ``iter_batches`` over a store on local disk (page cache warm: the
  store was just written; a cold disk is slower), bytes per image, and extrapolated cache sizes of the real datasets.
- demo stages: the wall time of each executed chapter, read from ``book/chapters/*.ipynb`` metadata when the demo
  study has been run (``make book``); otherwise the row says it was skipped (running it here would take minutes).

``--quick`` (default without CUDA) keeps the whole run to a few minutes on 2 CPU cores; ``--full`` (default with CUDA)
uses the real batch sizes and ViT-B/8. Run: ``python benchmarks/run.py [--full] [--only backbone,train,...]``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from stego_core.config import write_json_atomic

SECTIONS = ("backbone", "train", "sweep", "crf", "store", "demo")
HERE = Path(__file__).resolve().parent

# Sizes of the real training caches (spec §6, §9.1). Five-crop sets: every crop is an item.
# Potsdam's image count is not in the spec: 4,545 is the size of IIC's labelled_train list (Potsdam-3), assumed.
REAL_CACHES = (
    # (dataset / split, items, backbone, dim C, stride, res, note)
    ("cocostuff27 train five-crop", 49_600 * 5, "dino_vitb8", 768, 8, 224, "~49.6k images x 5 crops (PiCIE count)"),
    ("cocostuff27 val", 2_175, "dino_vitb8", 768, 8, 320, "val_res 320, uncropped"),
    ("cityscapes train five-crop", 2_975 * 5, "dino_vitb8", 768, 8, 224, "2,975 images x 5 crops"),
    ("cityscapes val", 500, "dino_vitb8", 768, 8, 320, "val_res 320"),
    ("potsdam train", 4_545, "dino_vits8", 384, 8, 224, "count assumed (IIC labelled_train), uncropped"),
    ("potsdam val", 855, "dino_vits8", 384, 8, 320, "count assumed (IIC labelled_test)"),
)


# ----------------------------------------------------------------------------------------------------------------
# timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], Any], device: torch.device, *, min_time: float, min_iters: int = 2,
              warmup: int = 1) -> float:
    """Median seconds per call of ``fn``: ``warmup`` untimed calls, then calls until both ``min_iters`` calls and
    ``min_time`` seconds are done; the device is synchronised around every timed call."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_iters or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


class Table:
    """Rows of the result table; ``ratio`` is the speed-up over the original-style row of the same group
    (rate / original rate, or original time / time): above 1 = faster than the original way."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def add(self, benchmark: str, config: str, value: float | None, unit: str, *, ratio: float | None = None,
            note: str = "") -> None:
        self.rows.append({"benchmark": benchmark, "config": config, "value": value, "unit": unit,
                          "ratio": ratio, "note": note})
        print(f"  {benchmark:<14} {config:<44} {_fmt(value):>10} {unit}", file=sys.stderr, flush=True)

    def render(self) -> str:
        head = ("benchmark", "config", "value", "unit", "vs original")
        body = [(r["benchmark"], r["config"] + (f"  [{r['note']}]" if r["note"] else ""), _fmt(r["value"]),
                 r["unit"], "" if r["ratio"] is None else f"{r['ratio']:.2f}x") for r in self.rows]
        widths = [max(len(head[i]), *(len(b[i]) for b in body)) if body else len(head[i]) for i in range(5)]
        line = "  ".join("-" * w for w in widths)
        fmt = lambda cells: "  ".join(  # noqa: E731 - local formatter
            (c.rjust(w) if i in (2, 4) else c.ljust(w)) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
        return "\n".join([fmt(head), line, *(fmt(b) for b in body)])


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if value == 0 or 1e-3 <= abs(value) < 1e5:
        return f"{value:.4g}"
    return f"{value:.3e}"


# ----------------------------------------------------------------------------------------------------------------
# inputs


def photo_batch(n: int, res: int) -> torch.Tensor:
    """``n`` ImageNet-normalised photos [n,3,res,res] from scikit-image's bundled images (flipped/rolled variants)."""
    from skimage import data as skdata

    from stego_core.data import normalize

    sources = [skdata.astronaut(), skdata.chelsea(), skdata.coffee(), skdata.rocket()]
    base = []
    for arr in sources:
        t = torch.from_numpy(np.ascontiguousarray(arr[..., :3])).permute(2, 0, 1).float() / 255  # [H,W,3]->[3,H,W]
        base.append(F.interpolate(t[None], size=(res, res), mode="bilinear", align_corners=False)[0])
    out = []
    for i in range(n):
        img = base[i % len(base)]
        if (i // len(base)) % 2:
            img = torch.flip(img, dims=[2])
        out.append(torch.roll(img, shifts=(i // 8) * 7, dims=2))
    return normalize(torch.stack(out).clamp(0, 1))


class PhotoSet(torch.utils.data.Dataset):
    """A small labelled dataset for building feature stores: photos + blocky random labels with ``n_classes``."""

    def __init__(self, n: int, res: int, n_classes: int = 27, name: str = "benchphotos"):
        self.name, self.split, self.res, self.n_classes = name, "train", res, n_classes
        self.class_names = [f"c{k}" for k in range(n_classes)]
        self._img = photo_batch(n, res)

    def __len__(self) -> int:
        return len(self._img)

    def __getitem__(self, i: int) -> dict[str, Any]:
        g = torch.Generator().manual_seed(i)
        blocks = torch.randint(0, self.n_classes, (1, 1, max(1, self.res // 32), max(1, self.res // 32)), generator=g)
        label = F.interpolate(blocks.float(), size=(self.res, self.res), mode="nearest")[0, 0].long()
        return {"img": self._img[i], "label": label, "index": i}


class PatchProjection(nn.Module):
    """A cheap stand-in backbone with a ViT's feature geometry (one random strided conv), for store I/O only."""

    def __init__(self, dim: int, stride: int, name: str):
        super().__init__()
        self.name, self.dim, self.stride = name, dim, stride
        self.proj = nn.Conv2d(3, dim, stride, stride)
        nn.init.normal_(self.proj.weight, std=0.02)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return self.proj(img)  # [B,3,H,W] -> [B,C,H/s,W/s]


# ----------------------------------------------------------------------------------------------------------------
# sections


def _load(name: str, device: torch.device):
    from stego_core.backbones import load_backbone

    weights = None if name == "efficientnet_lite0" else "random"
    return load_backbone(name, weights, device=device)


def _modes(backbone) -> list[tuple[str, dict]]:
    """(label, how) pairs; the first is the original style."""
    if hasattr(backbone, "fused_attention"):
        return [("fp32 unfused (original)", dict(amp=False, fused=False)),
                ("fp32 fused SDPA", dict(amp=False, fused=True)),
                ("bf16 + fused SDPA (ours)", dict(amp=True, fused=True))]
    return [("fp32 (original)", dict(amp=False, fused=None)), ("bf16 autocast (ours)", dict(amp=True, fused=None))]


def _features(backbone, img: torch.Tensor, *, amp: bool, fused: bool | None) -> torch.Tensor:
    from stego_core.backbones import extract_features

    if fused is None or amp or not hasattr(backbone, "fused_attention"):  # amp=True switches fused attention on
        return extract_features(backbone, img, amp=amp)
    with backbone.fused_attention(fused):
        return extract_features(backbone, img, amp=False)


def bench_backbones(table: Table, plan: dict, device: torch.device) -> None:
    for name, resolutions, batch in plan["backbones"]:
        try:
            backbone = _load(name, device)
        except Exception as exc:  # noqa: BLE001 - report and go on with the other rows
            table.add("backbone", f"{name}", None, "images/s", note=f"skipped: {type(exc).__name__}: {exc}")
            continue
        weights = "real weights" if name == "efficientnet_lite0" else "random weights"
        for res in resolutions:
            img = photo_batch(batch, res).to(device)
            base_rate, ref = None, None
            for label, how in _modes(backbone):
                feats = _features(backbone, img, **how)  # also the warm-up call of this mode
                sec = time_call(lambda b=backbone, x=img, h=how: _features(b, x, **h), device,
                                min_time=plan["min_time"], warmup=0)
                rate = batch / sec
                base_rate = base_rate or rate
                table.add("backbone", f"{name} {res}px b{batch} {label}", rate, "images/s", ratio=rate / base_rate,
                          note=weights if label.endswith("(original)") else "")
                if ref is None:
                    ref = feats.float()
                elif how["amp"]:
                    err = (feats.float() - ref).abs()
                    table.add("bf16 error", f"{name} {res}px max|d|/max|fp32|",
                              float(err.max() / ref.abs().max()), "rel")
                    table.add("bf16 error", f"{name} {res}px mean|d|/mean|fp32|",
                              float(err.mean() / ref.abs().mean()), "rel")
                    cos = F.cosine_similarity(feats.float(), ref, dim=1)  # [B,h,w] per token
                    table.add("bf16 error", f"{name} {res}px min token cosine", float(cos.min()), "cos")
        del backbone
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _stego_step_fn(in_dim: int, n_classes: int, device: torch.device, batch: int):
    """One STEGO training step: ``stego_core.train_state.train_step`` on given features and labels."""
    from stego_core.train_state import build_state, train_step
    from stego_core.training import make_config

    cfg = make_config("cocostuff27", batch_size=batch)
    state = build_state(cfg, in_dim, n_classes, device=device).train()

    def step(feats: torch.Tensor, feats_pos: torch.Tensor, label: torch.Tensor) -> None:
        train_step(state, feats, label, feats_pos=feats_pos)

    return step


def bench_train_step(table: Table, plan: dict, device: torch.device, workdir: Path) -> None:
    from stego_core.cache import cache_features
    from stego_core.data import normalize
    from stego_core.knn import nearest_neighbors

    name, res, batch, n_items = plan["train"]
    try:
        backbone = _load(name, device)
    except Exception as exc:  # noqa: BLE001
        table.add("train step", name, None, "ms/step", note=f"skipped: {type(exc).__name__}: {exc}")
        return
    t0 = time.perf_counter()
    store = cache_features(PhotoSet(n_items, res), None, backbone, root=workdir / "train-store", device=device,
                           amp=True, batch_size=min(batch, 32), progress=False)
    build_s = time.perf_counter() - t0
    k = min(10, len(store))
    knn = nearest_neighbors(store.feats_all(), k=k)  # [N,k]
    step = _stego_step_fn(store.dim, store.n_classes, device, batch)
    gen = torch.Generator().manual_seed(0)

    def batch_indices() -> tuple[np.ndarray, np.ndarray]:
        idx = torch.randperm(len(store), generator=gen)[:batch]
        ranks = torch.randint(1, k, (len(idx),), generator=gen)
        return idx.numpy(), knn[idx, ranks].numpy()  # [b], [b] one kNN partner each

    def cached() -> None:
        idx, partner = batch_indices()
        rec, rec_pos = store.read(idx), store.read(partner)
        step(rec["feats"].to(device), rec_pos["feats"].to(device), rec["label"].to(device))

    def live(amp: bool) -> Callable[[], None]:
        def run() -> None:
            idx, partner = batch_indices()
            rec, rec_pos = store.read(idx), store.read(partner)
            imgs = [normalize(torch.from_numpy(r["image"]).to(device).permute(0, 3, 1, 2).float() / 255)
                    for r in (rec, rec_pos)]  # [b,H,W,3] uint8 -> [b,3,H,W]
            feats = [_features(backbone, im, amp=amp, fused=True if amp else False) for im in imgs]
            step(feats[0], feats[1], rec["label"].to(device))
        return run

    cfg = f"{name} {res}px b{batch}"
    live_iters = plan["live_iters"]  # live steps take seconds on a CPU: few of them
    sec_live = time_call(live(False), device, min_time=plan["min_time"], min_iters=live_iters)
    table.add("train step", f"{cfg} live fp32 x2 passes (original)", sec_live * 1e3, "ms/step", ratio=1.0)
    sec = time_call(live(True), device, min_time=plan["min_time"], min_iters=live_iters)
    table.add("train step", f"{cfg} live bf16+SDPA x2 passes", sec * 1e3, "ms/step", ratio=sec_live / sec)
    sec = time_call(cached, device, min_time=plan["min_time"], min_iters=5)
    table.add("train step", f"{cfg} cached fp16 store (ours)", sec * 1e3, "ms/step", ratio=sec_live / sec,
              note=f"store of {len(store)} built in {build_s:.1f} s")


def _timed_steps(times: list) -> Callable[[int, Any], None]:
    """A training callback that records (step, CPU time) so that per-step seconds leave out setup and validation."""
    def record(step: int, logs: Any) -> None:
        times.append((step, time.process_time()))
    return record


def _median_step(times: list[tuple[int, float]], skip: set[int]) -> float:
    """Median seconds of the steps after the first whose step did not validate (steps in ``skip``)."""
    gaps = [t1 - t0 for (s0, t0), (s1, t1) in zip(times, times[1:]) if s1 == s0 + 1 and s1 not in skip]
    return statistics.median(gaps) if gaps else float("nan")


def _sweep_pair(table: Table, label: str, cfgs: list, stores: tuple, workdir: Path, device: torch.device) -> None:
    """One group trained run by run (``train``, today's independent runs) and fused (``train_group``), side by side
    on the same stores: seconds per run (wall, incl. setup and validation) and per run-step (median step)."""
    from stego_core.train_loop import validation_steps
    from stego_core.training import train, train_group

    cfg = cfgs[0]
    skip = set(validation_steps(cfg.steps, cfg.val_freq, len(stores[0]), cfg.batch_size, cfg.protocol))
    kw = dict(train_store=stores[0], val_store=stores[1], progress=False, device=device)
    t0 = time.process_time()
    per_run_step = []
    for c in cfgs:
        times: list = []
        train(c, root=workdir / f"indep-{label}", callback=_timed_steps(times), **kw)
        per_run_step.append(_median_step(times, skip))
    indep_s = (time.process_time() - t0) / len(cfgs)
    indep_step = sum(per_run_step) / len(cfgs)
    times = []
    t0 = time.process_time()
    train_group(cfgs, root=workdir / f"fused-{label}", callback=_timed_steps(times), **kw)
    fused_s = (time.process_time() - t0) / len(cfgs)
    fused_step = _median_step(times, skip) / len(cfgs)
    conf = f"{label}: {len(cfgs)} runs x {cfg.steps} steps, batch {cfg.batch_size}"
    table.add("sweep", f"{conf} independent", indep_s, "CPU s/run", ratio=1.0,
              note=f"{indep_step * 1e3:.1f} ms per run-step")
    table.add("sweep", f"{conf} fused", fused_s, "CPU s/run", ratio=indep_s / fused_s,
              note=f"{fused_step * 1e3:.1f} ms per run-step, {indep_step / fused_step:.2f}x per step")


def _demo_stores(workdir: Path, device: torch.device) -> tuple:
    from stego_core.cache import cache_features
    from stego_core.knn import build_knn

    stores = tuple(cache_features("mosaic", split, "efficientnet_lite0", res=224, crop="center", root=workdir,
                                  device=device, progress=False) for split in ("train", "val"))
    build_knn(stores[0], 30, protocol="original", progress=False)
    return stores


def _paper_stores(plan: dict, workdir: Path, device: torch.device) -> tuple:
    """A synthetic store of the paper's shape: ViT-B/8 geometry (768 channels, 28 x 28 tokens at 224 px)."""
    from stego_core.cache import cache_features
    from stego_core.knn import build_knn

    n_train, n_val = plan["sweep_paper_items"]
    bb = PatchProjection(768, 8, "vitb8shape")
    stores = tuple(cache_features(PhotoSet(n, 224), None, bb, root=workdir / f"paper-{split}", device=device,
                                  progress=False) for split, n in (("train", n_train), ("val", n_val)))
    for protocol in ("original", "corrected"):
        build_knn(stores[0], 10, protocol=protocol, progress=False)
    return stores


def bench_sweep(table: Table, plan: dict, device: torch.device, workdir: Path) -> None:
    """Independent vs fused training of the same group on the same store (stego_core.fused), side by side, in CPU
    seconds of one torch thread (process time: on a shared machine the wall time mostly measures the neighbours)."""
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        _bench_sweep(table, plan, device, workdir, Path(plan.get("store_root") or workdir))
    finally:
        torch.set_num_threads(threads)


def _bench_sweep(table: Table, plan: dict, device: torch.device, workdir: Path, stores_at: Path) -> None:
    from stego_core.training import make_config

    groups = []
    try:
        if "demo" not in plan["sweep_stores"]:
            raise LookupError("not asked for (--sweep-stores)")
        demo = _demo_stores(stores_at / "demo", device)
        base = dict(steps=plan["sweep_demo_steps"])
        dims = (112, 96, 48, 24, 12, 6, 3)
        groups.append(("demo STEGO", [make_config("demo", code_dim=d, **base) for d in dims], demo))
        probes = [make_config("demo", method="dino", **base)]
        probes += [make_config("demo", method=m, code_dim=d, **base) for m in ("pca", "rp") for d in dims]
        groups.append(("demo probe-only", probes, demo))
    except Exception as exc:  # noqa: BLE001
        table.add("sweep", "demo", None, "s/run", note=f"skipped: {type(exc).__name__}: {exc}")
    if "paper" not in plan["sweep_stores"]:
        for label, cfgs, stores in groups:
            if any(word in label for word in plan["sweep_groups"]):
                _prefit_and_pair(table, label, cfgs, stores, workdir, device)
        return
    paper = _paper_stores(plan, stores_at / "paper", device)
    steps = plan["sweep_paper_steps"]
    base = dict(dataset="benchphotos", backbone="vitb8shape", steps=steps, val_freq=steps, protocol="corrected",
                n_fit_images=len(paper[0]), batch_size=32)
    dims = (768, 384, 192, 100, 96, 90, 48, 24, 12, 6, 3)
    probes = [make_config("cocostuff27", method="dino", **base)]
    probes += [make_config("cocostuff27", method=m, code_dim=d, **base) for m in ("pca", "rp") for d in dims]
    groups.append(("ViT-B/8-shaped probe-only", probes, paper))
    stego_steps = plan["sweep_paper_stego_steps"]
    groups.append(("ViT-B/8-shaped STEGO", [make_config("cocostuff27", code_dim=d, **{
        **base, "steps": stego_steps, "val_freq": stego_steps}) for d in plan.get("sweep_paper_stego_dims", dims)],
        paper))
    for label, cfgs, stores in groups:
        if any(word in label for word in plan["sweep_groups"]):
            _prefit_and_pair(table, label, cfgs, stores, workdir, device)


def _prefit_and_pair(table: Table, label: str, cfgs: list, stores: tuple, workdir: Path,
                     device: torch.device) -> None:
    from stego_core.projections import fit_projection

    if any(c.method == "pca" for c in cfgs):  # the PCA fit is shared by every dimension: fit it before timing
        c = next(c for c in cfgs if c.method == "pca")
        for mode in ("indep", "fused"):
            fit_projection("pca", 1, stores[0], n_images=c.n_fit_images, random_state=c.seed, progress=False,
                           root=workdir / f"{mode}-{label}",
                           standardize="per_batch" if c.protocol == "original" else "train")
    _sweep_pair(table, label, cfgs, stores, workdir, device)


def bench_crf(table: Table, plan: dict) -> None:
    from stego_core.crf import CRFPool, crf_batch

    n_img, res, n_classes = plan["crf"]
    images = photo_batch(n_img, res)
    g = torch.Generator().manual_seed(0)
    logits = F.interpolate(torch.randn(n_img, n_classes, res // 32, res // 32, generator=g) * 3,
                           size=(res // 8, res // 8), mode="bilinear", align_corners=False)  # smooth [n,K,h,w]
    cpus = os.cpu_count() or 1
    base = None
    for workers in sorted({1, cpus}):
        with CRFPool(workers, progress=False) as pool:
            pool.map(images[:workers], logits[:workers])  # start the workers (warm pool)
            t0 = time.perf_counter()
            pool.map(images, logits)
            rate = n_img / (time.perf_counter() - t0)
        base = base or rate
        table.add("crf", f"{res}x{res} K={n_classes} workers={workers} warm pool", rate, "images/s",
                  ratio=rate / base, note="original style" if workers == 1 else "")
    t0 = time.perf_counter()
    crf_batch(images, logits, workers=cpus, progress=False)
    rate = n_img / (time.perf_counter() - t0)
    table.add("crf", f"{res}x{res} K={n_classes} crf_batch workers={cpus} (with start-up)", rate, "images/s",
              ratio=rate / base)


def _store_bytes(store) -> dict[str, int]:
    """Bytes on disk of each array kind of a local store (summed over its chunks)."""
    out: dict[str, int] = {}
    for path in Path(store.path, "chunks").glob("*.npy"):
        kind = path.stem.split("-", 1)[1]
        out[kind] = out.get(kind, 0) + path.stat().st_size
    return out


def bench_store(table: Table, plan: dict, workdir: Path) -> tuple[list[dict], dict]:
    from stego_core.cache import cache_features, open_store

    n_items, res, dim, stride, batch = plan["store"]
    proj = PatchProjection(dim, stride, f"patchproj{dim}s{stride}")
    t0 = time.perf_counter()
    store = cache_features(PhotoSet(n_items, res), None, proj, root=workdir / "io-store", chunk_size=64,
                           batch_size=64, progress=False)
    write_s = time.perf_counter() - t0
    sizes = _store_bytes(store)
    per_item = {k: v / len(store) for k, v in sizes.items()}
    total_per_item = sum(per_item.values())
    store = open_store(store.path)  # fresh handle: no chunk open yet

    def read_all() -> None:
        for _ in store.iter_batches(batch, shuffle=True, seed=1):
            pass

    sec = time_call(read_all, torch.device("cpu"), min_time=plan["min_time"], min_iters=2)
    rate = len(store) / sec
    cfg = f"{n_items} x [{dim},{res // stride},{res // stride}] fp16 + {res}px image/label, b{batch} shuffled"
    table.add("feature store", f"read {cfg}", rate, "images/s", note="local disk, warm page cache")
    table.add("feature store", f"read {cfg}", rate * total_per_item / 1e6, "MB/s")
    table.add("feature store", "bytes per image (feats + label + image + index)", total_per_item / 1e3, "kB")
    table.add("feature store", "write (cache_features, cheap stand-in backbone)", n_items / write_s, "images/s")

    # extrapolation: bytes per item = C*h*w*2 (fp16) + res^2*2 (int16 label) + res^2*3 (RGB) + 8 (index) + headers;
    # check the formula against the measured store first
    chunks = -(-n_items // 64)
    header = (sizes.get("feats", 0) - n_items * dim * (res // stride) ** 2 * 2) / chunks  # bytes per .npy header
    predicted = dim * (res // stride) ** 2 * 2 + res * res * 5 + 8 + 4 * header / 64
    storage = []
    for ds, n, bb, c, s, r, note in REAL_CACHES:
        grid = r // s
        feats_b = c * grid * grid * 2
        item = feats_b + r * r * 5 + 8 + 4 * header / 64
        storage.append({"dataset": ds, "items": n, "backbone": f"{bb} {r}px [{c},{grid},{grid}]",
                        "bytes_per_item": item, "disk_GB": n * item / 1e9, "feats_fp16_GB": n * feats_b / 1e9,
                        "feats_fp32_in_RAM_GB": n * feats_b * 2 / 1e9, "knn_MB": n * 30 * 8 / 1e6, "note": note})
    check = {"measured_bytes_per_item": total_per_item, "formula_bytes_per_item": predicted,
             "formula_error": abs(predicted - total_per_item) / total_per_item}
    return storage, check


def bench_demo(table: Table) -> None:
    """Wall time per stage of the demo study, from the executed chapters' metadata (``stego-study`` writes it)."""
    from stego_core.config import repo_root

    chapters = sorted((repo_root() / "book" / "chapters").glob("*.ipynb"))
    found = 0
    for path in chapters:
        try:
            meta = json.loads(path.read_text()).get("metadata", {}).get("stego_study", {})
        except (OSError, ValueError):
            continue
        if "wall_s" in meta:
            found += 1
            table.add("demo stage", path.stem, float(meta["wall_s"]), "s", note="from chapter metadata")
    if not found:
        table.add("demo stage", "all", None, "s",
                  note="skipped: no executed chapters in book/chapters (run `make book` first)")


# ----------------------------------------------------------------------------------------------------------------
# main


def make_plan(full: bool) -> dict:
    if full:
        return {
            "min_time": 3.0,
            "backbones": [("efficientnet_lite0", (224, 320), 64), ("dino_vits16", (224, 320), 64),
                          ("dino_vits8", (224, 320), 64), ("dino_vitb8", (224, 320), 32)],
            "train": ("dino_vitb8", 224, 32, 256),
            "live_iters": 5,
            "crf": (32, 320, 27),
            "store": (2048, 224, 768, 8, 32),
            "sweep_demo_steps": 30, "sweep_paper_items": (256, 64), "sweep_paper_steps": 20,
            "sweep_paper_stego_steps": 20,
        }
    return {
        "min_time": 1.0,
        "backbones": [("efficientnet_lite0", (224, 320), 8), ("dino_vits16", (224,), 4), ("dino_vits8", (224,), 1)],
        "train": ("dino_vits16", 224, 16, 32),
        "live_iters": 1,
        "crf": (2 * (os.cpu_count() or 1), 320, 27),
        "store": (256, 224, 384, 16, 32),
        "sweep_demo_steps": 8, "sweep_paper_items": (64, 8), "sweep_paper_steps": 4, "sweep_paper_stego_steps": 3,
        "sweep_paper_stego_dims": (768, 90, 24, 3),  # quick: 4 of the 11 (the C x C layer of every head dominates)
    }


def _load_avg() -> float | None:
    """The 1-minute load average (other processes competing for the CPUs make every CPU number smaller)."""
    with contextlib.suppress(OSError, AttributeError):
        return round(os.getloadavg()[0], 2)
    return None


def machine(device: torch.device) -> dict:
    import timm

    info = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else
            (platform.processor() or platform.machine()) + " CPU",
            "device_type": device.type, "torch": torch.__version__, "timm": timm.__version__,
            "python": platform.python_version(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(), "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "load_avg_1min_start": _load_avg()}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
    if device.type == "cuda":
        info["cuda"] = torch.version.cuda
    return info


def render_storage(storage: list[dict]) -> str:
    head = f"{'cache':<30} {'items':>9} {'backbone':<28} {'kB/item':>8} {'disk GB':>8} {'fp32 RAM GB':>11}"
    lines = [head, "-" * len(head)]
    for s in storage:
        lines.append(f"{s['dataset']:<30} {s['items']:>9,} {s['backbone']:<28} {s['bytes_per_item'] / 1e3:>8.1f} "
                     f"{s['disk_GB']:>8.1f} {s['feats_fp32_in_RAM_GB']:>11.1f}  {s['note']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true",
                      help="small sizes (default without CUDA): a few minutes on 2 cores")
    size.add_argument("--full", action="store_true", help="real batch sizes and ViT-B/8 (default with CUDA)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections of {SECTIONS}")
    parser.add_argument("--out", default=str(HERE / "out" / "benchmark.json"), help="where the JSON goes")
    parser.add_argument("--sweep-stores", default="demo,paper",
                        help="stores of the sweep section: demo (the mosaic store), paper (ViT-B/8-shaped synthetic)")
    parser.add_argument("--sweep-groups", default="STEGO,probe-only",
                        help="groups of the sweep section: STEGO (heads), probe-only (DINO, PCA, RP)")
    parser.add_argument("--store-root", default=None,
                        help="where the sweep section keeps its feature stores between runs (default: the temp dir)")
    parser.add_argument("--workdir", default=None, help="folder for the temporary feature stores (default: a temp dir)")
    args = parser.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub: DINO rows use random weights
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    full = args.full or (not args.quick and device.type == "cuda")
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(only) - set(SECTIONS))
    if unknown:
        parser.error(f"--only: unknown section(s) {unknown}; expected some of {list(SECTIONS)}")
    plan = {**make_plan(full), "sweep_stores": [x.strip() for x in args.sweep_stores.split(",")],
            "store_root": args.store_root, "sweep_groups": [x.strip() for x in args.sweep_groups.split(",")]}
    info = {**machine(device), "mode": "full" if full else "quick", "sections": only}
    print(f"benchmark ({info['mode']}) on {info['device']}, torch {info['torch']}, {info['cpu_count']} CPUs",
          file=sys.stderr)

    table, storage, check = Table(), [], None
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="stego-bench-", dir=args.workdir) as tmp:
        workdir = Path(tmp)
        if "backbone" in only:
            bench_backbones(table, plan, device)
        if "train" in only:
            bench_train_step(table, plan, device, workdir)
        if "sweep" in only:
            bench_sweep(table, plan, device, workdir)
        if "crf" in only:
            bench_crf(table, plan)
        if "store" in only:
            storage, check = bench_store(table, plan, workdir)
        if "demo" in only:
            bench_demo(table)
    info["total_s"] = round(time.perf_counter() - t_start, 1)
    info["load_avg_1min_end"] = _load_avg()

    print()
    print(f"# {info['device']} | torch {info['torch']} | {info['cpu_count']} CPUs | {info['mode']} | "
          f"{info['timestamp']} | {info['total_s']} s | load avg {info['load_avg_1min_start']} -> "
          f"{info['load_avg_1min_end']}")
    print(table.render())
    if storage:
        print()
        print(f"# feature-store size, extrapolated (formula vs measured store: "
              f"{100 * check['formula_error']:.2f}% off)")
        print(render_storage(storage))
    write_json_atomic(args.out, {"machine": info, "plan": plan, "rows": table.rows, "storage": storage,
                                 "storage_check": check})
    print(f"\nwrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
