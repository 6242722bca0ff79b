"""Fault injection: kill a stage with SIGKILL at a random moment, restart it, compare with an uninterrupted run.

Each stage of ``STAGES`` builds its upstream inputs once (``setup``), does its work in a child process (``run``) and
reads its artifact back the way a downstream stage would (``read``: a fingerprint of the finished artifact, or None
when the artifact refuses to open because it is unfinished). A trial copies the upstream inputs into a fresh
folder, starts the stage, kills it after a seeded random delay between 0 and 1.1 times the uninterrupted run's
duration, reads the artifact (it must either refuse or equal the uninterrupted run's), restarts the stage to
completion and compares the end state with the uninterrupted run's. Counts per stage:

- ``killed``: trials whose child was killed before it finished by itself;
- ``corrupt``: the artifact opened after the kill but differed from the uninterrupted run (read half-written or
  stale), or the reader failed with something other than a clear ``StegoError``;
- ``lost``: the restart failed or ended in a different state than the uninterrupted run;
- ``recomputed``: the restart found the artifact unfinished and completed it.

Children are forked from a "zygote" process that has imported torch and stego_core once, so a trial costs the
stage's work rather than an interpreter start. ``benchmarks/kill_harness.py`` runs >= 20 trials per stage;
``tests/test_faults.py`` (slow) runs a few. Sizes are tiny so that trials are fast.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import select
import shutil
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent


# ------------------------------------------------------------------------------------------------------- helpers
def _sha(*parts: Any) -> str:
    digest = hashlib.sha1()
    for part in parts:
        if isinstance(part, np.ndarray):
            digest.update(str(part.dtype).encode() + str(part.shape).encode() + np.ascontiguousarray(part).tobytes())
        elif hasattr(part, "numpy"):
            arr = part.detach().cpu().numpy()
            digest.update(str(arr.dtype).encode() + np.ascontiguousarray(arr).tobytes())
        else:
            digest.update(json.dumps(part, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]


def _dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*") if p.is_dir()) if folder.exists() else []


def _fake_dataset(n: int, split: str, delay: float = 0.0):
    sys.path.insert(0, str(TESTS))
    from test_cache import FakeDataset

    return FakeDataset(n=n, split=split, delay=delay)


def _fake_backbone():
    sys.path.insert(0, str(TESTS))
    from test_cache import FakeBackbone

    return FakeBackbone()


def _cache(root: Path, split: str, n: int, delay: float = 0.0):
    from stego_core.cache import cache_features

    return cache_features(_fake_dataset(n, split, delay), None, _fake_backbone(), root=root, chunk_size=4,
                          batch_size=2, progress=False)


def _stores(root: Path):
    from stego_core.cache import open_store

    stores = {open_store(p).meta["split"]: open_store(p) for p in _dirs(root / "features")}
    return stores["train"], stores["val"]


def _cfg(**kw):
    from stego_core.training import TrainConfig

    base = dict(dataset="fake", backbone="fakenet", code_dim=3, steps=30, batch_size=4, val_freq=10,
                feature_samples=5, neg_samples=2, n_neighbors=3, n_fit_images=16, protocol="corrected")
    return TrainConfig(**{**base, **kw})


def _upstream(base: Path, *, knn: bool = True, run: bool = False) -> None:
    """Feature stores (+ kNN table, + one trained run) for the stages downstream of caching."""
    from stego_core.knn import build_knn

    train = _cache(base, "train", 16)
    _cache(base, "val", 8)
    if knn:
        build_knn(train, k=5, protocol="corrected", progress=False)
    if run:
        _train(base, steps=20)


def _train(root: Path, **kw):
    from stego_core.training import train

    train_store, val_store = _stores(root)
    return train(_cfg(**kw), train_store=train_store, val_store=val_store, root=root, progress=False)


def _run_fingerprints(root: Path) -> str | None:
    """Fingerprint of every finished training run under ``root/runs`` (None when one is unfinished). A checkpoint
    that exists must load (never half-written)."""
    import torch

    out = []
    for run in _dirs(root / "runs"):
        for name in ("last.pt", "best.pt"):
            if (run / name).exists():
                torch.load(run / name, map_location="cpu", weights_only=False)  # raises if half-written
        if not (run / "DONE").exists():
            return None
        ck = torch.load(run / "last.pt", map_location="cpu", weights_only=False)
        tensors = [v for key in ("head", "cluster_probe", "linear_probe") if ck.get(key)
                   for _, v in sorted(ck[key].items())]
        out.append((run.name, ck["step"], _sha(*tensors)))
    return _sha(out) if out else None


# -------------------------------------------------------------------------------------------------------- stages
@dataclass(frozen=True)
class Stage:
    """One stage under test: ``setup(base)`` builds its inputs, ``run(root)`` does the work (in the child) and
    ``read(root)`` fingerprints the finished artifact or returns None when it is unfinished (refuses to open)."""

    name: str
    setup: Callable[[Path], None]
    run: Callable[[Path], None]
    read: Callable[[Path], str | None]
    what: str  # the artifact in words (the reliability page)


def _features_run(root: Path) -> None:
    _cache(root, "train", 24, delay=0.004)


def _features_read(root: Path) -> str | None:
    from stego_core.cache import open_store
    from stego_core.config import StegoError

    for folder in _dirs(root / "features"):
        try:
            store = open_store(folder)
        except StegoError:
            return None
        batch = store.read(np.arange(len(store)))
        return _sha(batch["feats"], batch["label"], batch["image"], batch["index"])
    return None


def _knn_run(root: Path) -> None:
    from stego_core.knn import build_knn

    train, _ = _stores(root)
    build_knn(train, k=5, protocol="original", seed=3, progress=False)


def _knn_read(root: Path) -> str | None:
    from stego_core.config import StegoError
    from stego_core.knn import load_knn

    train, _ = _stores(root)
    try:
        return _sha(load_knn(train, "original"))
    except StegoError:
        return None


def _fivecrop_setup(base: Path) -> None:
    sys.path.insert(0, str(TESTS))
    from datatrees import make_potsdam

    make_potsdam(base / "data", size=(160, 192))


def _fivecrop_run(root: Path) -> None:
    from stego_core.fivecrop import prepare_five_crops

    prepare_five_crops("potsdam", "train", root=root / "data", progress=False)


def _fivecrop_read(root: Path) -> str | None:
    folders = sorted((root / "data" / "cropped").glob("*"))
    if not folders or not (folders[0] / "done-train.json").exists():
        return None
    files = sorted(p for p in folders[0].rglob("*") if p.is_file() and not p.name.startswith("."))
    return _sha([(str(p.relative_to(folders[0])), hashlib.sha1(p.read_bytes()).hexdigest()) for p in files])


def _training_run(root: Path) -> None:
    _train(root, steps=60)


def _sweep_specs():
    from stego_core.sweep import RunSpec

    return [RunSpec("demo", _cfg(method=m, code_dim=d, steps=30).to_dict())
            for m, d in (("stego", 3), ("pca", 4), ("rp", 3))]


def _fused_group_run(specs, *, root=None, progress=False):
    """``fused.train_group_run`` on the harness's fake stores (the real one builds registry datasets' stores)."""
    from stego_core.config import write_json_atomic
    from stego_core.training import train_group

    train_store, val_store = _stores(Path(root))
    results = train_group([s.train_config() for s in specs], train_store=train_store, val_store=val_store,
                          root=root, progress=False)
    for spec, result in zip(specs, results, strict=True):
        write_json_atomic(Path(spec.run_dir(root)) / "run.json", {"train_run_dir": str(result.run_dir)})
    return results


def _sweep_run(root: Path) -> None:
    from stego_core import fused
    from stego_core.sweep import run_sweep

    fused.train_group_run = _fused_group_run  # in the forked child only
    run_sweep(_sweep_specs(), root=root, progress=False, fused=True)


def _sweep_read(root: Path) -> str | None:
    from stego_core.sweep import is_done

    if not all(is_done(s, root) for s in _sweep_specs()):
        return None
    return _run_fingerprints(root)


def _projected_setup(base: Path) -> None:
    from stego_core.projections import make_projection

    _upstream(base, knn=False)
    train, _ = _stores(base)
    feats = train.feats_all()  # [N,C,h,w] -> tokens [N*h*w, C]
    proj = make_projection("hnne", 3, random_state=0).fit(feats.permute(0, 2, 3, 1).reshape(-1, feats.shape[1]))
    (base / "hnne.pkl").write_bytes(pickle.dumps(proj))


def _projected_run(root: Path) -> None:
    from stego_core.projections import project_store

    train, _ = _stores(root)
    proj = pickle.loads((root / "hnne.pkl").read_bytes())
    project_store(proj, train, root, batch_size=2, shuffle=True, progress=False)


def _projected_read(root: Path) -> str | None:
    from stego_core.config import StegoError
    from stego_core.projections import open_projected_store

    train, _ = _stores(root)
    for folder in _dirs(root / "projected"):
        try:
            store = open_projected_store(folder, train)
        except StegoError:
            return None
        return _sha(store.read(np.arange(len(store)))["feats"])
    return None


def _segmenter(root: Path):
    from stego_core.segmenter import Segmenter

    return Segmenter.from_run(_dirs(root / "runs")[0], "last")


def _evaluation_run(root: Path) -> None:
    from stego_core.evaluation import evaluate_store, final_rows, write_final_rows

    _, val = _stores(root)
    seg = _segmenter(root)
    result = evaluate_store(seg, val, crf=True, workers=2, progress=False)
    write_final_rows(final_rows(result, seg, dataset="fake"), name="fake-table2", key={"crf": True}, root=root)


def _evaluation_read(root: Path) -> str | None:
    import pandas as pd

    files = sorted((root / "evaluations").glob("*/results.csv"))
    if not files:
        return None
    df = pd.read_csv(files[0])
    return _sha(df[["probe", "metric", "value"]].round(10).values.tolist())


def _explorer_run(root: Path) -> None:
    from stego_core.config import write_json_atomic
    from stego_core.explorer import precompute

    _, val = _stores(root)
    data = precompute({("stego", 3): _segmenter(root)}, val, [0, 1, 2], workers=1, progress=False)
    table = data.table()
    write_json_atomic(root / "explorer" / "data.json", table.astype(str).to_dict(orient="records"))


def _explorer_read(root: Path) -> str | None:
    path = root / "explorer" / "data.json"
    return _sha(json.loads(path.read_text())) if path.exists() else None


_TINY_NOTEBOOK = '''# %% tags=["parameters"]
n = 3  # how many squares
pause = 0.0  # seconds to sleep before printing

# %%
import time

time.sleep(pause)
print([i * i for i in range(n)])
'''


def _book_setup(base: Path) -> None:
    from stego_core.book.runner import run_profile

    nb = base / "nb"
    nb.mkdir(parents=True)
    for name in ("t1_first", "t2_second"):
        (nb / f"{name}.py").write_text(_TINY_NOTEBOOK)
    (base / "old.yaml").write_text(f"notebooks:\n  - notebook: {nb / 't1_first.py'}\n    parameters: {{n: 2}}\n"
                                   f"  - notebook: {nb / 't2_second.py'}\n    parameters: {{n: 2}}\n")
    (base / "new.yaml").write_text(f"notebooks:\n  - notebook: {nb / 't1_first.py'}\n"
                                   f"    parameters: {{n: 4, pause: 0.5}}\n"
                                   f"  - notebook: {nb / 't2_second.py'}\n    parameters: {{n: 5, pause: 0.5}}\n")
    run_profile(base / "old.yaml", workdir=base, log=lambda msg: None)  # the chapters a new run must replace


def _book_run(root: Path) -> None:
    from stego_core.book.runner import run_profile

    # the profile names the notebooks by absolute path: point it at this trial's copy
    text = (root / "new.yaml").read_text().replace(str(root.parent / "base"), str(root))
    (root / "new.yaml").write_text(text)
    run_profile(root / "new.yaml", workdir=root, log=lambda msg: None)


def _book_read(root: Path) -> str | None:
    """Chapters as the book build would show them: each present chapter must be whole and current (the new
    parameters); a chapter of the old parameters is stale (counted corrupt by ``_trial``)."""
    import nbformat

    out = []
    for name, n in (("t1_first", 4), ("t2_second", 5)):
        path = root / "book" / "chapters" / f"{name}.ipynb"
        if not path.exists():
            return None
        nb = nbformat.read(path, as_version=4)
        if nb.metadata.get("stego_study", {}).get("parameters", {}).get("n") != n:
            raise AssertionError(f"{name}: stale chapter shown (parameters {nb.metadata.get('stego_study')})")
        texts = [o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
        out.append((name, texts))
    return _sha(out)


def _runs_read(root: Path) -> str | None:
    return _run_fingerprints(root)


STAGES: dict[str, Stage] = {s.name: s for s in [
    Stage("features", lambda base: None, _features_run, _features_read, "feature store (24 items, 6 chunks)"),
    Stage("knn", lambda base: _upstream(base, knn=False), _knn_run, _knn_read, "kNN table"),
    Stage("fivecrop", _fivecrop_setup, _fivecrop_run, _fivecrop_read, "five-crop tree (3 images, 30 files)"),
    Stage("training", lambda base: _upstream(base), _training_run, _runs_read, "training run (60 steps)"),
    Stage("sweep", lambda base: _upstream(base), _sweep_run, _sweep_read, "fused sweep (STEGO, PCA, RP runs)"),
    Stage("projected", _projected_setup, _projected_run, _projected_read, "h-NNE projected store"),
    Stage("evaluation", lambda base: _upstream(base, run=True), _evaluation_run, _evaluation_read,
          "Table 2 evaluation with the CRF pool"),
    Stage("explorer", lambda base: _upstream(base, run=True), _explorer_run, _explorer_read,
          "explorer precomputation"),
    Stage("book", _book_setup, _book_run, _book_read, "stego-study book (two chapters)"),
]}


# --------------------------------------------------------------------------------------------------- the zygote
def serve() -> None:
    """The zygote: import once, then fork one child per request line ``{"stage", "root", "log"}``; answer
    ``{"pid"}`` at once and ``{"rc"}`` when the child has ended."""
    import torch

    import stego_core.book.runner  # noqa: F401
    import stego_core.cache  # noqa: F401 - imported once here, inherited by every child
    import stego_core.evaluation  # noqa: F401
    import stego_core.fused  # noqa: F401
    import stego_core.training  # noqa: F401

    torch.set_num_threads(1)
    for line in sys.stdin:
        req = json.loads(line)
        pid = os.fork()
        if pid == 0:
            fd = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            code = 0
            try:
                STAGES[req["stage"]].run(Path(req["root"]))
            except BaseException:  # noqa: BLE001 - the child reports any failure by its exit status
                traceback.print_exc()
                code = 1
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        print(json.dumps({"pid": pid}), flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"rc": os.waitstatus_to_exitcode(status)}), flush=True)


class Zygote:
    """The harness's handle on a zygote process."""

    def __init__(self):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__)), "serve"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env, cwd=str(REPO))

    def start(self, stage: str, root: Path, log: Path) -> int:
        self.proc.stdin.write(json.dumps({"stage": stage, "root": str(root), "log": str(log)}) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())["pid"]

    def wait(self, timeout: float | None = None) -> int | None:
        """The child's exit status, or None when it is still running after ``timeout`` seconds."""
        if timeout is not None:
            ready, _, _ = select.select([self.proc.stdout], [], [], max(timeout, 0))
            if not ready:
                return None
        return json.loads(self.proc.stdout.readline())["rc"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def _read(stage: Stage, root: Path) -> tuple[str | None, str | None]:
    """(fingerprint or None, error): an error is anything but a clean refusal (a half-written artifact)."""
    try:
        return stage.read(root), None
    except Exception as exc:  # noqa: BLE001 - any failure to read is what the harness counts
        return None, f"{type(exc).__name__}: {exc}"


def run_stage(zygote: Zygote, stage: Stage, work: Path, seed: int, trials: int,
              log: Callable[[str], None] = print) -> dict[str, Any]:
    """``trials`` kill-and-restart trials of one stage; returns the counts (see the module docstring)."""
    rng = np.random.default_rng(seed)
    upstream = work / "base"
    if upstream.exists():
        shutil.rmtree(upstream)
    upstream.mkdir(parents=True)
    stage.setup(upstream)
    warm = work / "warm-up"  # the first run in a zygote pays one-time costs (lazy imports): not timed
    shutil.copytree(upstream, warm)
    zygote.start(stage.name, warm, work / "warm-up.log")
    zygote.wait()
    shutil.rmtree(warm, ignore_errors=True)
    ref_root = work / "reference"
    shutil.copytree(upstream, ref_root)
    t0 = time.perf_counter()
    zygote.start(stage.name, ref_root, work / "reference.log")
    rc = zygote.wait()
    duration = time.perf_counter() - t0
    assert rc == 0, (work / "reference.log").read_text()[-3000:]
    reference, err = _read(stage, ref_root)
    assert reference is not None, f"{stage.name}: the uninterrupted run left nothing readable ({err})"
    counts = {"stage": stage.name, "trials": 0, "killed": 0, "corrupt": 0, "lost": 0, "recomputed": 0,
              "run_s": round(duration, 2), "problems": []}
    for trial in range(trials):
        root = work / f"trial{trial:03d}"
        shutil.copytree(upstream, root)
        delay = float(rng.uniform(0, 1.1 * duration))
        pid = zygote.start(stage.name, root, work / f"trial{trial:03d}.log")
        rc = zygote.wait(timeout=delay)
        if rc is None:
            os.kill(pid, signal.SIGKILL)
            rc = zygote.wait()
            counts["killed"] += 1
        seen, error = _read(stage, root)
        if error is not None or (seen is not None and seen != reference):
            counts["corrupt"] += 1
            counts["problems"].append(f"trial {trial} after kill at {delay:.2f} s: {error or 'differs'}")
        rc = (zygote.start(stage.name, root, work / f"trial{trial:03d}.log"), zygote.wait())[1]
        final, error = _read(stage, root)
        if rc != 0 or final != reference:
            counts["lost"] += 1
            counts["problems"].append(f"trial {trial} restart: rc {rc}, {error or 'differs from the reference'}")
        elif seen is None:
            counts["recomputed"] += 1
        counts["trials"] += 1
        shutil.rmtree(root, ignore_errors=True)
    log(f"{stage.name}: {counts}")
    return counts


if __name__ == "__main__":
    if sys.argv[1:] == ["serve"]:
        sys.path.insert(0, str(REPO))
        serve()
