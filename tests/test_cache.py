"""Feature store: round trip against the backbone, resuming (also after kill -9), fsspec URLs, clear errors."""
from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from stego_core.config import StegoError

RES = 16


class FakeDataset(Dataset):
    """A tiny deterministic dataset with the contract's item dict; optionally slow and logging what it serves."""

    name = "fake"
    n_classes = 3
    class_names = ["a", "b", "c"]
    palette = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255]], dtype=np.uint8)

    def __init__(self, n=10, split="train", res=RES, delay=0.0, log=None, hold_from=None):
        self.n, self.split, self.res, self.delay, self.log = n, split, res, delay, log
        self.hold_from = hold_from  # items from this index on are never served (the process waits to be killed)

    def __len__(self):
        return self.n

    def rgb(self, i):
        """The source image of item i: uint8 [res, res, 3]."""
        return np.random.default_rng(1000 + i).integers(0, 256, (self.res, self.res, 3), dtype=np.uint8)

    def labels(self, i):
        return np.random.default_rng(2000 + i).integers(-1, self.n_classes, (self.res, self.res))

    def __getitem__(self, i):
        from stego_core.data import normalize

        if self.delay:
            time.sleep(self.delay)
        if self.hold_from is not None and i >= self.hold_from:
            while True:  # a crash mid-run: this process only ever ends by the parent's SIGKILL
                time.sleep(1)
        if self.log:
            with open(self.log, "a") as fh:
                fh.write(f"{i}\n")
        img01 = torch.from_numpy(self.rgb(i)).permute(2, 0, 1).float() / 255  # [H,W,3] -> [3,H,W]
        return {"img": normalize(img01), "label": torch.from_numpy(self.labels(i)).long(), "index": i}


class FakeBackbone(nn.Module):
    """A frozen strided convolution with fixed weights: feats [B, 8, H/4, W/4]; counts its forward calls."""

    name = "fakenet"
    dim = 8
    stride = 4

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(3, self.dim, self.stride, stride=self.stride)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=gen))
            self.conv.bias.copy_(torch.randn(self.conv.bias.shape, generator=gen))
        self.requires_grad_(False)
        self.eval()
        self.calls = 0

    def forward(self, img):
        self.calls += 1
        return self.conv(img)


def _cache(root, ds=None, bb=None, **kw):
    from stego_core.cache import cache_features

    kw.setdefault("chunk_size", 4)
    kw.setdefault("batch_size", 3)
    kw.setdefault("progress", False)
    return cache_features(ds if ds is not None else FakeDataset(), None, bb if bb is not None else FakeBackbone(),
                          root=root, **kw)


def _chunk_files(store_path):
    return sorted(Path(store_path, "chunks").glob("*.npy"))


def _assert_same_store(a, b):
    assert len(a) == len(b)
    ra, rb = a.read(range(len(a))), b.read(range(len(b)))
    for key in ("feats", "label", "index"):
        assert torch.equal(ra[key], rb[key]), key
    assert np.array_equal(ra["image"], rb["image"])


