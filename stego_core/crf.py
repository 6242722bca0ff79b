"""DenseCRF refinement of segmentation log-probabilities (pydensecrf), one image or many in parallel.

What the original evaluation computes per image (stego-spec §7.3):

1. the ImageNet-normalised image [3, H, W] is un-normalised, multiplied by 255 and **truncated** to uint8
   (``tensor.byte()``), laid out HWC and put in **BGR** order (quirk 9 of stego-spec §10);
2. the logits [K, h, w] are resized to H×W (bilinear, align_corners False) and turned into probabilities with a
   softmax over classes; the unary is −log(max(p, 1e-5)) (pydensecrf's ``unary_from_softmax``);
3. a fully connected CRF with a Gaussian kernel (sxy 1, compat 3) and a bilateral kernel (sxy 67, srgb 3, compat 4)
   runs 10 mean-field iterations; the marginals Q come back as [K, H, W].

``protocol="corrected"`` rounds instead of truncating and keeps RGB order. Only the image bytes handed to the CRF
change: rounding restores the bytes the image had before normalisation (truncation turns many of them into
byte − 1). The exact bilateral kernel uses one colour bandwidth for all channels and so ignores their order, but
pydensecrf's permutohedral-lattice approximation does not: BGR and RGB of the same bytes give slightly different
marginals (max |ΔQ| ≈ 0.01 on noise images), which is why "original" keeps the reference's BGR order.

Parallelism: the original ran a ``multiprocessing.Pool`` that can hang forever when a worker dies (STEGO issue
#16). Here a ``concurrent.futures.ProcessPoolExecutor`` with the "forkserver" start method ("spawn" where forkserver
does not exist) does the work: a worker exception, or a worker that dies, raises at once in the caller. The parent
does the torch part (un-normalise, resize, softmax); the workers only see numpy arrays and import no torch.
"""
from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import numpy as np
import pydensecrf.densecrf as dcrf
import torch
import torch.nn.functional as F
from pydensecrf.utils import unary_from_softmax
from tqdm.auto import tqdm

from .config import PROTOCOLS, StegoError, check_choice, check_int
from .data import IMAGENET_MEAN, IMAGENET_STD
from .guards import pool_worker

# The reference kernels (stego-spec §7.3); not meant to be tuned, the study compares against them.
MAX_ITER = 10  # mean-field iterations
POS_XY_STD = 1  # Gaussian (smoothness) kernel: spatial bandwidth in pixels
POS_W = 3  # Gaussian kernel weight (Potts compatibility)
BI_XY_STD = 67  # bilateral (appearance) kernel: spatial bandwidth in pixels
BI_RGB_STD = 3  # bilateral kernel: colour bandwidth in byte units
BI_W = 4  # bilateral kernel weight
UNARY_CLIP = 1e-5  # probabilities are clipped from below before −log



# ---------------------------------------------------------------------------------------------------------------
# parent side: torch tensors -> (uint8 image, probabilities)
def image_bytes(image: Any, *, protocol: str = "original") -> np.ndarray:
    """The uint8 HWC image the CRF sees for an ImageNet-normalised float image [3, H, W] (tensor or array).

    "original": clip to [0, 255] after ×255, truncate, BGR order. "corrected": round, RGB order.
    The truncation reproduces the reference byte for byte when ``image`` was normalised the way torchvision does it
    (x / 255, then (x - mean) / std in float32), as every loader of this package does (``stego_core.data``).
    """
    check_choice("protocol", protocol, PROTOCOLS)
    img = torch.as_tensor(image).detach().to("cpu", torch.float32)
    if img.ndim != 3 or img.shape[0] != 3:
        raise StegoError(f"image: expected a normalised float image [3, H, W], got shape {tuple(img.shape)}")
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    scaled = (img * std + mean) * 255.0  # [3,H,W] in byte units
    if protocol == "original":
        # torchvision's to_pil_image does pic.mul(255).byte(): truncation towards zero. Clipping first only
        # guards against float noise outside [0, 255] (byte() would wrap around there).
        rgb = scaled.clamp(0, 255).to(torch.uint8)
    else:
        rgb = scaled.round().clamp(0, 255).to(torch.uint8)
    hwc = rgb.permute(1, 2, 0).numpy()  # [3,H,W] -> [H,W,3]
    if protocol == "original":
        hwc = hwc[:, :, ::-1]  # RGB -> BGR, as the reference does
    return np.ascontiguousarray(hwc)


