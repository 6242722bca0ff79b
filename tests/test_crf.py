"""DenseCRF: shapes and normalisation, determinism, edge snapping, the two image protocols, the process pool."""
import os
import signal
from contextlib import contextmanager

import numpy as np
import pytest
import torch

from stego_core.config import StegoError
from stego_core.crf import CRFPool, crf_batch, crf_inference, dense_crf, image_bytes, logits_to_probs

MEAN = torch.tensor((0.485, 0.456, 0.406)).view(3, 1, 1)
STD = torch.tensor((0.229, 0.224, 0.225)).view(3, 1, 1)


def normalise_bytes(u8_hwc: np.ndarray) -> torch.Tensor:
    """uint8 [H,W,3] RGB -> the ImageNet-normalised float image [3,H,W] a loader would produce."""
    x = torch.from_numpy(u8_hwc).permute(2, 0, 1).float() / 255.0
    return (x - MEAN) / STD


@contextmanager
def deadline(seconds: int):
    """Fail instead of hanging (the original's CRF pool could block forever)."""
    def _raise(*_):
        raise TimeoutError(f"no result within {seconds} s")

    old = signal.signal(signal.SIGALRM, _raise)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def two_region_image(h=32, w=32, edge=16):
    u8 = np.zeros((h, w, 3), dtype=np.uint8)
    u8[:, :edge] = (40, 60, 80)
    u8[:, edge:] = (220, 200, 180)
    return u8


def test_shape_normalised_and_deterministic():
    g = torch.Generator().manual_seed(0)
    img = torch.randn(3, 24, 40, generator=g)
    logits = torch.randn(5, 6, 10, generator=g)
    q1 = dense_crf(img, logits)
    q2 = dense_crf(img, logits)
    assert q1.shape == (5, 24, 40)
    assert q1.dtype == np.float32
    np.testing.assert_allclose(q1.sum(axis=0), 1.0, atol=1e-4)
    assert (q1 >= 0).all()
    np.testing.assert_array_equal(q1, q2)


def test_crf_snaps_the_boundary_to_the_image_edge():
    h, w, edge = 32, 32, 16
    img = normalise_bytes(two_region_image(h, w, edge))
    truth = np.zeros((h, w), dtype=np.int64)
    truth[:, edge:] = 1
    # a smooth score ramp whose decision boundary sits 6 columns right of the real edge
    x = torch.arange(w, dtype=torch.float32)
    ramp = ((x - (edge + 5.5)) / 4.0).expand(h, w)
    logits = torch.stack([-ramp, ramp]) / 2  # [2,H,W]
    before = (logits.argmax(0).numpy() == truth).mean()
    after = (dense_crf(img, logits).argmax(0) == truth).mean()
    assert before == pytest.approx(1 - 6 / 32)
    assert after > 0.98


def test_protocols_differ_only_in_the_image_bytes():
    rng = np.random.default_rng(1)
    u8 = rng.integers(0, 256, size=(20, 28, 3), dtype=np.uint8)
    img = normalise_bytes(u8)
    logits = torch.from_numpy(rng.standard_normal((4, 5, 7)).astype(np.float32))

    orig_bytes = image_bytes(img, protocol="original")
    corr_bytes = image_bytes(img, protocol="corrected")
    np.testing.assert_array_equal(corr_bytes, u8)  # rounding restores the original bytes
    trunc_rgb = orig_bytes[:, :, ::-1]
    assert ((u8.astype(int) - trunc_rgb.astype(int)) >= 0).all()  # truncation only ever loses
    assert (trunc_rgb != u8).any()  # ...and here it does lose (the reference quirk)
    assert orig_bytes.flags["C_CONTIGUOUS"]

    probs = logits_to_probs(logits, (20, 28))
    q_orig = dense_crf(img, logits, protocol="original")
    q_corr = dense_crf(img, logits, protocol="corrected")
    np.testing.assert_array_equal(q_orig, crf_inference(orig_bytes, probs))
    np.testing.assert_array_equal(q_corr, crf_inference(u8, probs))
    assert not np.allclose(q_orig, q_corr, atol=1e-6)
    # the exact bilateral kernel ignores channel order, but the permutohedral lattice that approximates it does
    # not: BGR and RGB of the same bytes give close, not identical, marginals (why "original" keeps BGR)
    q_rgb = crf_inference(np.ascontiguousarray(trunc_rgb), probs)
    assert np.abs(q_orig - q_rgb).max() < 0.1
    assert (q_orig.argmax(0) == q_rgb.argmax(0)).mean() > 0.95


def test_probs_follow_the_reference_resize_and_softmax():
    logits = torch.randn(3, 4, 5)
    probs = logits_to_probs(logits, (8, 10))
    ref = torch.softmax(torch.nn.functional.interpolate(logits[None], size=(8, 10), mode="bilinear",
                                                        align_corners=False)[0], dim=0)
    np.testing.assert_allclose(probs, ref.numpy(), atol=1e-6)


def test_bad_inputs_raise_stego_errors():
    with pytest.raises(StegoError, match="image"):
        dense_crf(torch.zeros(4, 8, 8), torch.zeros(2, 8, 8))
    with pytest.raises(StegoError, match="logits"):
        dense_crf(torch.zeros(3, 8, 8), torch.zeros(8, 8))
    with pytest.raises(StegoError, match="protocol"):
        dense_crf(torch.zeros(3, 8, 8), torch.zeros(2, 8, 8), protocol="fixed")
    with pytest.raises(StegoError, match="logits"):
        crf_batch([torch.zeros(3, 8, 8)], [], workers=1, progress=False)


