"""The sweep runner: expansion, keyed run folders, skipping finished runs, resuming after an interruption."""
import json
from pathlib import Path

import pandas as pd
import pytest

from stego_core.config import StegoError
from stego_core.results import load_results, write_rows
from stego_core.sweep import (
    STUDY_DIMS,
    ProcessExecutor,
    RunSpec,
    SweepGrid,
    is_done,
    load_sweep_results,
    local_executor,
    run_sweep,
    serial_executor,
    study_grid,
    train_run,
)


class FakeRun:
    """A run_fn that writes one validation history per run and can fail on its n-th call."""

    def __init__(self, fail_on_call=None):
        self.calls: list[str] = []
        self.fail_on_call = fail_on_call

    def __call__(self, spec: RunSpec, *, run_dir: Path, root, progress):
        self.calls.append(spec.name)
        if self.fail_on_call is not None and len(self.calls) == self.fail_on_call:
            raise RuntimeError(f"interrupted during {spec.name}")
        dim = 112 if spec.code_dim is None else spec.code_dim
        rows = []
        for step in (100, 200):
            for probe in ("cluster", "linear"):
                for metric in ("mIoU", "Accuracy"):
                    rows.append(dict(run_id=spec.name, dataset=spec.config["dataset"],
                                     backbone=spec.config["backbone"], method=spec.method, code_dim=dim,
                                     seed=spec.seed, protocol=spec.config["protocol"], crf=False, probe=probe,
                                     metric=metric, step=step, value=float(dim + step / 100), split="val",
                                     stage="train"))
        write_rows(run_dir, rows)


def _grid(**kw):
    return SweepGrid(presets=["demo"], methods=["dino", "pca", "rp"], dims=[3, 6], seeds=[0],
                     overrides={"steps": 5}, **kw)


def test_grid_expands_and_keys_runs(tmp_path):
    specs = _grid().runs()
    assert [s.name for s in specs] == ["mosaic-dino-dC-s0", "mosaic-pca-d3-s0", "mosaic-pca-d6-s0",
                                       "mosaic-rp-d3-s0", "mosaic-rp-d6-s0"]
    assert all(s.config["steps"] == 5 and s.config["dataset"] == "mosaic" for s in specs)
    assert len({s.config_hash for s in specs}) == 5
    other = SweepGrid(presets=["demo"], methods=["pca"], dims=[3], seeds=[0], overrides={"steps": 6}).runs()[0]
    assert other.name == specs[1].name and other.run_dir(tmp_path) != specs[1].run_dir(tmp_path)
    assert specs[1].run_dir(tmp_path).parent == tmp_path / "sweeps"
    grid = study_grid("cityscapes", seeds=[0, 1])
    runs = grid.runs()
    assert sum(r.method == "hnne" for r in runs) == 2 * len(STUDY_DIMS["cityscapes"])
    assert sum(r.method == "dino" for r in runs) == 2


def test_grid_validation():
    with pytest.raises(StegoError, match="methods"):
        SweepGrid(methods=["umap"]).runs()
    with pytest.raises(StegoError, match="presets"):
        SweepGrid(presets=["imagenet"]).runs()
    with pytest.raises(StegoError, match="unknown TrainConfig"):
        SweepGrid(overrides={"stepz": 3}).runs()
    with pytest.raises(StegoError, match="dims"):
        SweepGrid(dims={"cityscapes": [3]}).runs()
    with pytest.raises(StegoError, match="overrides"):
        SweepGrid(overrides={"seed": 3}).runs()


def test_sweep_skips_finished_runs_and_resumes_after_interruption(tmp_path):
    failing = FakeRun(fail_on_call=3)
    with pytest.raises(RuntimeError, match="interrupted"):
        run_sweep(_grid(), root=tmp_path, run_fn=failing, progress=False)
    specs = _grid().runs()
    assert [is_done(s, tmp_path) for s in specs] == [True, True, False, False, False]
    assert (specs[2].run_dir(tmp_path) / "spec.json").exists()  # started, not finished

    rerun = FakeRun()
    result = run_sweep(_grid(), root=tmp_path, run_fn=rerun, progress=False)
    assert rerun.calls == [s.name for s in specs[2:]]  # the interrupted run is re-invoked, finished ones skipped
    assert result.skipped == [s.name for s in specs[:2]] and result.ran == rerun.calls
    assert all(is_done(s, tmp_path) for s in specs)
    assert sorted(result.results["run_id"].unique()) == sorted(s.name for s in specs)

    idle = FakeRun()
    again = run_sweep(_grid(), root=tmp_path, run_fn=idle, progress=False)
    assert idle.calls == [] and again.ran == [] and len(again.skipped) == 5
    summary = again.summary
    pca3 = summary[(summary.method == "pca") & (summary.code_dim == 3) & (summary.probe == "cluster")
                   & (summary.metric == "mIoU")]
    assert pca3["mean"].tolist() == [5.0] and pca3["n_seeds"].tolist() == [1]


