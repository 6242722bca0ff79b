"""RayExecutor: a sweep run through a local Ray cluster gives the same results table as the serial path."""
import os
import sys

import pytest
import torch

ray = pytest.importorskip("ray")

from stego_core.config import StegoError  # noqa: E402
from stego_core.distributed import RayExecutor, store_run_fn  # noqa: E402
from stego_core.results import write_rows  # noqa: E402
from stego_core.sweep import SweepGrid, run_sweep  # noqa: E402


@pytest.fixture(scope="module")
def local_ray():
    # The fake run functions below live in this test module, which Ray workers cannot import: ship them by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    # num_gpus=1 declares one logical GPU (none needs to exist) so that GPU-aware scheduling can be checked on a CPU.
    # One local cluster for the whole module. Ray gives its raylet a fixed 30 s to register; on a loaded 2-core
    # machine (other test suites running) that fails at random, so a failed start is retried twice.
    for attempt in range(3):
        try:
            ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False)
            break
        except Exception:
            ray.shutdown()
            if attempt == 2:
                raise
    yield
    ray.shutdown()
    ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def _grid():
    return SweepGrid(presets=["demo"], methods=["stego", "pca", "dino"], dims=[3, 6], seeds=[0, 1],
                     overrides={"steps": 5})


def fake_run(spec, *, run_dir, root, progress):
    """A deterministic stand-in for training: rows derived from the spec, plus the pid and a call log."""
    cfg = spec.config
    with open(run_dir / "calls.txt", "a") as fh:
        fh.write(f"{os.getpid()}\n")
    if spec.code_dim == 6 and spec.method == "pca" and spec.seed == 1:
        if os.environ.get("FAKE_FAIL") == "1" or (run_dir / "FAIL").exists():
            raise StegoError("fake: pca d6 s1 failed on purpose")
    value = 10.0 * (spec.code_dim or 112) + 3.0 * spec.seed + {"stego": 1, "pca": 2, "dino": 0}[spec.method]
    write_rows(run_dir, [
        {"run_id": spec.name, "dataset": cfg["dataset"], "backbone": cfg["backbone"], "method": spec.method,
         "code_dim": spec.code_dim or 112, "seed": spec.seed, "protocol": cfg["protocol"], "crf": False,
         "probe": probe, "metric": "mIoU", "step": cfg["steps"], "value": value + (probe == "linear"),
         "split": "val", "stage": "train"}
        for probe in ("cluster", "linear")])


def _calls(spec, root):
    path = spec.run_dir(root) / "calls.txt"
    return path.read_text().split() if path.exists() else []


def test_ray_sweep_equals_serial_sweep(local_ray, tmp_path):
    grid = _grid()
    serial = run_sweep(grid, root=tmp_path / "serial", run_fn=fake_run, progress=False)
    par = run_sweep(grid, root=tmp_path / "ray", run_fn=fake_run, executor=RayExecutor(), progress=False)
    assert len(serial.results) == len(par.results) == 2 * len(grid.runs()) == 20
    cols = ["run_id", "method", "code_dim", "seed", "probe", "value"]
    a = serial.results[cols].sort_values(cols).reset_index(drop=True)
    b = par.results[cols].sort_values(cols).reset_index(drop=True)
    assert a.equals(b)
    assert sorted(serial.ran) == sorted(par.ran) == sorted(s.name for s in grid.runs())
    # the runs really ran in Ray worker processes, each exactly once
    pids = {p for s in grid.runs() for p in _calls(s, tmp_path / "ray")}
    assert all(len(_calls(s, tmp_path / "ray")) == 1 for s in grid.runs())
    assert str(os.getpid()) not in pids


def test_finished_runs_are_skipped(local_ray, tmp_path):
    specs = _grid().runs()
    first = run_sweep(specs[:4], root=tmp_path, run_fn=fake_run, executor=RayExecutor(), progress=False)
    assert sorted(first.ran) == sorted(s.name for s in specs[:4])
    second = run_sweep(specs, root=tmp_path, run_fn=fake_run, executor=RayExecutor(), progress=False)
    assert sorted(second.skipped) == sorted(s.name for s in specs[:4])
    assert sorted(second.ran) == sorted(s.name for s in specs[4:])
    assert all(len(_calls(s, tmp_path)) == 1 for s in specs)  # nothing ran twice
    assert len(second.results) == 2 * len(specs)