def test_round_trip_matches_backbone(tmp_path):
    from stego_core.backbones import extract_features

    ds, bb = FakeDataset(n=10), FakeBackbone()
    store = _cache(tmp_path, ds, bb)
    assert len(store) == 10 and store.dim == 8 and store.grid == (4, 4) and store.n_classes == 3
    assert store.meta["chunk_size"] == 4 and store.meta["n_items"] == 10
    assert store.meta["class_names"] == ["a", "b", "c"]
    assert np.array_equal(store.palette, ds.palette)
    assert Path(store.path).parent.parent == tmp_path and Path(store.path).name.startswith("fake-train-fakenet-16-")
    assert len(_chunk_files(store.path)) == 3 * 4  # 3 chunks (4+4+2 items) x 4 arrays
    got = store.read(range(10))
    img = torch.stack([ds[i]["img"] for i in range(10)])
    want = extract_features(FakeBackbone(), img)
    assert got["feats"].dtype == torch.float32 and got["feats"].shape == (10, 8, 4, 4)
    torch.testing.assert_close(got["feats"], want, rtol=1e-3, atol=2e-3)  # stored as float16
    assert not torch.equal(got["feats"], want)  # it really is float16 on disk
    assert got["label"].dtype == torch.int64
    assert torch.equal(got["label"], torch.stack([torch.from_numpy(ds.labels(i)) for i in range(10)]))
    assert got["image"].dtype == np.uint8 and np.array_equal(got["image"], np.stack([ds.rgb(i) for i in range(10)]))
    assert torch.equal(got["index"], torch.arange(10))

    # any order, repeats, negative indices and tensors; gathers across chunks
    order = [9, 0, 5, 5, 3, -1]
    part = store.read(torch.tensor(order))
    assert torch.equal(part["feats"], got["feats"][[9, 0, 5, 5, 3, 9]])
    assert np.array_equal(part["image"], got["image"][[9, 0, 5, 5, 3, 9]])
    assert torch.equal(part["index"], torch.tensor([9, 0, 5, 5, 3, 9]))

    # batches: in order, or a seeded permutation
    batches = list(store.iter_batches(4))
    assert [len(b["index"]) for b in batches] == [4, 4, 2]
    assert torch.equal(torch.cat([b["feats"] for b in batches]), got["feats"])
    shuffled = torch.cat([b["index"] for b in store.iter_batches(3, shuffle=True, seed=5)])
    assert sorted(shuffled.tolist()) == list(range(10)) and shuffled.tolist() != list(range(10))
    again = torch.cat([b["index"] for b in store.iter_batches(3, shuffle=True, seed=5)])
    assert torch.equal(shuffled, again)
    assert [len(b["index"]) for b in store.iter_batches(3, drop_last=True)] == [3, 3, 3]
    assert torch.equal(store.feats_all(), got["feats"])
    clone = pickle.loads(pickle.dumps(store))  # DataLoader workers get a copy without the open memory maps
    assert not clone._lru and torch.equal(clone.read([7, 1])["feats"], got["feats"][[7, 1]])

    with pytest.raises(StegoError, match="indices"):
        store.read([10])
    with pytest.raises(StegoError, match="max_gib"):
        store.feats_all(max_gib=1e-9)


def test_rerun_skips_finished_store(tmp_path):
    from stego_core.cache import open_store

    first = _cache(tmp_path)
    mtimes = {p: p.stat().st_mtime_ns for p in _chunk_files(first.path)}
    ds, bb = FakeDataset(log=tmp_path / "log.txt"), FakeBackbone()
    second = _cache(tmp_path, ds, bb)
    assert second.path == first.path and bb.calls == 0 and not (tmp_path / "log.txt").exists()
    assert {p: p.stat().st_mtime_ns for p in _chunk_files(first.path)} == mtimes
    _assert_same_store(open_store(first.path), second)
    # a different configuration is a different store
    other = _cache(tmp_path, FakeDataset(n=7))
    assert other.path != first.path and len(other) == 7


def test_missing_and_half_written_chunks_are_recomputed(tmp_path):
    from stego_core.cache import COMPLETE_FILE, open_store

    full = _cache(tmp_path / "a")
    store = _cache(tmp_path / "b")
    path = Path(store.path)
    # simulate a crash: chunk 1 lost its index file (its feats are garbage), chunk 2 is gone, a temp file is left
    (path / COMPLETE_FILE).unlink()
    (path / "chunks" / "000001-index.npy").unlink()
    (path / "chunks" / "000001-feats.npy").write_bytes(b"half a file")
    for f in path.glob("chunks/000002-*"):
        f.unlink()
    (path / "chunks" / ".000002-feats.npy.abc.tmp").write_bytes(b"junk")
    with pytest.raises(StegoError, match=r"incomplete \(1 of 3 chunks"):
        open_store(path)
    kept = {p: p.stat().st_mtime_ns for p in path.glob("chunks/000000-*")}
    ds, bb = FakeDataset(log=tmp_path / "log.txt"), FakeBackbone()
    resumed = _cache(tmp_path / "b", ds, bb)
    served = sorted(int(x) for x in (tmp_path / "log.txt").read_text().split())
    assert served == list(range(4, 10))  # chunks 1 and 2 only
    assert bb.calls == 3  # 4 items in batches of 3 -> 2 calls, 2 items -> 1 call
    assert {p: p.stat().st_mtime_ns for p in path.glob("chunks/000000-*")} == kept
    assert not list(path.glob("chunks/.*.tmp"))
    _assert_same_store(resumed, full)


