"""Dimension-reduction baselines of the study (PCA, Gaussian random projection, h-NNE, identity) as estimators.

Spec §8.3 (stego-studies ``mxm_dimred.py``), §10 quirk 15. Every projection follows the scikit-learn estimator
contract: ``__init__`` only stores its arguments, ``fit(X)`` on token vectors ``X [N, C]`` returns ``self``, fitted
attributes end in ``_``, randomness comes through ``random_state``. The maths is scikit-learn's (``StandardScaler``,
``PCA``, ``GaussianRandomProjection``) and the ``hnne`` package's; nothing is re-derived here.

Fitting (all methods): standardise every channel with its mean and population std (``StandardScaler``: ``mean_``,
``scale_``; a zero-variance channel gets scale 1), then fit the reducer on the standardised tokens.

- ``PCAProjection``: scikit-learn ``PCA`` with *all* components kept (``pca_``; ``explained_variance_ratio_`` is the
  full vector the study logs for Figure 3), ``components_`` = the first ``n_components`` principal axes [k, C].
- ``RandomProjection``: scikit-learn ``GaussianRandomProjection(k)``: dense ``components_`` [k, C] with i.i.d.
  N(0, 1/k) entries; the data only fix C. The study left ``random_state`` unset (numpy's global RNG, seeded 0);
  here it is an explicit argument (default 0). ``k > C`` is allowed (it is still a well-defined random map).
- ``HNNEProjection``: ``hnne.HNNE`` fitted on the standardised tokens (the study: a 1e6-token sample, see
  ``fit_projection``). The study used h-NNE v1 (``HNNE(dim=k, metric="cosine")``); the installed v2.0.1 renamed
  ``dim`` to ``n_components`` and changed the defaults: ``radius`` 0.45 -> 0.4, ``ann_threshold`` 40000 -> 20000, and
  a new packing-aware pipeline ``hnne_version="version_2"``. Our defaults restore the v1 behaviour
  (``hnne_version="v1"``, radius 0.45, ann_threshold 40000); pass the v2 values to get the new algorithm. v2's
  ``HNNE.fit`` returns the projection rather than the estimator; we keep the fitted object as ``hnne_``. h-NNE is
  non-linear (nearest-anchor placement), so it has no ``components_``; it runs on the CPU in numpy.
- ``IdentityProjection``: the DINO baseline: code = raw features (C channels, ``n_components`` ignored).

Transform ``transform(feats [B, C, h, w]) -> [B, k, h, w]`` float32 (tensor in -> tensor on the same device;
ndarray in -> ndarray), or ``transform_tokens(X [N, C]) -> [N, k]``:

- ``standardize="per_batch"`` (the study's protocol, quirk 15): the tokens of the batch being transformed are
  standardised with the batch's *own* per-channel mean and population std, exactly as the original. A channel that
  is constant over the batch: PCA divides by its zero std (the study's PCA forward is plain torch, no epsilon, so
  inf/NaN as there; never seen with real backbone features, but a batch of one token always does it, so don't
  project single tokens this way), while RP and h-NNE give it scale 1, i.e. the value 0 (the study standardised
  their batches with scikit-learn's ``StandardScaler().fit_transform``). The projected code therefore depends on the
  batch composition (validation batches of 8, training 32/16, h-NNE caches 512).
- ``standardize="train"`` (corrected): the fitted ``mean_`` / ``scale_`` are used, so each token maps the same way in
  every batch; zero-variance channels are guarded by StandardScaler's scale 1.
Then the standardised tokens are multiplied by the first k axes (``X @ components_.T``, no further centring: PCA's
own mean is ~0 on standardised data and the original ignores it too). The original's RP output dtype followed
scikit-learn (float64 on old versions); here codes are always float32.

Helpers: ``make_projection(method, k, **kw)`` (registry ``PROJECTIONS``: "pca", "rp", "hnne", "identity"),
``fit_projection(method, k, store, ...)`` (fit on a seeded random sample of ``n_images`` items of a feature store,
optional token sample and on-disk cache; the one function that fits), ``fitted_projections(method, root)`` (the
cached fits, read back for the figures), ``project_store(proj, store, root)`` (precompute projected features into a
resumable store — ``ProjectedStore`` — used for h-NNE, whose on-the-fly transform is too slow for training; the
batches are random mixes of the store, as the study's were of its shuffled cache).
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import pickle
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.base import BaseEstimator
from sklearn.decomposition import PCA
from sklearn.exceptions import DataDimensionalityWarning
from sklearn.preprocessing import StandardScaler
from sklearn.random_projection import GaussianRandomProjection
from tqdm.auto import tqdm

from .cache import iter_store_batches
from .config import (
    StegoError,
    artifact_dir,
    atomic_write,
    check_choice,
    check_int,
    config_hash,
    stage_root,
    write_json_atomic,
)
from .guards import artifact_lock, note

__all__ = [
    "STANDARDIZE", "PROJECTIONS", "PCAProjection", "RandomProjection", "HNNEProjection", "IdentityProjection",
    "make_projection", "transform_many", "fit_projection", "fit_items", "fitted_projections", "project_store",
    "open_projected_store", "ProjectedStore",
]

STANDARDIZE = ("per_batch", "train")
# h-NNE fitting sample of the study (hnne_conf num_tokens_limit 1e6).
HNNE_STUDY_TOKENS = 1_000_000


# ----------------------------------------------------------------------------------------------------------------------
# input handling


def _as_tokens(X: Any, param: str = "X") -> np.ndarray:
    """Token matrix [N, C] as a float ndarray (float32 stays float32, other dtypes become float64)."""
    if isinstance(X, torch.Tensor):
        X = X.detach().cpu().numpy()
    try:
        X = np.asarray(X)
    except Exception:  # noqa: BLE001 - anything that numpy cannot read is bad input
        raise StegoError(f"{param}: expected an array [N, C] of token vectors, got {type(X).__name__}") from None
    if X.ndim != 2 or X.shape[0] < 1 or X.shape[1] < 1:
        raise StegoError(f"{param}: expected an array [N, C] of token vectors, got shape {tuple(X.shape)}")
    if not np.issubdtype(X.dtype, np.number) or np.issubdtype(X.dtype, np.complexfloating):
        raise StegoError(f"{param}: expected real numbers, got dtype {X.dtype}")
    if X.dtype != np.float32:
        X = X.astype(np.float64)
    return X


def _feats_to_tokens(feats: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """[B, C, h, w] -> tokens [B*h*w, C] plus (B, h, w) to fold back."""
    b, c, h, w = feats.shape
    tokens = feats.permute(0, 2, 3, 1).reshape(b * h * w, c)  # [B,C,h,w] -> [B,h,w,C] -> [B*h*w, C]
    return tokens, (b, h, w)


def _tokens_to_feats(tokens: torch.Tensor, bhw: tuple[int, int, int]) -> torch.Tensor:
    """tokens [B*h*w, k] -> [B, k, h, w]."""
    b, h, w = bhw
    return tokens.reshape(b, h, w, -1).permute(0, 3, 1, 2).contiguous()  # [B*h*w,k] -> [B,h,w,k] -> [B,k,h,w]


# ----------------------------------------------------------------------------------------------------------------------
# estimators


class _Projection(BaseEstimator):
    """Shared standardisation and transform plumbing; subclasses fit ``_fit_reducer`` and ``_project``."""

    method = ""

    def _check_params(self) -> None:
        check_int("n_components", self.n_components, minimum=1)
        check_choice("standardize", self.standardize, STANDARDIZE)

    def fit(self, X: Any, y: Any = None) -> _Projection:
        """Fit on token vectors X [N, C]: per-channel standardisation, then the reducer. Returns self."""
        return self._fit_tokens(X, copy=True)

    def _fit_tokens(self, X: Any, *, copy: bool) -> _Projection:
        """``fit``; with copy=False a float array X is standardised in place (saves one copy of millions of tokens)."""
        self._check_params()
        X = _as_tokens(X)
        if X.shape[0] < 2:
            raise StegoError(f"X: need at least 2 token vectors to fit {type(self).__name__}, got {X.shape[0]}")
        scaler = StandardScaler(copy=copy)
        Xs = scaler.fit_transform(X)
        self.mean_ = scaler.mean_.astype(np.float32)
        self.scale_ = scaler.scale_.astype(np.float32)  # population std; 1 where a channel is constant
        self.n_features_in_ = X.shape[1]
        self._torch_cache = {}
        self._fit_reducer(Xs)
        return self

    # --- subclass hooks
    def _fit_reducer(self, Xs: np.ndarray) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _project(self, Z: torch.Tensor) -> torch.Tensor:
        """Standardised tokens [N, C] -> [N, k] (default: linear map with ``components_``)."""
        comp = self._torch(  # [k, C]
            "components_", Z.device, Z.dtype)
        return Z @ comp.T  # [N, C] @ [C, k] -> [N, k]

    # --- shared
    def _torch(self, name: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        cache = self.__dict__.setdefault("_torch_cache", {})
        key = (name, str(device), dtype)
        if key not in cache:
            cache[key] = torch.as_tensor(np.asarray(getattr(self, name)), device=device, dtype=dtype)
        return cache[key]

    def _check_fitted(self) -> None:
        if not hasattr(self, "mean_"):
            raise StegoError(f"{type(self).__name__}: not fitted yet; call fit(X) on token vectors [N, C] first")

    # per-batch standardisation of a channel constant over the batch: False divides by its zero std (the study's
    # torch PCA forward), True gives it scale 1 like scikit-learn's StandardScaler (the study's RP / h-NNE forward)
    _constant_scale_one = False

    def _standardize(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.standardize == "per_batch":
            # The study: the batch's own statistics, population std (quirk 15).
            mean = tokens.mean(dim=0, keepdim=True)  # [1, C]
            std = tokens.std(dim=0, unbiased=False, keepdim=True)  # [1, C]
            if self._constant_scale_one:
                lo = tokens.amin(dim=0, keepdim=True)  # [1, C]
                constant = lo == tokens.amax(dim=0, keepdim=True)  # [1, C]
                # StandardScaler: scale 1 and (in float64) the exact mean, so the channel becomes exactly 0
                mean = torch.where(constant, lo, mean)
                std = torch.where(constant, torch.ones_like(std), std)
            return (tokens - mean) / std
        return (tokens - self._torch("mean_", tokens.device, tokens.dtype)) / self._torch(
            "scale_", tokens.device, tokens.dtype)

    def _transform_token_tensor(self, tokens: torch.Tensor) -> torch.Tensor:
        self._check_fitted()
        check_choice("standardize", self.standardize, STANDARDIZE)
        if tokens.shape[1] != self.n_features_in_:
            raise StegoError(f"feats: expected {self.n_features_in_} channels (as in fit), got {tokens.shape[1]}")
        tokens = tokens.float()
        return self._project(self._standardize(tokens)).float()

    def transform_tokens(self, X: Any) -> Any:
        """Token vectors [N, C] -> [N, k] float32 (the whole X counts as one batch for "per_batch")."""
        if isinstance(X, torch.Tensor):
            if X.ndim != 2:
                raise StegoError(f"X: expected token vectors [N, C], got shape {tuple(X.shape)}")
            return self._transform_token_tensor(X)
        X = _as_tokens(X)
        return self._transform_token_tensor(torch.from_numpy(np.ascontiguousarray(X))).numpy()

    def transform(self, feats: Any) -> Any:
        """feats [B, C, h, w] (Tensor or ndarray) -> code [B, k, h, w] float32 of the same kind (and device)."""
        is_numpy = not isinstance(feats, torch.Tensor)
        if is_numpy:
            try:
                feats = torch.from_numpy(np.ascontiguousarray(np.asarray(feats, dtype=np.float32)))
            except (TypeError, ValueError):
                raise StegoError(f"feats: expected a tensor or array [B, C, h, w], "
                                 f"got {type(feats).__name__}") from None
        if feats.ndim != 4:
            raise StegoError(f"feats: expected [B, C, h, w], got shape {tuple(feats.shape)}")
        tokens, bhw = _feats_to_tokens(feats)
        code = _tokens_to_feats(self._transform_token_tensor(tokens), bhw)
        return code.numpy() if is_numpy else code

    def fit_transform(self, X: Any, y: Any = None) -> Any:
        """fit(X) then transform_tokens(X)."""
        return self.fit(X).transform_tokens(X)

    @property
    def n_components_out(self) -> int:
        """Channels of the transformed code."""
        return int(self.n_components)

    def __getstate__(self) -> dict:
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__.copy()
        state = dict(state)
        state.pop("_torch_cache", None)  # device tensors are rebuilt on demand
        return state


class PCAProjection(_Projection):
    """Standardise, then the first ``n_components`` axes of scikit-learn's PCA (all components fitted).

    Fitted: ``mean_``, ``scale_`` [C]; ``pca_`` (sklearn PCA, all components); ``components_`` [k, C] float32;
    ``explained_variance_ratio_`` [min(N, C)] (the full vector, as logged for Figure 3).
    """

    method = "pca"

    def __init__(self, n_components: int, *, standardize: str = "per_batch"):
        self.n_components = n_components
        self.standardize = standardize

    def _fit_reducer(self, Xs: np.ndarray) -> None:
        if self.n_components > Xs.shape[1]:
            raise StegoError(f"n_components: PCA keeps at most C = {Xs.shape[1]} axes, got {self.n_components}")
        if self.n_components > Xs.shape[0]:
            raise StegoError(f"n_components: PCA on {Xs.shape[0]} token vectors keeps at most {Xs.shape[0]} axes, "
                             f"got {self.n_components}")
        # all components, no whitening, default solver (as the study); Xs is our own standardised copy
        self.pca_ = PCA(copy=False).fit(Xs)
        self.explained_variance_ratio_ = self.pca_.explained_variance_ratio_.copy()
        self._select(self.n_components)

    def _select(self, k: int) -> None:
        self.n_components = k
        self.components_ = self.pca_.components_[:k].astype(np.float32)
        self._torch_cache = {}

    def with_components(self, n_components: int) -> PCAProjection:
        """A fitted copy that keeps a different number of axes (PCA is fitted once for every k)."""
        self._check_fitted()
        check_int("n_components", n_components, minimum=1)
        if n_components > self.pca_.components_.shape[0]:
            raise StegoError(f"n_components: this PCA has {self.pca_.components_.shape[0]} axes, got {n_components}")
        other = copy.copy(self)
        other._select(n_components)
        return other


class RandomProjection(_Projection):
    """Standardise, then a dense Gaussian random map (scikit-learn GaussianRandomProjection, entries N(0, 1/k)).

    Fitted: ``mean_``, ``scale_`` [C]; ``rp_`` (the sklearn estimator); ``components_`` [k, C] float32.
    """

    method = "rp"
    _constant_scale_one = True  # the study standardised RP batches with StandardScaler

    def __init__(self, n_components: int, *, standardize: str = "per_batch", random_state: int | None = 0):
        self.n_components = n_components
        self.standardize = standardize
        self.random_state = random_state

    def _fit_reducer(self, Xs: np.ndarray) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DataDimensionalityWarning)  # k > C is allowed on purpose
            self.rp_ = GaussianRandomProjection(n_components=self.n_components,
                                                random_state=self.random_state).fit(Xs)
        self.components_ = np.asarray(self.rp_.components_, dtype=np.float32)


class HNNEProjection(_Projection):
    """Standardise, then h-NNE (package ``hnne``); defaults restore the v1 algorithm the study used.

    Fitted: ``mean_``, ``scale_`` [C]; ``hnne_`` (the fitted ``hnne.HNNE``). Transform runs in numpy on the CPU.
    """

    method = "hnne"
    _constant_scale_one = True  # the study standardised h-NNE batches with StandardScaler

    def __init__(self, n_components: int, *, standardize: str = "per_batch", metric: str = "cosine",
                 random_state: int | None = 0, hnne_version: str = "v1", radius: float = 0.45,
                 ann_threshold: int = 40_000, preliminary_embedding: str = "pca"):
        self.n_components = n_components
        self.standardize = standardize
        self.metric = metric
        self.random_state = random_state
        self.hnne_version = hnne_version      # study: v1 algorithm; "v2" = the packing-aware default of hnne 2.x
        self.radius = radius                  # v1 default 0.45 (v2: 0.4)
        self.ann_threshold = ann_threshold    # v1 default 40000 (v2: 20000)
        self.preliminary_embedding = preliminary_embedding

    def _fit_reducer(self, Xs: np.ndarray) -> None:
        from hnne import HNNE

        if self.n_components > Xs.shape[1]:
            raise StegoError(f"n_components: h-NNE maps to at most C = {Xs.shape[1]} dims, got {self.n_components}")
        try:
            est = HNNE(n_components=self.n_components, metric=self.metric, radius=self.radius,
                       ann_threshold=self.ann_threshold, preliminary_embedding=self.preliminary_embedding,
                       random_state=self.random_state, hnne_version=self.hnne_version)
        except ValueError as exc:
            raise StegoError(f"HNNEProjection: {exc}".replace("\n", " ")) from None
        est.fit(Xs)  # v2 API: returns the projection of Xs, the fitted state lives on ``est``
        self.hnne_ = est

    def _project(self, Z: torch.Tensor) -> torch.Tensor:
        out = self.hnne_.transform(Z.detach().cpu().numpy())
        return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32)).to(Z.device)


class IdentityProjection(_Projection):
    """The DINO baseline: code = raw features (``n_components`` ignored; the code has C channels)."""

    method = "identity"

    def __init__(self, n_components: int | None = None, *, standardize: str = "per_batch"):
        self.n_components = n_components
        self.standardize = standardize

    def _check_params(self) -> None:
        if self.n_components is not None:
            check_int("n_components", self.n_components, minimum=1)

    def _fit_tokens(self, X: Any, *, copy: bool) -> IdentityProjection:
        """Only records C (the raw features are the code)."""
        self._check_params()
        X = _as_tokens(X)
        self.n_features_in_ = X.shape[1]
        self.mean_ = np.zeros(X.shape[1], np.float32)  # unused; present so fitted checks agree
        self.scale_ = np.ones(X.shape[1], np.float32)
        return self

    def _transform_token_tensor(self, tokens: torch.Tensor) -> torch.Tensor:
        self._check_fitted()
        if tokens.shape[1] != self.n_features_in_:
            raise StegoError(f"feats: expected {self.n_features_in_} channels (as in fit), got {tokens.shape[1]}")
        return tokens.float()

    @property
    def n_components_out(self) -> int:
        self._check_fitted()
        return int(self.n_features_in_)


PROJECTIONS: dict[str, type[_Projection]] = {
    "pca": PCAProjection,
    "rp": RandomProjection,
    "hnne": HNNEProjection,
    "identity": IdentityProjection,
}


def make_projection(method: str, k: int | None, **kw: Any) -> _Projection:
    """An unfitted projection by name ("pca", "rp", "hnne", "identity") keeping ``k`` channels."""
    check_choice("method", method, PROJECTIONS)
    if method != "identity":
        check_int("k", k, minimum=1)
    try:
        proj = PROJECTIONS[method](k, **kw)
    except TypeError as exc:
        raise StegoError(f"make_projection: bad option for {method!r} ({exc})") from None
    if "standardize" in kw:
        check_choice("standardize", kw["standardize"], STANDARDIZE)
    return proj


def transform_many(projections: Sequence[_Projection], feats: torch.Tensor) -> list[torch.Tensor]:
    """``[p.transform(feats) for p in projections]`` for a fused sweep, cheaper: PCA / RP projections that share
    their standardisation (kind, mode and fitted statistics) standardise the tokens once and project them with one
    matmul: the stacked components, or, for PCA at several k of one fit, the widest k's axes sliced per k. Equal to
    the separate transforms up to float rounding. feats [B,C,h,w] tensor -> codes [B,k_i,h,w]."""
    tokens, bhw = _feats_to_tokens(feats)  # [B*h*w, C]
    tokens = tokens.float()
    out: list[torch.Tensor | None] = [None] * len(projections)
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(projections):
        if type(p) in (PCAProjection, RandomProjection):
            p._check_fitted()
            key = (type(p), p.standardize, p.n_features_in_, np.asarray(p.mean_).tobytes(),
                   np.asarray(p.scale_).tobytes())
            groups.setdefault(key, []).append(i)
        else:
            out[i] = torch.as_tensor(p.transform(feats)).float()
    for idxs in groups.values():
        first = projections[idxs[0]]
        if tokens.shape[1] != first.n_features_in_:
            raise StegoError(f"feats: expected {first.n_features_in_} channels (as in fit), got {tokens.shape[1]}")
        z = first._standardize(tokens)  # [N, C]
        comps = [np.asarray(projections[i].components_) for i in idxs]  # each [k_i, C]
        widest = max(comps, key=len)
        nested = all(np.array_equal(c, widest[: len(c)]) for c in comps)
        stacked = widest if nested else np.concatenate(comps)  # [K, C]
        codes = z @ torch.as_tensor(stacked, device=z.device, dtype=z.dtype).T  # [N, C] @ [C, K] -> [N, K]
        start = 0
        for i, c in zip(idxs, comps):
            out[i] = _tokens_to_feats(codes[:, start:start + len(c)], bhw)  # [N, k_i] -> [B, k_i, h, w]
            start += 0 if nested else len(c)
    return out  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------------------------------
# fitting on a feature store


def _store_geometry(store: Any) -> tuple[int, int, int, int]:
    """(n_items, C, h, w) of a FeatureStore (from its meta, else from one read)."""
    meta = getattr(store, "meta", {}) or {}
    n = len(store)
    if "dim" in meta and "grid" in meta:
        h, w = meta["grid"]
        return n, int(meta["dim"]), int(h), int(w)
    feats = store.read([0])["feats"]
    return n, int(feats.shape[1]), int(feats.shape[2]), int(feats.shape[3])


def fit_items(n_items: int, n_images: int, item_seed: int = 0) -> np.ndarray:
    """The store items a projection is fitted on: all of them when ``n_images >= n_items``, else a seeded random
    sample of ``n_images`` (sorted; the first ``n_images`` of a permutation drawn from ``item_seed``).

    The study fitted on "the first 5,000 images" of a training cache written in shuffled order, i.e. on a random
    subset; taking items 0..N-1 of our stores (which keep dataset order) would fit on the first source images of a
    five-crop tree or on a handful of Cityscapes cities instead.
    """
    check_int("n_images", n_images, minimum=1)
    if n_images >= n_items:
        return np.arange(n_items)
    return np.sort(np.random.default_rng(item_seed).permutation(n_items)[:n_images])


def _store_tokens(store: Any, items: np.ndarray, n_tokens: int | None, random_state: int, *,
                  chunk: int = 64, progress: bool = False) -> np.ndarray:
    """Tokens [N, C] float32 of the store items ``items``, optionally a uniform sample of ``n_tokens`` of them.

    The sample is drawn without replacement over all len(items)*h*w tokens (torch.randperm, seeded by
    ``random_state``) and gathered chunk by chunk, so only the sample is ever held in memory.
    """
    _, c, h, w = _store_geometry(store)
    n_img = len(items)
    total = n_img * h * w
    if n_tokens is not None and n_tokens < total:
        gen = torch.Generator().manual_seed(int(random_state))
        chosen = np.sort(torch.randperm(total, generator=gen)[:n_tokens].numpy())
    else:
        chosen = None
    out = np.empty((total if chosen is None else len(chosen), c), np.float32)
    filled = 0
    per_img = h * w
    for start in tqdm(range(0, n_img, chunk), desc="reading features", disable=not progress):
        stop = min(start + chunk, n_img)
        feats = store.read(items[start:stop])["feats"]
        tokens, _ = _feats_to_tokens(torch.as_tensor(feats).float())  # [n*h*w, C], row = (image, y, x)
        tokens = tokens.numpy()
        if chosen is None:
            out[filled:filled + len(tokens)] = tokens
            filled += len(tokens)
        else:
            lo, hi = np.searchsorted(chosen, [start * per_img, stop * per_img])
            rows = chosen[lo:hi] - start * per_img
            out[filled:filled + len(rows)] = tokens[rows]
            filled += len(rows)
    return out[:filled]


def _fit_key(method: str, k: int | None, store: Any, n_images: int, n_tokens: int | None, random_state: int,
             kw: Mapping[str, Any], item_seed: int = 0) -> dict:
    meta = getattr(store, "meta", {}) or {}
    key = {"method": method, "k": k, "store": str(getattr(store, "path", "")), "n_images": n_images,
           "items": f"random sample, seed {item_seed}", "n_tokens": n_tokens, "random_state": random_state,
           "options": dict(kw),
           "source": {name: meta.get(name) for name in ("dataset", "split", "backbone", "res", "crop", "n_items")}}
    if method == "pca":  # one PCA serves every k; standardize only matters at transform time
        key["k"] = None
        key["options"] = {n: v for n, v in kw.items() if n != "standardize"}
        key["random_state"] = None
    return key


def fit_projection(method: str, k: int | None, store: Any, *, n_images: int = 5000, n_tokens: int | None = None,
                   random_state: int = 0, item_seed: int = 0, root: str | os.PathLike | None = None,
                   progress: bool = False, **kw: Any) -> _Projection:
    """Fit a projection on ``n_images`` items of a FeatureStore drawn at random (study: 5000 cached training images).

    The items are ``fit_items(len(store), n_images, item_seed)``: a seeded random sample, like the first 5,000
    images of the study's training cache, which was written in shuffled order (one fixed shuffle, so every method
    and k of a store sees the same images; ``item_seed`` picks it).
    ``n_tokens``: fit on a uniform sample of that many tokens (None = all; h-NNE: None means the study's 1e6). The
    sample is drawn from ``random_state`` for every fit (the study seeded once per script, so each k of its loop
    saw a different subset).
    ``random_state`` seeds RP's matrix, h-NNE and the token sample. With ``root``, the fitted estimator is cached at
    ``<root>/projections/<method>-<hash>/projection.pkl`` (PCA once for every k) and reused.
    Other keywords go to the estimator (``standardize``, h-NNE options).
    """
    check_choice("method", method, PROJECTIONS)
    check_int("n_images", n_images, minimum=1)
    check_int("item_seed", item_seed, minimum=0)
    if n_tokens is not None:
        check_int("n_tokens", n_tokens, minimum=2)
    if method == "hnne" and n_tokens is None:
        n_tokens = HNNE_STUDY_TOKENS
    if method in ("rp", "hnne"):
        kw.setdefault("random_state", random_state)
    proj = make_projection(method, k, **kw)
    if len(store) < 1:
        raise StegoError(f"store: {getattr(store, 'path', store)} holds no items to fit {method} on")

    cache_file = None
    if root is not None:
        key = _fit_key(method, k, store, n_images, n_tokens, random_state, kw, item_seed)
        cache_file = artifact_dir("projections", method, key, root) / "projection.pkl"
        if cache_file.exists():
            with open(cache_file, "rb") as fh:
                cached = pickle.load(fh)
            if method == "pca":
                cached = cached.with_components(k)
                cached.standardize = kw.get("standardize", "per_batch")
            return cached

    X = _store_tokens(store, fit_items(len(store), n_images, item_seed), n_tokens, random_state,
                      progress=progress)
    proj._fit_tokens(X, copy=False)  # X is ours: standardise it in place
    del X
    if cache_file is not None:
        _write_pickle_atomic(cache_file, proj)
        write_json_atomic(cache_file.parent / "meta.json", _fit_key(method, k, store, n_images, n_tokens,
                                                                   random_state, kw, item_seed))
    return proj


def _write_pickle_atomic(path: Path, obj: Any) -> None:
    with atomic_write(path) as fh:
        pickle.dump(obj, fh, protocol=pickle.HIGHEST_PROTOCOL)

def fitted_projections(method: str = "pca", root: str | os.PathLike | None = None) -> list[tuple[Path, dict, Any]]:
    """The fits that ``fit_projection`` cached under ``<root>/projections/<method>-*``: (folder, the fit's key as
    its ``meta.json`` holds it, the fitted estimator), in folder-name order. Unfinished fits (no ``meta.json``,
    which is written last) are left out."""
    check_choice("method", method, PROJECTIONS)
    base = stage_root("projections", root)
    out = []
    for folder in sorted(base.glob(f"{method}-*")) if base.exists() else []:
        pkl, meta_path = folder / "projection.pkl", folder / "meta.json"
        if pkl.exists() and meta_path.exists():
            with open(pkl, "rb") as fh:
                out.append((folder, json.loads(meta_path.read_text()), pickle.load(fh)))
    return out


# ----------------------------------------------------------------------------------------------------------------------
# precomputed projected stores (h-NNE)


class ProjectedStore:
    """A FeatureStore look-alike whose ``feats`` are precomputed projections of a source store.

    Same reading interface as ``stego_core.cache.FeatureStore`` (``path``, ``meta``, ``__len__``, ``read``,
    ``iter_batches``, ``dim``, ``n_classes``): labels, images and indices come from the source store, ``feats``
    [n, k, h, w] float32 from ``feats.npy`` (memory-mapped).
    """

    def __init__(self, path: str | os.PathLike, source: Any):
        self.path = Path(path)
        self.source = source
        self.meta = json.loads((self.path / "meta.json").read_text())
        self._feats = np.load(self.path / "feats.npy", mmap_mode="r")  # [N, k, h, w]

    def __len__(self) -> int:
        return int(self._feats.shape[0])

    def __repr__(self) -> str:
        return f"ProjectedStore({self.meta.get('projection', {}).get('method')}-{self.dim}, {len(self)} items, " \
               f"path={str(self.path)!r})"

    @property
    def dim(self) -> int:
        return int(self._feats.shape[1])

    @property
    def grid(self) -> tuple[int, int]:
        return int(self._feats.shape[2]), int(self._feats.shape[3])

    @property
    def n_classes(self) -> int:
        return int(self.meta["n_classes"]) if "n_classes" in self.meta else int(self.source.n_classes)

    def __getattr__(self, name: str) -> Any:
        # everything else (res, class_names, palette, ...) is the source store's
        if name in ("source", "meta", "path", "_feats"):
            raise AttributeError(name)
        return getattr(self.source, name)

    def read(self, indices: Any) -> dict:
        """Like FeatureStore.read: dict(feats [n,k,h,w] float32, label, image, index) for the given positions."""
        if isinstance(indices, torch.Tensor):
            indices = indices.detach().cpu().numpy()
        idx = np.asarray(list(indices) if isinstance(indices, range) else indices).reshape(-1)
        n = len(self)
        if idx.size and (not np.issubdtype(idx.dtype, np.integer) or idx.min() < -n or idx.max() >= n):
            raise StegoError(f"indices: expected integer positions in [-{n}, {n}), got {idx.tolist()[:8]}")
        idx = np.where(idx < 0, idx + n, idx).astype(np.int64)
        batch = dict(self.source.read(idx))
        batch["feats"] = torch.from_numpy(np.ascontiguousarray(self._feats[idx]))
        return batch

    def iter_batches(self, batch_size: int, *, shuffle: bool = False, seed: int = 0,
                     drop_last: bool = False) -> Iterator[dict]:
        """Batches of ``read`` in store order, or in a permutation drawn from ``seed`` (as FeatureStore)."""
        return iter_store_batches(self, batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last)


def _projection_fingerprint(proj: _Projection) -> str:
    state = {k: v for k, v in proj.__dict__.items() if k != "_torch_cache"}
    return hashlib.sha1(pickle.dumps(state, protocol=4)).hexdigest()[:16]


def project_store(proj: _Projection, store: Any, root: str | os.PathLike | None = None, *, batch_size: int = 512,
                  shuffle: bool = True, seed: int = 0, progress: bool = True) -> ProjectedStore:
    """Precompute ``proj.transform`` of every item of ``store`` into ``<root>/projected/<name>-<hash>/``.

    Batches of ``batch_size`` images (the study: 512, per-batch standardisation, CPU). ``shuffle=True``: each batch
    is a random mix of the store (consecutive stretches of a permutation drawn from ``seed``), as the study's were:
    it projected its training cache, written in shuffled order, in consecutive batches. ``shuffle=False``: batches
    of consecutive items (the study's validation cache was written in order). Either way row i of the result is
    item i of the store. Resumable: ``progress.json`` records how many items (in batch order) are written, and a
    re-run continues from there; ``DONE`` is written last and a finished store is reopened without work. The key
    hashes the source store, the fitted projection and the batching.
    """
    proj._check_fitted()
    check_int("batch_size", batch_size, minimum=1)
    check_int("seed", seed, minimum=0)
    n, c, h, w = _store_geometry(store)
    if c != proj.n_features_in_:
        raise StegoError(f"store: features have {c} channels but the projection was fitted on {proj.n_features_in_}")
    k = proj.n_components_out
    src_meta = dict(getattr(store, "meta", {}) or {})
    batches = f"shuffled, seed {seed}" if shuffle else "in order"
    cfg = {"source": str(getattr(store, "path", "")), "source_meta": src_meta, "method": proj.method, "k": k,
           "params": proj.get_params(), "fit": _projection_fingerprint(proj), "batch_size": batch_size,
           "batches": batches}
    name = "-".join(str(src_meta.get(f, "store")) for f in ("dataset", "split", "backbone")) + f"-{proj.method}{k}"
    folder = artifact_dir("projected", name, cfg, root)
    if (folder / "DONE").exists():
        return ProjectedStore(folder, store)
    folder.mkdir(parents=True, exist_ok=True)
    with artifact_lock(folder, f"the projected store {name}"):  # one writer; a second process waits for it
        if not (folder / "DONE").exists():
            _write_projected(folder, proj, store, cfg, n=n, k=k, grid=(h, w), shuffle=shuffle, seed=seed,
                             batch_size=batch_size, progress=progress)
    return ProjectedStore(folder, store)


def _write_projected(folder: Path, proj: _Projection, store: Any, cfg: dict, *, n: int, k: int,
                     grid: tuple[int, int], shuffle: bool, seed: int, batch_size: int, progress: bool) -> None:
    """The work of ``project_store`` (the caller holds the folder's lock)."""
    (h, w), src_meta, batches = grid, cfg["source_meta"], cfg["batches"]
    meta = {**src_meta, "dim": k, "grid": [h, w], "n_items": n,
            "projection": {"method": proj.method, "k": k, "params": proj.get_params(), "batch_size": batch_size,
                           "batches": batches, "source": cfg["source"], "config_hash": config_hash(cfg)}}
    write_json_atomic(folder / "meta.json", meta)
    feats_path = folder / "feats.npy"
    progress_path = folder / "progress.json"
    done = json.loads(progress_path.read_text())["items_done"] if progress_path.exists() and feats_path.exists() else 0
    if done == 0 or not feats_path.exists():
        done = 0
        out = np.lib.format.open_memmap(feats_path, mode="w+", dtype=np.float32, shape=(n, k, h, w))
    else:
        out = np.load(feats_path, mmap_mode="r+")
        note(f"resuming the projected store {folder.name} at item {done + 1} of {n}")
    order = np.random.default_rng(seed).permutation(n) if shuffle else np.arange(n)
    with tqdm(total=n, initial=done, desc=f"projecting ({proj.method}-{k})", unit="img", disable=not progress) as bar:
        for start in range(done, n, batch_size):
            stop = min(start + batch_size, n)
            items = np.sort(order[start:stop])  # one batch; sorted reads are cheaper and the statistics the same
            feats = torch.as_tensor(store.read(items)["feats"]).float()
            out[items] = proj.transform(feats).cpu().numpy()  # rows stay in item order
            out.flush()
            write_json_atomic(progress_path, {"items_done": stop})
            bar.update(stop - start)
    del out
    _write_pickle_atomic(folder / "projection.pkl", proj)
    (folder / "DONE").write_text("ok\n")


def open_projected_store(path: str | os.PathLike, source: Any) -> ProjectedStore:
    """Reopen a finished projected store (StegoError if missing or unfinished)."""
    path = Path(path)
    if not (path / "DONE").exists():
        raise StegoError(f"path: {path} is not a finished projected store (no DONE marker); run project_store")
    return ProjectedStore(path, source)