def test_failing_run_surfaces_its_error(local_ray, tmp_path):
    specs = _grid().runs()
    bad = next(s for s in specs if s.method == "pca" and s.code_dim == 6 and s.seed == 1)
    bad.run_dir(tmp_path).mkdir(parents=True)
    (bad.run_dir(tmp_path) / "FAIL").write_text("")
    with pytest.raises(StegoError, match="pca d6 s1 failed on purpose"):
        run_sweep(specs, root=tmp_path, run_fn=fake_run, executor=RayExecutor(), progress=False)
    assert not (bad.run_dir(tmp_path) / "DONE").exists()
    res = run_sweep(specs, root=tmp_path, run_fn=fake_run, executor=RayExecutor(), progress=False,
                    on_error="continue")
    assert list(res.failed) == [bad.name]
    assert "StegoError: fake: pca d6 s1 failed on purpose" == res.failed[bad.name]
    assert bad.name not in res.ran and len(res.ran) + len(res.skipped) == len(specs) - 1


def test_executor_checks_its_arguments(local_ray):
    with pytest.raises(StegoError, match="num_gpus_per_run"):
        RayExecutor(num_gpus_per_run=-1)
    with pytest.raises(StegoError, match="num_gpus_per_run"):
        RayExecutor(num_gpus_per_run=1.5)
    with pytest.raises(StegoError, match="num_cpus_per_run"):
        RayExecutor(num_cpus_per_run=0)
    # more than any node has: refused at once instead of waiting forever
    with pytest.raises(StegoError, match="num_gpus_per_run: each run asks for 2 GPU .* has 1"):
        list(RayExecutor(num_gpus_per_run=2)(lambda s: s, [1]))
    with pytest.raises(StegoError, match="num_cpus_per_run: each run asks for 3 CPU .* has 2"):
        list(RayExecutor(num_cpus_per_run=3)(lambda s: s, [1]))
    assert list(RayExecutor()(lambda s: s * 2, [])) == []


def _gpu_view(spec):
    return spec, [str(g) for g in ray.get_gpu_ids()], os.environ.get("CUDA_VISIBLE_DEVICES")


def test_runs_get_their_gpu_share(local_ray):
    # two runs at half a GPU each share the cluster's one GPU; Ray tells each which GPU is its own
    out = sorted(RayExecutor(num_gpus_per_run=0.5)(_gpu_view, [1, 2]))
    assert out == [(1, ["0"], "0"), (2, ["0"], "0")]
    # CPU-only runs are given no GPU
    [(spec, ids, _)] = RayExecutor(num_gpus_per_run=0)(_gpu_view, [3])
    assert (spec, ids) == (3, [])


class _TinyData(torch.utils.data.Dataset):
    name, split, res, n_classes = "mosaic", "train", 16, 2
    class_names = ["a", "b"]

    def __len__(self):
        return 6

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        return {"img": torch.randn(3, 16, 16, generator=g), "label": torch.full((16, 16), i % 2),
                "index": i}


class _TinyBackbone(torch.nn.Module):
    name, dim, stride = "efficientnet_lite0", 3, 8

    def forward(self, img):
        return torch.nn.functional.avg_pool2d(img, 8)  # [B,3,16,16] -> [B,3,2,2]


def fake_train(cfg, *, train_store, val_store, root, progress):
    return {"run": f"{cfg.method}-{cfg.code_dim}", "n_train": len(train_store), "n_val": len(val_store),
            "feats_sum": float(train_store.read([0, 5])["feats"].sum()), "url": str(val_store.path)}


def test_store_run_fn_reads_stores_by_url_on_workers(local_ray, tmp_path):
    from stego_core.cache import cache_features

    store = cache_features(_TinyData(), None, _TinyBackbone(), root=tmp_path / "art", progress=False)
    url = f"file://{store.path}"
    run_fn = store_run_fn({"mosaic": (url, url)}, train_fn=fake_train)
    specs = SweepGrid(presets=["demo"], methods=["pca"], dims=[3], overrides={"steps": 5}).runs()
    out = list(RayExecutor()(lambda s: run_fn(s, run_dir=tmp_path, root=tmp_path, progress=False), specs))
    expected = float(store.read([0, 5])["feats"].sum())
    assert out == [{"run": "pca-3", "n_train": 6, "n_val": 6, "feats_sum": pytest.approx(expected),
                    "url": str(store.path)}]
    with pytest.raises(StegoError, match="no feature stores given for dataset 'mosaic'"):
        store_run_fn({"potsdam": (url, url)}, train_fn=fake_train)(specs[0], run_dir=tmp_path)