def logits_to_probs(logits: Any, size: tuple[int, int]) -> np.ndarray:
    """Softmax probabilities [K, H, W] (float32, C-contiguous) of logits [K, h, w] resized bilinearly to ``size``."""
    lg = torch.as_tensor(logits).detach().to("cpu", torch.float32)
    if lg.ndim != 3:
        raise StegoError(f"logits: expected [K, h, w], got shape {tuple(lg.shape)}")
    if lg.shape[0] < 2:
        raise StegoError(f"logits: expected at least 2 classes, got {lg.shape[0]}")
    if tuple(lg.shape[-2:]) != tuple(size):
        lg = F.interpolate(lg.unsqueeze(0), size=tuple(size), mode="bilinear", align_corners=False)[0]
    probs = F.softmax(lg, dim=0)  # [K,H,W]
    return np.ascontiguousarray(probs.numpy(), dtype=np.float32)


# ---------------------------------------------------------------------------------------------------------------
# worker side: numpy only
def crf_inference(rgb: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """The CRF itself: uint8 image [H, W, 3] and probabilities [K, H, W] -> marginals [K, H, W] (float32).

    Runs in the worker processes; needs only numpy and pydensecrf.
    """
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    probs = np.asarray(probs, dtype=np.float32)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"rgb: expected a uint8 image [H, W, 3], got shape {rgb.shape}")
    if probs.ndim != 3 or probs.shape[1:] != rgb.shape[:2]:
        raise ValueError(f"probs: expected [K, {rgb.shape[0]}, {rgb.shape[1]}], got shape {probs.shape}")
    n_labels, height, width = probs.shape
    unary = np.ascontiguousarray(unary_from_softmax(probs, clip=UNARY_CLIP))  # [K, H*W]
    crf = dcrf.DenseCRF2D(width, height, n_labels)
    crf.setUnaryEnergy(unary)
    crf.addPairwiseGaussian(sxy=POS_XY_STD, compat=POS_W)
    crf.addPairwiseBilateral(sxy=BI_XY_STD, srgb=BI_RGB_STD, rgbim=rgb, compat=BI_W)
    q = crf.inference(MAX_ITER)
    return np.asarray(q, dtype=np.float32).reshape(n_labels, height, width)  # [K, H*W] -> [K,H,W]


def dense_crf(image: Any, logits: Any, *, protocol: str = "original") -> np.ndarray:
    """DenseCRF marginals [K, H, W] for one image.

    image: the ImageNet-normalised float image [3, H, W] as the evaluation loader gives it.
    logits: [K, h, w] class scores (the evaluation passes log-probabilities); resized to H×W and soft-maxed.
    protocol: "original" reproduces the reference image round trip (truncate, BGR); "corrected" rounds (RGB).
    """
    rgb = image_bytes(image, protocol=protocol)
    probs = logits_to_probs(logits, rgb.shape[:2])
    return crf_inference(rgb, probs)


# ---------------------------------------------------------------------------------------------------------------
# many images
def start_method() -> str:
    """How worker processes start: "forkserver" where available (a notebook kernel's threads are never forked),
    else "spawn". The CRF pool and the sweep's process executor share it."""
    return "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"