def test_results_are_restricted_to_the_sweep_runs(tmp_path):
    run_sweep(_grid(), root=tmp_path, run_fn=FakeRun(), progress=False)
    small = SweepGrid(presets=["demo"], methods=["pca"], dims=[6], seeds=[0], overrides={"steps": 5})
    result = run_sweep(small, root=tmp_path, run_fn=FakeRun(), progress=False)
    assert result.ran == [] and set(result.results["run_id"]) == {"mosaic-pca-d6-s0"}


def test_on_error_continue_and_custom_executor(tmp_path):
    seen = []

    def reversed_executor(fn, specs):
        seen.extend(s.name for s in specs)
        for spec in reversed(list(specs)):
            yield fn(spec)

    fake = FakeRun(fail_on_call=1)
    result = run_sweep(_grid(), root=tmp_path, run_fn=fake, executor=reversed_executor, progress=False,
                       on_error="continue")
    assert fake.calls[0] == "mosaic-rp-d6-s0" and list(result.failed) == ["mosaic-rp-d6-s0"]
    assert len(result.ran) == 4 and len(seen) == 5
    assert not is_done(_grid().runs()[-1], tmp_path)
    with pytest.raises(StegoError, match="on_error"):
        run_sweep(_grid(), root=tmp_path, run_fn=fake, on_error="ignore")


class RecordingRun(FakeRun):
    """FakeRun that trains "into" <root>/runs/<name>-trained and records it in run.json, as train_run does."""

    def __call__(self, spec: RunSpec, *, run_dir: Path, root, progress):
        import json

        trained = Path(root) / "runs" / f"{spec.name}-trained"
        trained.mkdir(parents=True, exist_ok=True)
        super().__call__(spec, run_dir=trained, root=root, progress=progress)
        df = pd.read_csv(trained / "results.csv")
        df["run_id"] = trained.name
        write_rows(trained, df.to_dict("records"))
        (Path(run_dir) / "run.json").write_text(json.dumps({"train_run_dir": str(trained)}))


def test_results_leave_out_other_runs_with_the_same_method_dim_and_seed(tmp_path):
    """A control run (e.g. chapter 02's untrained head) shares method, dim, seed and protocol with a sweep run but
    must not be averaged into the sweep's numbers."""
    result = run_sweep(_grid(), root=tmp_path, run_fn=RecordingRun(), progress=False)
    stray = tmp_path / "runs" / "mosaic-pca-d3-s0-control"
    FakeRun()(_grid().runs()[1], run_dir=stray, root=tmp_path, progress=False)
    df = pd.read_csv(stray / "results.csv").assign(run_id=stray.name, value=999.0)
    write_rows(stray, df.to_dict("records"))

    again = run_sweep(_grid(), root=tmp_path, run_fn=RecordingRun(), progress=False)
    assert len(again.skipped) == 5 and set(again.results["run_id"]) == set(result.results["run_id"])
    assert stray.name not in set(again.results["run_id"]) and (again.results["value"] < 999).all()
    swept = load_sweep_results(tmp_path)
    assert set(swept["run_id"]) == {f"{s.name}-trained" for s in _grid().runs()}
    assert stray.name in set(load_results(tmp_path)["run_id"])


class WorkerRun(FakeRun):
    """FakeRun that records the process and torch's thread count it ran with, and fails on one run name."""

    def __init__(self, fail_name=None):
        super().__init__()
        self.fail_name = fail_name

    def __call__(self, spec: RunSpec, *, run_dir: Path, root, progress):
        import os

        import torch

        if spec.name == self.fail_name:
            raise RuntimeError(f"broken run {spec.name}")
        (Path(run_dir) / "worker.txt").write_text(f"{os.getpid()} {torch.get_num_threads()}")
        super().__call__(spec, run_dir=run_dir, root=root, progress=progress)


def test_process_executor_runs_in_single_threaded_workers(tmp_path):
    import os

    serial = run_sweep(_grid(), root=tmp_path / "serial", run_fn=FakeRun(), progress=False)
    result = run_sweep(_grid(), root=tmp_path / "par", run_fn=WorkerRun(), executor=ProcessExecutor(2, threads=1),
                       progress=False)
    assert sorted(result.ran) == sorted(serial.ran) and len(result.ran) == 5
    workers = {(s.run_dir(tmp_path / "par") / "worker.txt").read_text() for s in _grid().runs()}
    pids = {w.split()[0] for w in workers}
    assert str(os.getpid()) not in pids and 1 <= len(pids) <= 2
    assert {w.split()[1] for w in workers} == {"1"}
    cols = ["run_id", "probe", "metric", "step", "value"]
    assert result.results.sort_values(cols)[cols].reset_index(drop=True).equals(
        serial.results.sort_values(cols)[cols].reset_index(drop=True))
    assert local_executor(1) is serial_executor and isinstance(local_executor(2), ProcessExecutor)