def _batch(n=4, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = [torch.randn(3, 24, 24, generator=g) for _ in range(n)]
    logits = [torch.randn(k, 6, 6, generator=g) for _ in range(n)]
    return images, logits


def test_pool_matches_serial_loop_in_order():
    images, logits = _batch()
    serial = [dense_crf(im, lg) for im, lg in zip(images, logits)]
    with deadline(120):
        pooled = crf_batch(images, logits, workers=2, progress=False)
    assert len(pooled) == len(serial)
    for a, b in zip(serial, pooled):
        np.testing.assert_array_equal(a, b)
    one = crf_batch(images, logits, workers=1, progress=False)
    for a, b in zip(serial, one):
        np.testing.assert_array_equal(a, b)


def test_worker_exception_propagates_without_hanging():
    images, logits = _batch(3)
    good = [(image_bytes(im), logits_to_probs(lg, (24, 24))) for im, lg in zip(images, logits)]
    bad_rgb = np.zeros((10, 10, 3), dtype=np.uint8)  # does not match its probabilities: fails inside the worker
    pairs = [good[0], (bad_rgb, good[1][1]), good[2]]
    with deadline(120), CRFPool(workers=2, progress=False) as pool:
        with pytest.raises(RuntimeError, match="image 1"):
            pool._map(crf_inference, pairs)
        # the pool recovers: the next call works
        out = pool._map(crf_inference, good)
    assert len(out) == 3


def test_dead_worker_raises_instead_of_hanging():
    with deadline(120), CRFPool(workers=2, progress=False) as pool:
        with pytest.raises(RuntimeError, match="died"):
            pool._map(os._exit, [(3,), (3,)])


def test_workers_argument_is_checked():
    with pytest.raises(StegoError, match="workers"):
        CRFPool(workers=0)
    assert CRFPool().workers == (os.cpu_count() or 1)


def test_crf_bytes_match_torchvision_round_trip_for_every_byte(tmp_path):
    """Quirk 9 exactly: a dataset item's image, handed to the CRF under "original", gives the bytes of the reference
    chain ToTensor (x/255) -> Normalize -> UnNormalize (t*std + mean) -> to_pil_image (x255, truncate) -> BGR, for
    all 256 byte values in every channel."""
    from PIL import Image
    from torchvision import transforms as T
    from torchvision.transforms.functional import to_pil_image

    from stego_core.crf import image_bytes
    from stego_core.data import load_dataset

    values = np.arange(256, dtype=np.uint8).reshape(16, 16)
    rgb = np.stack([values, values[::-1], values.T], axis=-1)  # every byte value in every channel
    (tmp_path / "imgs" / "val").mkdir(parents=True)
    Image.fromarray(rgb).save(tmp_path / "imgs" / "val" / "all-bytes.png")
    ds = load_dataset("directory", "val", res=16, crop="none", root=tmp_path, n_classes=2)

    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    t = T.Normalize(mean, std)(T.ToTensor()(Image.fromarray(rgb)))
    for c in range(3):  # STEGO's UnNormalize: in place, channel by channel
        t[c].mul_(std[c]).add_(mean[c])
    reference = np.array(to_pil_image(t))[:, :, ::-1]
    ours = image_bytes(ds[0]["img"], protocol="original")
    assert ours.shape == reference.shape == (16, 16, 3)
    np.testing.assert_array_equal(ours, reference)
    # the truncation matters: many bytes come back one lower than they went in, and "corrected" restores them all
    assert (reference[:, :, ::-1] != rgb).mean() > 0.1
    np.testing.assert_array_equal(image_bytes(ds[0]["img"], protocol="corrected"), rgb)


def _reference_crf(rgb_u8: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """pydensecrf called directly with the reference's literal kernels (stego-spec §7.3), not our constants."""
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_softmax

    k, h, w = probs.shape
    d = dcrf.DenseCRF2D(w, h, k)
    d.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs, clip=1e-5)))
    d.addPairwiseGaussian(sxy=1, compat=3)
    d.addPairwiseBilateral(sxy=67, srgb=3, rgbim=np.ascontiguousarray(rgb_u8), compat=4)
    return np.asarray(d.inference(10), dtype=np.float32).reshape(k, h, w)


@pytest.mark.parametrize("protocol", ["original", "corrected"])
def test_dense_crf_is_pydensecrf_with_the_reference_kernels(protocol):
    """The constants pinned: dense_crf equals a direct pydensecrf call with the literal kernels of the reference,
    on an image whose bytes we make ourselves (truncated BGR for "original", the bytes as given for "corrected")."""
    rng = np.random.default_rng(7)
    u8 = two_region_image(18, 22, 9)
    u8 = np.clip(u8.astype(int) + rng.integers(-25, 26, size=u8.shape), 0, 255).astype(np.uint8)  # texture
    img = normalise_bytes(u8)
    logits = rng.standard_normal((3, 18, 22)).astype(np.float32) * 0.7  # at image size: no resize involved
    e = np.exp(logits - logits.max(0, keepdims=True))
    probs = (e / e.sum(0, keepdims=True)).astype(np.float32)
    if protocol == "corrected":
        rgb = u8
    else:  # the reference's round trip: unnormalise, x255, truncate, BGR
        scaled = (img * STD + MEAN) * 255.0
        rgb = np.ascontiguousarray(scaled.clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()[:, :, ::-1])
    expected = _reference_crf(rgb, probs)
    got = dense_crf(img, torch.from_numpy(logits), protocol=protocol)
    np.testing.assert_allclose(got, expected, atol=5e-4)  # float32 softmax rounding
    # the kernels matter on this case (so a changed weight or bandwidth cannot pass the comparison above)
    assert np.abs(expected - probs).max() > 0.1