_CHILD = """
import sys
sys.path.insert(0, {tests!r})
from test_cache import FakeDataset, FakeBackbone, _cache
_cache({root!r}, FakeDataset(n={n}, delay={delay}, log={log!r}, hold_from={hold_from}), FakeBackbone(), chunk_size=4,
       batch_size=2)
print("finished")
"""


def test_resume_after_kill_9(tmp_path):
    """A child process caches a dataset that stops serving items after two chunks; SIGKILL once both chunks are
    on disk (a condition, not a timing); the store must not open; a rerun computes only the missing chunks and ends
    equal to an uninterrupted store."""
    from stego_core.cache import open_store

    n, delay, root = 24, 0.0, tmp_path / "killed"
    code = _CHILD.format(tests=str(Path(__file__).resolve().parent), root=str(root), n=n, delay=delay,
                         log=str(tmp_path / "child.log"), hold_from=8)
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    try:
        while len(list(root.glob("features/*/chunks/*-index.npy"))) < 2:
            assert child.poll() is None, child.communicate()[1].decode()[-2000:]
            assert time.monotonic() < deadline, "the child wrote no chunks in time"
            time.sleep(0.01)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        if child.poll() is None:
            child.kill()
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL

    store_dir = next(root.glob("features/*"))
    done = sorted(int(p.name[:6]) for p in store_dir.glob("chunks/*-index.npy"))
    assert done == [0, 1]  # items 0-7; item 8 was never served
    with pytest.raises(StegoError, match="incomplete"):
        open_store(store_dir)
    kept = {p: p.stat().st_mtime_ns for c in done for p in store_dir.glob(f"chunks/{c:06d}-*")}
    assert len(kept) == 4 * len(done)

    ds, bb = FakeDataset(n=n, log=tmp_path / "rerun.log"), FakeBackbone()
    resumed = _cache(root, ds, bb, chunk_size=4, batch_size=2)
    served = sorted(int(x) for x in (tmp_path / "rerun.log").read_text().split())
    missing = [c for c in range(n // 4) if c not in done]
    assert served == [i for c in missing for i in range(4 * c, 4 * c + 4)]
    assert bb.calls == 2 * len(missing)
    assert {p: p.stat().st_mtime_ns for p in kept} == kept
    _assert_same_store(resumed, _cache(tmp_path / "clean", FakeDataset(n=n), chunk_size=4, batch_size=2))


def test_fsspec_urls(tmp_path):
    from stego_core.cache import open_store

    local = _cache(tmp_path / "local")
    url = f"memory://stego-test-{uuid.uuid4().hex}"
    mem = _cache(url)
    assert isinstance(mem.path, str) and mem.path.startswith(url + "/features/fake-train-fakenet-16-")
    _assert_same_store(mem, local)
    _assert_same_store(open_store(mem.path), local)
    bb = FakeBackbone()
    assert _cache(url, bb=bb).path == mem.path and bb.calls == 0  # finished stores are found on fsspec too
    # file:// URLs are local folders
    via_file = _cache(f"file://{tmp_path / 'local'}")
    assert via_file.path == local.path and isinstance(via_file.path, Path)
    with pytest.raises(StegoError, match="no feature store"):
        open_store(url + "/features/nothing-here")


def test_errors(tmp_path):
    from stego_core.cache import cache_features, open_store

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(StegoError, match="^root: cannot write"):
        _cache(blocker / "sub")
    with pytest.raises(StegoError, match="^chunk_size"):
        _cache(tmp_path, chunk_size=0)
    with pytest.raises(StegoError, match="^batch_size"):
        _cache(tmp_path, batch_size=0)
    with pytest.raises(StegoError, match="^res"):
        _cache(tmp_path, res=32)  # the dataset object yields 16 px
    with pytest.raises(StegoError, match="^dataset: unknown dataset 'nope'"):
        cache_features("nope", "train", FakeBackbone(), root=tmp_path, progress=False)
    with pytest.raises(StegoError, match="^backbone: unknown backbone 'nope'"):
        cache_features(FakeDataset(), None, "nope", root=tmp_path, progress=False)
    with pytest.raises(StegoError, match="^backbone"):
        cache_features(FakeDataset(), None, object(), root=tmp_path, progress=False)
    with pytest.raises(StegoError, match="^path: no feature store"):
        open_store(tmp_path / "missing")
    with pytest.raises(StegoError, match="^dataset:.*no items"):
        _cache(tmp_path, FakeDataset(n=0))


def test_names_resolve_through_the_registries(tmp_path, monkeypatch):
    """A dataset name goes through load_dataset (the mosaic demo); a backbone name through load_backbone, which is
    only called when there is work left (here patched to hand out the fake, to keep the test fast)."""
    import stego_core.cache as cache
    from stego_core.cache import cache_features

    loads = []

    def fake_load(name, weights=None, *, device="cpu"):
        loads.append((name, weights, device))
        return FakeBackbone()

    monkeypatch.setattr(cache, "load_backbone", fake_load)
    kw = dict(weights="random", res=32, dataset_options={"n_images": 3, "scene_size": 64}, root=tmp_path,
              chunk_size=2, batch_size=2, progress=False)
    store = cache_features("mosaic", "val", "efficientnet_lite0", **kw)
    assert loads == [("efficientnet_lite0", "random", "cpu")]
    assert len(store) == 3 and store.meta["dataset"] == "mosaic" and store.meta["backbone"] == "efficientnet_lite0"
    assert store.meta["dataset_options"] == {"n_images": 3, "scene_size": 64} and store.res == 32
    assert store.meta["weights"] == "random" and Path(store.path).name.startswith("mosaic-val-efficientnet_lite0-32-")
    assert store.meta["weights_source"] == "random (seed 0)"  # which weights the features came from
    from stego_core.data import load_dataset

    ds = load_dataset("mosaic", "val", res=32, n_images=3, scene_size=64)
    batch = store.read([0, 2])
    assert batch["feats"].shape == (2, 8, 8, 8) and batch["image"].shape == (2, 32, 32, 3)
    assert torch.equal(batch["label"], torch.stack([ds[0]["label"], ds[2]["label"]]))
    assert store.n_classes == ds.n_classes and store.class_names == list(ds.class_names)
    # finished: the backbone is not even loaded again
    assert cache_features("mosaic", "val", "efficientnet_lite0", **kw).path == store.path and len(loads) == 1
    # other weights are another store
    assert cache_features("mosaic", "val", "efficientnet_lite0", **{**kw, "weights": None}).path != store.path


def test_meta_names_the_weights_file(tmp_path, monkeypatch):
    """The store says which file its features came from; the DINO default is the study's 300-epoch ViT-S/8."""
    import stego_core.cache as cache
    from stego_core.cache import cache_features

    monkeypatch.setattr(cache, "load_backbone", lambda name, weights=None, *, device="cpu": FakeBackbone())
    kw = dict(res=32, dataset_options={"n_images": 2, "scene_size": 64}, root=tmp_path, progress=False)
    store = cache_features("mosaic", "val", "dino_vits8", **kw)
    assert store.meta["weights_source"] == ("https://dl.fbaipublicfiles.com/dino/dino_deitsmall8_300ep_pretrain/"
                                            "dino_deitsmall8_300ep_pretrain.pth")
    local = cache_features("mosaic", "val", "dino_vits8", weights=str(tmp_path / "mine.pth"), **kw)
    assert local.meta["weights_source"] == str(tmp_path / "mine.pth") and local.path != store.path
