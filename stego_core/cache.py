"""Feature store: a dataset split's frozen backbone features computed once and kept on disk or any fsspec URL.

``cache_features`` runs the backbone over a split and writes a keyed store; ``open_store`` opens a finished one;
``FeatureStore`` reads it back in any order. The kNN table (``stego_core.knn``) is kept beside the features.

Storage choice: plain ``.npy`` chunk files plus a JSON description, written through fsspec. zarr would also fit but it
is not a dependency of the project (and not installed); ``.npy`` needs nothing beyond numpy, can be memory-mapped on a
local disk (a batch then reads only its own rows, so shuffled reading stays fast), and fsspec lets the same code write
to a local folder, ``file://``, ``memory://`` or object storage (``s3://``, ``gs://`` with their fsspec drivers).

Layout of one store, ``artifact_dir("features", f"{dataset}-{split}-{backbone}-{res}", resolved_cfg, root)``::

    meta.json                    resolved config (incl. weights_source: the weights file / URL) + dataset info
    chunks/000000-feats.npy      float16 [n, C, h, w]   backbone features (eval mode, no dropout, no flip)
    chunks/000000-label.npy      int16   [n, res, res]  labels, -1 = ignore
    chunks/000000-image.npy      uint8   [n, res, res, 3] un-normalised RGB
    chunks/000000-index.npy      int64   [n]            the dataset's item index; written last (marks the chunk done)
    ...
    COMPLETE                     written after every chunk; only a store with it opens
    knn-original.npy, knn-original.json   (stego_core.knn)

Crash safety: every file is written under a temporary name in its folder and renamed into place, so a file that
exists is whole; a chunk counts as done when its index file (the last of its four) exists, and the store counts as
done when ``COMPLETE`` exists (written after all chunks). A run killed at any moment (even ``kill -9``) therefore
leaves a store that does not open, and a rerun with the same arguments computes only the chunks that are missing.
(Renames survive a killed process; surviving a power cut would also need fsync, which we do not do.)

Item ``i`` of the store is item ``i`` of the dataset (store order = dataset order; shuffling happens when reading).
"""
from __future__ import annotations

import io
import json
import os
import time
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import torch
from fsspec.implementations.local import LocalFileSystem
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from .backbones import BACKBONES, extract_features, load_backbone, weights_source
from .config import (
    STAGES,
    StegoError,
    artifacts_root,
    atomic_write_fs,
    check_int,
    config_hash,
    ensure_writable,
    stage_command,
)
from .costs import store_item_bytes
from .data import DATASETS, load_dataset, unnormalize
from .guards import artifact_lock, disk_full_guard, note

STORE_VERSION = 1
META_FILE = "meta.json"
COMPLETE_FILE = "COMPLETE"
CHUNK_DIR = "chunks"
# The four arrays of a chunk, in the order they are written; the last one marks the chunk as complete.
ARRAYS = ("feats", "label", "image", "index")
DTYPES = {"feats": np.float16, "label": np.int16, "image": np.uint8, "index": np.int64}
_LRU_CHUNKS = 16  # chunks kept open (memory maps locally; whole chunks in memory for remote stores)


# ----------------------------------------------------------------------------------------------------------------
# A folder on some fsspec filesystem
# ----------------------------------------------------------------------------------------------------------------
def _is_url(path: Any) -> bool:
    return isinstance(path, str) and "://" in path