class CRFPool:
    """A reusable pool of CRF workers (a context manager); ``workers=1`` runs in this process.

    Use one pool for a whole evaluation so that worker start-up is paid once::

        with CRFPool(workers=4) as pool:
            q = pool.map(images, logits)
    """

    def __init__(self, workers: int | None = None, *, protocol: str = "original", progress: bool = True):
        if workers is None:
            workers = os.cpu_count() or 1
        self.workers = check_int("workers", workers, minimum=1)
        self.protocol = check_choice("protocol", protocol, PROTOCOLS)
        self.progress = progress
        self._executor: ProcessPoolExecutor | None = None

    def __enter__(self) -> CRFPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop the workers (pending work is cancelled)."""
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    def _pool(self) -> ProcessPoolExecutor:
        if self._executor is None:
            ctx = multiprocessing.get_context(start_method())
            self._executor = ProcessPoolExecutor(max_workers=self.workers, mp_context=ctx,
                                                 initializer=pool_worker, initargs=(os.getpid(),))
        return self._executor

    def _map(self, fn: Callable, arg_tuples: Sequence[tuple], desc: str = "DenseCRF") -> list:
        """fn(*args) for every tuple, results in order; a failing item raises RuntimeError naming its index."""
        n = len(arg_tuples)
        results: list = [None] * n
        bar = tqdm(total=n, desc=desc, unit="img", disable=not self.progress)
        try:
            if self.workers == 1 or n <= 1:
                for i, args in enumerate(arg_tuples):
                    try:
                        results[i] = fn(*args)
                    except Exception as exc:
                        raise RuntimeError(f"crf: image {i} failed: {type(exc).__name__}: {exc}") from exc
                    bar.update(1)
                return results
            pool = self._pool()
            futures = {pool.submit(fn, *args): i for i, args in enumerate(arg_tuples)}
            try:
                for fut in as_completed(futures):
                    i = futures[fut]
                    try:
                        results[i] = fut.result()
                    except BrokenProcessPool as exc:
                        raise RuntimeError(
                            f"crf: a worker process died while processing image {i} ({exc}); "
                            "the pool was shut down (out of memory? a script without an "
                            "`if __name__ == '__main__':` guard? try fewer workers, or workers=1)") from exc
                    except Exception as exc:
                        raise RuntimeError(f"crf: image {i} failed in a worker: {type(exc).__name__}: {exc}") from exc
                    bar.update(1)
            except BaseException:
                for fut in futures:
                    fut.cancel()
                # a broken pool cannot be reused; a failed one is torn down so nothing lingers
                self.close()
                raise
            return results
        finally:
            bar.close()

    def map(self, images: Sequence[Any], logits: Sequence[Any]) -> list[np.ndarray]:
        """CRF marginals [K, H, W] for every (image [3,H,W], logits [K,h,w]) pair, in input order."""
        if len(images) != len(logits):
            raise StegoError(f"logits: expected one logits map per image ({len(images)}), got {len(logits)}")
        prepared = []
        for i, (img, lg) in enumerate(zip(images, logits)):
            try:
                rgb = image_bytes(img, protocol=self.protocol)
                prepared.append((rgb, logits_to_probs(lg, rgb.shape[:2])))
            except StegoError as exc:
                raise StegoError(f"images[{i}]/logits[{i}]: {exc}") from None
        return self._map(crf_inference, prepared)


def crf_batch(images: Sequence[Any], logits: Sequence[Any], *, workers: int | None = None,
              protocol: str = "original", progress: bool = True) -> list[np.ndarray]:
    """DenseCRF marginals for many images in parallel: list of [K, H, W] arrays in input order.

    images: sequence (or batch tensor [B,3,H,W]) of normalised images; logits: matching [K,h,w] maps
    (or a [B,K,h,w] tensor). workers: processes (default ``os.cpu_count()``; 1 = serial, in this process).
    A failure in any image raises RuntimeError naming the image; a dead worker never hangs the call.
    """
    images = list(images)
    logits = list(logits)
    with CRFPool(workers, protocol=protocol, progress=progress) as pool:
        return pool.map(images, logits)