def test_process_executor_reraises_a_failing_run_and_the_sweep_resumes(tmp_path):
    bad = "mosaic-pca-d3-s0"
    with pytest.raises(RuntimeError, match="broken run"):
        run_sweep(_grid(), root=tmp_path, run_fn=WorkerRun(fail_name=bad), executor=ProcessExecutor(2, threads=1),
                  progress=False)
    assert not is_done(next(s for s in _grid().runs() if s.name == bad), tmp_path)
    again = run_sweep(_grid(), root=tmp_path, run_fn=WorkerRun(), executor=ProcessExecutor(2, threads=1),
                      progress=False)
    assert bad in again.ran and len(again.ran) + len(again.skipped) == 5


def test_default_run_fn_wires_cache_and_training(tmp_path, monkeypatch):
    import stego_core.sweep as sweep

    opened, trained = [], []

    def fake_cache(dataset, split, backbone, **kw):
        opened.append((dataset, split, backbone, kw.get("res")))
        return f"store-{split}"

    class Result:
        run_dir = tmp_path / "runs" / "x"
        best = {"step": 5, "cluster/mIoU": 1.0}

    def fake_train(cfg, *, train_store, val_store, root, progress, logger):
        assert logger == "none"  # the sweep's default: no live logs
        trained.append((cfg.method, cfg.code_dim, cfg.steps, train_store, val_store))
        return Result()

    monkeypatch.setattr(sweep, "cache_features", fake_cache)
    monkeypatch.setattr(sweep, "train", fake_train)
    grid = SweepGrid(presets=["demo"], methods=["pca"], dims=[3], seeds=[0], overrides={"steps": 5},
                     val_cache={"res": 224})
    result = run_sweep(grid, root=tmp_path, run_fn=train_run, progress=False)
    assert opened == [("mosaic", "train", "efficientnet_lite0", None), ("mosaic", "val", "efficientnet_lite0", 224)]
    assert trained == [("pca", 3, 5, "store-train", "store-val")]
    assert result.ran == ["mosaic-pca-d3-s0"]
    assert (grid.runs()[0].run_dir(tmp_path) / "run.json").exists()


def test_a_sweep_of_real_tiny_runs(tmp_path):
    """The default run_fn end to end on the demo's mosaic scenes (8 images, 64 px, the bundled EfficientNet-Lite0):
    every run trains for real; the sweep's rows are each run's own validation, and a run's best metrics are what
    its best checkpoint scores on the validation store now (an independent re-evaluation)."""
    from stego_core import cache, evaluation
    from stego_core.segmenter import Segmenter

    opts = {"res": 64, "dataset_options": {"n_images": 8, "scene_size": 96}, "batch_size": 8}
    grid = SweepGrid(presets=["demo"], methods=["dino", "pca", "rp"], dims=[3], seeds=[0],
                     overrides={"steps": 4, "batch_size": 4, "val_freq": 2, "n_fit_images": 8},
                     train_cache=opts, val_cache=opts)
    result = run_sweep(grid, root=tmp_path, progress=False)
    assert len(result.ran) == 3 and not result.failed
    val = cache.cache_features("mosaic", "val", "efficientnet_lite0", root=tmp_path, progress=False, **opts)
    for spec in grid.runs():
        info = json.loads((spec.run_dir(tmp_path) / "run.json").read_text())
        seg = Segmenter.from_run(info["train_run_dir"])
        again = evaluation.evaluate_store(seg, val, batch_size=8, progress=False)  # val_batch_size 8: one batch
        rows = result.results[(result.results.run_id == Path(info["train_run_dir"]).name)
                              & (result.results.step == info["best"]["step"])]
        for probe in ("cluster", "linear"):
            for metric in ("mIoU", "Accuracy"):
                assert info["best"][f"{probe}/{metric}"] == pytest.approx(again[f"{probe}/{metric}"], abs=1e-6)
                value = rows[(rows.probe == probe) & (rows.metric == metric)]["value"]
                assert len(value) >= 1 and value.iloc[0] == pytest.approx(again[f"{probe}/{metric}"], abs=1e-6)
    again = run_sweep(grid, root=tmp_path, progress=False)  # finished runs are not trained again
    assert again.ran == [] and len(again.skipped) == 3