class _Folder:
    """One folder on a local disk or behind an fsspec URL, with atomic writes and numpy reads."""

    def __init__(self, url: str | os.PathLike):
        text = str(url)
        self.fs, root = fsspec.core.url_to_fs(text)
        self.root = root.rstrip("/") or "/"
        self.local = isinstance(self.fs, LocalFileSystem)
        # What users see: a Path for local folders (also for file:// URLs), the URL otherwise.
        self.path: Path | str = Path(self.root) if self.local else text.rstrip("/")

    def join(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    def exists(self, rel: str) -> bool:
        return self.fs.exists(self.join(rel))

    def makedirs(self, rel: str = "") -> None:
        self.fs.makedirs(self.join(rel) if rel else self.root, exist_ok=True)

    def _write_atomic(self, rel: str, write) -> None:
        with atomic_write_fs(self.fs, self.join(rel)) as fh:
            write(fh)

    def save_npy(self, rel: str, arr: np.ndarray) -> None:
        self._write_atomic(rel, lambda fh: np.save(fh, np.ascontiguousarray(arr), allow_pickle=False))

    def load_npy(self, rel: str, *, mmap: bool = False) -> np.ndarray:
        if self.local and mmap:
            return np.load(self.join(rel), mmap_mode="r", allow_pickle=False)
        with self.fs.open(self.join(rel), "rb") as fh:
            return np.load(io.BytesIO(fh.read()), allow_pickle=False)

    def write_json(self, rel: str, obj: Any) -> None:
        text = json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n"
        self._write_atomic(rel, lambda fh: fh.write(text.encode()))

    def read_json(self, rel: str) -> Any:
        with self.fs.open(self.join(rel), "rb") as fh:
            return json.loads(fh.read().decode())

    def remove(self, rel: str) -> None:
        if self.exists(rel):
            self.fs.rm(self.join(rel))

    def clean_temporaries(self, rel: str) -> None:
        """Delete the temporary files that killed writers left behind in folder ``rel``."""
        folder = self.join(rel)
        if not self.fs.exists(folder):
            return
        for entry in self.fs.ls(folder, detail=False):
            name = entry.rstrip("/").rpartition("/")[2]
            if name.startswith(".") and name.endswith(".tmp"):
                self.fs.rm(entry)


def _chunk_file(chunk: int, array: str) -> str:
    return f"{CHUNK_DIR}/{chunk:06d}-{array}.npy"


# ----------------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------------
def iter_store_batches(store: Any, batch_size: int, *, shuffle: bool = False, seed: int = 0,
                       drop_last: bool = False) -> Iterator[dict[str, Any]]:
    """Batches of ``store.read`` for any store with ``read`` and ``len``: in order, or a permutation from ``seed``."""
    check_int("batch_size", batch_size, minimum=1)
    n = len(store)
    order = np.random.default_rng(seed).permutation(n) if shuffle else np.arange(n)
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        yield store.read(order[start:start + batch_size])


class FeatureStore:
    """A finished feature store: ``len(store)`` items of features, labels, RGB images and dataset indices.

    Open one with ``open_store(path)`` (or get it from ``cache_features``). ``read(indices)`` gathers any items in
    any order; ``iter_batches`` walks the store in batches. Chunks are memory-mapped on a local disk and kept in a
    small LRU cache, so reading many batches touches only the rows they need.
    """

    def __init__(self, folder: _Folder, meta: dict):
        self._folder = folder
        self.meta = meta
        self._lru: OrderedDict[int, dict[str, np.ndarray]] = OrderedDict()

    # -- description ------------------------------------------------------------------------------------------
    @property
    def path(self) -> Path | str:
        """The store's folder: a Path for local stores, the URL for other fsspec filesystems."""
        return self._folder.path

    @property
    def dim(self) -> int:
        return int(self.meta["dim"])

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.meta["grid"])

    @property
    def res(self) -> int:
        return int(self.meta["res"])

    @property
    def n_classes(self) -> int:
        return int(self.meta["n_classes"])

    @property
    def class_names(self) -> list[str]:
        return list(self.meta["class_names"])

    @property
    def palette(self) -> np.ndarray | None:
        pal = self.meta.get("palette")
        return None if pal is None else np.asarray(pal, dtype=np.uint8)

    @property
    def chunk_size(self) -> int:
        return int(self.meta["chunk_size"])

    @property
    def n_chunks(self) -> int:
        return -(-len(self) // self.chunk_size)

    def __len__(self) -> int:
        return int(self.meta["n_items"])

    def __repr__(self) -> str:
        m = self.meta
        return (f"FeatureStore({m['dataset']}/{m['split']}, {m['backbone']}, {len(self)} items, "
                f"feats [{m['dim']},{m['grid'][0]},{m['grid'][1]}], path={str(self.path)!r})")

    def __getstate__(self) -> dict:  # picklable for DataLoader workers: drop the open memory maps
        state = self.__dict__.copy()
        state["_lru"] = OrderedDict()
        return state

    # -- files beside the features (used by stego_core.knn) --------------------------------------------------
    def has_file(self, name: str) -> bool:
        """Whether ``<store.path>/<name>`` exists."""
        return self._folder.exists(name)

    def save_array(self, name: str, arr: np.ndarray) -> None:
        """Write ``<store.path>/<name>`` (.npy) atomically."""
        self._folder.save_npy(name, arr)

    def load_array(self, name: str) -> np.ndarray:
        return self._folder.load_npy(name)

    def write_json(self, name: str, obj: Any) -> None:
        self._folder.write_json(name, obj)

    def read_json(self, name: str) -> Any:
        return self._folder.read_json(name)

    def remove_file(self, name: str) -> None:
        self._folder.remove(name)

    # -- reading ------------------------------------------------------------------------------------------------
    def _chunk(self, chunk: int) -> dict[str, np.ndarray]:
        if chunk in self._lru:
            self._lru.move_to_end(chunk)
            return self._lru[chunk]
        arrays = {a: self._folder.load_npy(_chunk_file(chunk, a), mmap=True) for a in ARRAYS}
        self._lru[chunk] = arrays
        while len(self._lru) > _LRU_CHUNKS:
            self._lru.popitem(last=False)
        return arrays

    def _indices(self, indices: Any) -> np.ndarray:
        if isinstance(indices, torch.Tensor):
            indices = indices.detach().cpu().numpy()
        if isinstance(indices, range):
            indices = np.arange(indices.start, indices.stop, indices.step, dtype=np.int64)
        idx = np.asarray(indices)
        if idx.ndim == 0:
            idx = idx.reshape(1)
        if idx.ndim != 1 or (idx.size and not np.issubdtype(idx.dtype, np.integer)):
            raise StegoError(f"indices: expected a 1-D sequence of integers, got an array of shape {idx.shape} "
                             f"and dtype {idx.dtype}")
        idx = idx.astype(np.int64)
        n = len(self)
        if idx.size and (idx.min() < -n or idx.max() >= n):
            bad = idx[(idx < -n) | (idx >= n)][0]
            raise StegoError(f"indices: item {bad} is out of range for a store of {n} items")
        return np.where(idx < 0, idx + n, idx)

    def read(self, indices: Any) -> dict[str, Any]:
        """Items ``indices`` (any order, repeats allowed) as ``dict(feats=float32 Tensor [n,C,h,w],
        label=int64 Tensor [n,res,res], image=uint8 ndarray [n,res,res,3], index=LongTensor [n])``."""
        idx = self._indices(indices)
        n, (gh, gw), res = idx.size, self.grid, self.res
        feats = torch.empty((n, self.dim, gh, gw), dtype=torch.float32)
        label = np.empty((n, res, res), dtype=np.int64)
        image = np.empty((n, res, res, 3), dtype=np.uint8)
        index = np.empty((n,), dtype=np.int64)
        chunk_of, row_of = np.divmod(idx, self.chunk_size)
        for chunk in np.unique(chunk_of):
            where = np.nonzero(chunk_of == chunk)[0]  # positions in the output
            rows = row_of[where]  # rows inside the chunk
            arrays = self._chunk(int(chunk))
            half = torch.from_numpy(np.ascontiguousarray(arrays["feats"][rows]))  # float16 [len(where),C,h,w]
            if where[-1] - where[0] + 1 == where.size:  # a run of consecutive outputs (reading in order)
                feats[where[0]:where[-1] + 1].copy_(half)  # copy_ converts float16 -> float32 (fast in torch)
            else:
                feats.index_copy_(0, torch.from_numpy(where), half.float())
            label[where] = arrays["label"][rows]
            image[where] = arrays["image"][rows]
            index[where] = arrays["index"][rows]
        return {"feats": feats, "label": torch.from_numpy(label), "image": image,
                "index": torch.from_numpy(index)}

    def iter_batches(self, batch_size: int, *, shuffle: bool = False, seed: int = 0,
                     drop_last: bool = False) -> Iterator[dict[str, Any]]:
        """Yield ``read`` dicts of ``batch_size`` items: in store order, or in a permutation drawn from ``seed``."""
        return iter_store_batches(self, batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last)

    def feats_all(self, *, max_gib: float = 8.0) -> torch.Tensor:
        """All features as one float32 Tensor [N,C,h,w] (for small stores, e.g. fitting PCA)."""
        gib = len(self) * self.dim * self.grid[0] * self.grid[1] * 4 / 2**30
        if gib > max_gib:
            raise StegoError(f"max_gib: the store's features take {gib:.1f} GiB as float32, more than {max_gib}; "
                             f"read them with iter_batches or raise max_gib")
        return self.read(np.arange(len(self)))["feats"]


def _describe_incomplete(folder: _Folder, meta: dict | None) -> str:
    if meta is None:
        return "it has no meta.json yet"
    n_chunks = -(-int(meta["n_items"]) // int(meta["chunk_size"]))
    done = sum(folder.exists(_chunk_file(c, ARRAYS[-1])) for c in range(n_chunks))
    return f"{done} of {n_chunks} chunks written, no COMPLETE marker"


def open_store(path: str | os.PathLike) -> FeatureStore:
    """Open a finished feature store (a local folder or fsspec URL); StegoError if it is missing or incomplete."""
    folder = _Folder(path)
    hint = "build it with stego_core.cache.cache_features(...) (notebook 01); a rerun resumes where it stopped"
    if not folder.exists(META_FILE) and not folder.exists(COMPLETE_FILE):
        raise StegoError(f"path: no feature store at {folder.path}; {hint}")
    meta = folder.read_json(META_FILE) if folder.exists(META_FILE) else None
    if meta is None or not folder.exists(COMPLETE_FILE):
        raise StegoError(f"path: the feature store at {folder.path} is incomplete "
                         f"({_describe_incomplete(folder, meta)}); {hint}")
    if meta.get("store_version") != STORE_VERSION:
        raise StegoError(f"path: the feature store at {folder.path} has format version {meta.get('store_version')}, "
                         f"expected {STORE_VERSION}; delete it and rebuild it with cache_features")
    return FeatureStore(folder, meta)


# ----------------------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------------------
def _store_folder(name: str, cfg: dict, root: str | os.PathLike | None, *, create: bool = True) -> _Folder:
    """The keyed store folder under ``root``, after proving that ``root`` can be written (``create``; else the
    folder is only named, for a store that must exist already)."""
    if _is_url(root) and not str(root).startswith("file://"):
        url = f"{str(root).rstrip('/')}/{STAGES['features']}/{name}-{config_hash(cfg)}"
        folder = _Folder(url)
        if not create:
            return folder
        try:
            folder.makedirs()
            folder.write_json(".write-test.json", {})
            folder.remove(".write-test.json")
        except Exception as exc:  # noqa: BLE001 - any backend error means "cannot write there"
            raise StegoError(f"root: cannot write to {root} ({type(exc).__name__}: {exc}); "
                             f"pass a writable folder or fsspec URL") from None
        return folder
    base = artifacts_root(str(root)[len("file://"):] if _is_url(root) else root)
    folder = _Folder(base / STAGES["features"] / f"{name}-{config_hash(cfg)}")
    if create:
        ensure_writable(base, "root")
        ensure_writable(folder.root, "root")
    return folder


def _resolve_dataset(dataset: Any, split: str | None, res: int | None, crop: str, options: dict,
                     data_root: Any) -> tuple[Any, str, str, int]:
    """(dataset object, name, split, res) from a registry name or a ready dataset object."""
    if isinstance(dataset, str):
        if dataset not in DATASETS:
            raise StegoError(f"dataset: unknown dataset {dataset!r}; expected one of {', '.join(map(repr, DATASETS))}")
        res = 224 if res is None else check_int("res", res, minimum=1)
        if split is None:
            raise StegoError("split: expected a split name such as 'train' or 'val', got None")
        ds = load_dataset(dataset, split, res=res, crop=crop, root=data_root, **options)
        return ds, dataset, split, res
    if not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
        raise StegoError(f"dataset: expected a dataset name or a Dataset object, got {type(dataset).__name__}")
    name = str(getattr(dataset, "name", type(dataset).__name__))
    own_split, own_res = getattr(dataset, "split", None), getattr(dataset, "res", None)
    if split is not None and own_split is not None and split != own_split:
        raise StegoError(f"split: {split!r} differs from the dataset object's split {own_split!r}")
    if res is not None and own_res is not None and res != own_res:
        raise StegoError(f"res: {res} differs from the dataset object's res {own_res}")
    split = split if split is not None else (own_split or "all")
    res = res if res is not None else own_res
    if res is None:
        res = int(dataset[0]["label"].shape[-1])
    return dataset, name, str(split), int(res)


def _to_rgb_uint8(img: torch.Tensor) -> np.ndarray:
    """ImageNet-normalised [B,3,H,W] -> uint8 RGB [B,H,W,3] (rounded, so a uint8 source image comes back exactly)."""
    rgb = (unnormalize(img.float().cpu()).clamp(0, 1) * 255).round().to(torch.uint8)
    return rgb.permute(0, 2, 3, 1).numpy()  # [B,3,H,W] -> [B,H,W,3]


def _compute_chunk(dataset: Any, backbone: Any, start: int, stop: int, *, batch_size: int, num_workers: int,
                   device: str | torch.device, amp: bool) -> dict[str, np.ndarray]:
    """Run the backbone over items [start, stop) and return the chunk's four arrays."""

    loader = DataLoader(Subset(dataset, range(start, stop)), batch_size=batch_size, shuffle=False,
                        num_workers=num_workers)
    parts: dict[str, list[np.ndarray]] = {a: [] for a in ARRAYS}
    for batch in loader:
        img, label = batch["img"], batch["label"]
        feats = extract_features(backbone, img.to(device), amp=amp).float().cpu()
        if feats.ndim != 4 or feats.shape[0] != img.shape[0]:
            raise StegoError(f"backbone: expected features [B,C,h,w] for {img.shape[0]} images, "
                             f"got shape {tuple(feats.shape)}")
        half = feats.numpy().astype(np.float16)
        if not np.isfinite(half).all():
            raise StegoError("backbone: features overflow float16 (|value| > 65504) or are not finite; "
                             "the store keeps float16 features")
        lab = label.numpy()
        if lab.size and (lab.min() < np.iinfo(np.int16).min or lab.max() > np.iinfo(np.int16).max):
            raise StegoError("dataset: labels do not fit int16; expected class ids in [-1, 32767]")
        parts["feats"].append(half)
        parts["label"].append(lab.astype(np.int16))
        parts["image"].append(_to_rgb_uint8(img))
        parts["index"].append(np.asarray(batch["index"], dtype=np.int64).reshape(-1))
    return {a: np.concatenate(parts[a]) for a in ARRAYS}


def _check_res_fits(res: Any, backbone: Any) -> None:
    """StegoError naming ``res`` unless it is a multiple of the backbone's stride (its patch size for a ViT)."""
    res = check_int("res", res, minimum=1)
    stride = BACKBONES[backbone].stride if isinstance(backbone, str) else getattr(backbone, "stride", None)
    if isinstance(stride, int) and stride > 0 and res % stride:
        name = backbone if isinstance(backbone, str) else getattr(backbone, "name", type(backbone).__name__)
        below, above = max(stride, res - res % stride), res - res % stride + stride
        raise StegoError(f"res: {res} px is not a multiple of {stride}, the patch size of {name}; "
                         f"expected a multiple such as {below} or {above}")


def cache_features(dataset: Any, split: str | None, backbone: Any, *, res: int | None = None,
                   crop: str = "center", weights: str | None = None, dataset_options: dict | None = None,
                   data_root: str | os.PathLike | None = None, root: str | os.PathLike | None = None,
                   chunk_size: int = 64, batch_size: int = 16, device: str | torch.device = "cpu",
                   amp: bool = False, num_workers: int = 0, progress: bool = True, build: bool = True) -> FeatureStore:
    """Compute (or finish) the feature store of one dataset split and backbone, and return it opened.

    dataset: a registry name (``stego_core.data.DATASETS``) or a dataset object yielding the item dict
        (``img``, ``label``, ``index``); objects are keyed by their ``name``/``split``/``res`` and length.
    split: the split for a named dataset; for an object ``None`` takes the object's own ``split``.
    backbone: a registry name (``stego_core.backbones.BACKBONES``, loaded only if work is left) or a backbone
        module with ``.dim`` and ``.stride``; keyed by its ``name``.
    res: image size; None = 224 for a named dataset, the object's ``res`` for a dataset object.
    crop, dataset_options, data_root: passed to ``load_dataset`` (data_root is where the data lives; not keyed).
    weights: backbone weights for ``load_backbone`` (None = default, "random", or a file); keyed, together with
        ``weights_source`` (which file that is, ``stego_core.backbones.weights_source``; a backbone module's own
        ``weights_source``), which ``meta.json`` keeps.
    root: artifacts root (local folder or fsspec URL); None = ``$STEGO_ARTIFACTS`` or ``<repo>/artifacts``.
    chunk_size: items per chunk file (the unit of resuming); batch_size: images per backbone call.
    device, amp: where the backbone runs and whether ``extract_features`` uses mixed precision (amp is keyed,
        since it changes the numbers). num_workers: DataLoader workers for reading the images.
    build: False only opens a finished store: a missing one is a StegoError naming the feature-stage command that
        builds it (the downstream stages, which must not extract features of their own).
    """
    check_int("chunk_size", chunk_size, minimum=1)
    check_int("batch_size", batch_size, minimum=1)
    check_int("num_workers", num_workers, minimum=0)
    if dataset_options is not None and not isinstance(dataset_options, dict):
        raise StegoError(f"dataset_options: expected a dict of dataset options, got {type(dataset_options).__name__}")
    options = dict(dataset_options or {})
    if isinstance(backbone, str):
        if backbone not in BACKBONES:
            raise StegoError(f"backbone: unknown backbone {backbone!r}; expected one of "
                             f"{', '.join(map(repr, BACKBONES))}")
        backbone_name = backbone
        source = weights_source(backbone, weights)
    elif isinstance(backbone, torch.nn.Module) and hasattr(backbone, "dim") and hasattr(backbone, "stride"):
        backbone_name = str(getattr(backbone, "name", type(backbone).__name__))
        source = str(getattr(backbone, "weights_source", None) or getattr(backbone, "weights", None) or weights)
    else:
        raise StegoError(f"backbone: expected a backbone name or a module with .dim and .stride, "
                         f"got {type(backbone).__name__}")
    if isinstance(dataset, str) and res is not None:  # the backbone sees res x res images: whole patches only
        _check_res_fits(res, backbone)
    ds, ds_name, split, res = _resolve_dataset(dataset, split, res, crop, options, data_root)
    n_items = len(ds)
    if n_items < 1:
        raise StegoError(f"dataset: {ds_name}/{split} has no items; expected at least one")

    cfg = {"store_version": STORE_VERSION, "dataset": ds_name, "split": split, "backbone": backbone_name,
           "weights": None if weights is None else str(weights), "weights_source": source, "res": res, "crop": crop,
           "dataset_options": options, "amp": bool(amp), "n_items": n_items, "dtype": "float16"}
    if getattr(ds, "version", None) is not None:  # a generated dataset (mosaic) whose scenes changed: new key
        cfg["data_version"] = int(ds.version)
    folder = _store_folder(f"{ds_name}-{split}-{backbone_name}-{res}", cfg, root, create=build)
    if folder.exists(COMPLETE_FILE):
        return open_store(folder.path)
    if not build:
        prefix = "val_" if split == "val" else ""
        command = stage_command("01_features", {
            "dataset": ds_name, "backbone": backbone_name, "weights": cfg["weights"], f"{prefix}res": res,
            f"{prefix}crop": crop, "dataset_options": options or None,
            "root": None if root is None else str(root)})
        raise StegoError(f"{split}: no finished feature store of {ds_name}/{split} with {backbone_name} at {res} px "
                         f"(crop {crop!r}) under {folder.path}; the feature stage builds it: {command}")

    if not folder.local:  # object storage has no file locks: one writer per store is the caller's business
        _write_store(folder, cfg, ds, backbone, weights, data_root, n_items, chunk_size, batch_size, num_workers,
                     device, amp, progress)
        return open_store(folder.path)
    with artifact_lock(folder.root, f"the feature store {ds_name}/{split}"):
        if not folder.exists(COMPLETE_FILE):  # another process may have finished it while we waited
            _write_store(folder, cfg, ds, backbone, weights, data_root, n_items, chunk_size, batch_size,
                         num_workers, device, amp, progress)
    return open_store(folder.path)


def _store_bytes(meta: dict) -> int:
    """The whole store's size by the cost model (stego_core.costs.store_item_bytes)."""
    return int(meta["n_items"]) * store_item_bytes(int(meta["dim"]), int(meta["grid"][0]) * int(meta["grid"][1]),
                                                   int(meta["res"]))


def _write_store(folder: _Folder, cfg: dict, ds: Any, backbone: Any, weights: Any, data_root: Any, n_items: int,
                 chunk_size: int, batch_size: int, num_workers: int, device: Any, amp: bool, progress: bool) -> None:
    """Compute the missing chunks of a store and mark it COMPLETE (the caller holds its lock)."""
    ds_name, split = cfg["dataset"], cfg["split"]
    meta = folder.read_json(META_FILE) if folder.exists(META_FILE) else None
    if meta is not None and int(meta["chunk_size"]) != chunk_size:
        warnings.warn(f"chunk_size: the unfinished store at {folder.path} uses chunk_size {meta['chunk_size']}; "
                      f"resuming with that instead of {chunk_size}", stacklevel=2)
        chunk_size = int(meta["chunk_size"])
    n_chunks = -(-n_items // chunk_size)
    todo = [c for c in range(n_chunks) if not folder.exists(_chunk_file(c, ARRAYS[-1]))]
    if meta is not None and todo:
        note(f"resuming the feature store {ds_name}/{split} at chunk {todo[0] + 1} of {n_chunks} "
             f"({n_chunks - len(todo)} done) in {folder.path}")

    if todo:
        if isinstance(backbone, str):
            backbone = load_backbone(backbone, weights, device=device)
        else:
            backbone = backbone.to(device)
        bar = tqdm(total=n_chunks, initial=n_chunks - len(todo), desc=f"caching {ds_name}/{split}", unit="chunk",
                   disable=not progress)
        t0, done_items = time.perf_counter(), 0
        for chunk in todo:
            start, stop = chunk * chunk_size, min(n_items, (chunk + 1) * chunk_size)
            arrays = _compute_chunk(ds, backbone, start, stop, batch_size=batch_size, num_workers=num_workers,
                                    device=device, amp=amp)
            feats = arrays["feats"]
            if meta is None:  # first chunk of a fresh store: now the feature shape is known
                meta = {**cfg, "config_hash": config_hash(cfg), "chunk_size": chunk_size,
                        "dim": int(feats.shape[1]), "grid": [int(feats.shape[2]), int(feats.shape[3])],
                        "stride": getattr(backbone, "stride", None), "n_classes": int(getattr(ds, "n_classes", 0)),
                        "class_names": [str(c) for c in getattr(ds, "class_names", [])],
                        "palette": (None if getattr(ds, "palette", None) is None
                                    else np.asarray(ds.palette).astype(int).tolist()),
                        "data_root": None if data_root is None else str(data_root),
                        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
                with disk_full_guard(folder.path, _store_bytes(meta), f"the feature store {ds_name}/{split}"):
                    folder.write_json(META_FILE, meta)
            elif [feats.shape[1], *feats.shape[2:]] != [meta["dim"], *meta["grid"]]:
                raise StegoError(f"backbone: chunk {chunk} has features {tuple(feats.shape[1:])} but the store at "
                                 f"{folder.path} holds [{meta['dim']},{meta['grid'][0]},{meta['grid'][1]}]")
            with disk_full_guard(folder.path, _store_bytes(meta), f"the feature store {ds_name}/{split}"):
                for a in ARRAYS:  # index last: its presence marks the chunk as complete
                    folder.save_npy(_chunk_file(chunk, a), arrays[a])
            done_items += stop - start
            bar.update(1)
            bar.set_postfix_str(f"{done_items / max(time.perf_counter() - t0, 1e-9):.1f} img/s")
        bar.close()

    folder.clean_temporaries(CHUNK_DIR)
    folder.clean_temporaries("")
    folder.write_json(COMPLETE_FILE, {"n_items": n_items, "n_chunks": n_chunks,
                                      "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
