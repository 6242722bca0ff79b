"""Tests of stego_core.probes: cosine cluster probe (hard/soft), linear probe and its masked, upsampled loss."""
import math

import pytest
import torch

from stego_core.config import StegoError
from stego_core.probes import ClusterProbe, LinearProbe, linear_probe_loss


def _manual_cos(code, centres):
    """[B,D,H,W] x [K,D] -> [B,K,H,W] by explicit loops over pixels."""
    b, d, h, w = code.shape
    out = torch.zeros(b, centres.shape[0], h, w, dtype=torch.float64)
    for n in range(b):
        for y in range(h):
            for x in range(w):
                v = code[n, :, y, x].double()
                for k in range(centres.shape[0]):
                    c = centres[k].double()
                    out[n, k, y, x] = (v @ c) / (max(v.norm().item(), 1e-12) * max(c.norm().item(), 1e-12))
    return out


def test_cluster_probe_init_and_hard_loss():
    torch.manual_seed(0)
    probe = ClusterProbe(4, 6)
    assert probe.centres.shape == (6, 4)
    torch.manual_seed(0)
    assert torch.equal(probe.centres.detach(), torch.randn(6, 4))  # standard-normal init, nothing drawn before
    code = torch.randn(2, 4, 3, 5)
    loss, probs = probe(code)
    cos = _manual_cos(code, probe.centres.detach())
    assert loss.item() == pytest.approx(-cos.max(dim=1).values.mean().item(), abs=1e-6)
    assert probs.shape == (2, 6, 3, 5)
    assert torch.equal(probs.sum(1), torch.ones(2, 3, 5))
    assert torch.equal(probs.argmax(1), cos.argmax(1))
    assert torch.equal(probe.predict(code), cos.argmax(1))


def test_cluster_probe_gradient_only_into_winning_centres():
    torch.manual_seed(1)
    probe = ClusterProbe(3, 8)
    code = torch.randn(1, 3, 2, 2)  # 4 pixels, 8 centres: at least 4 centres never win
    loss, _ = probe(code)
    loss.backward()
    winners = set(_manual_cos(code, probe.centres.detach()).argmax(1).reshape(-1).tolist())
    grad_norm = probe.centres.grad.norm(dim=1)
    for k in range(8):
        if k in winners:
            assert grad_norm[k] > 0, k
        else:
            assert grad_norm[k] == 0, k
    assert len(winners) < 8


def test_cluster_probe_soft_mode_and_log_probs():
    torch.manual_seed(2)
    probe = ClusterProbe(5, 4)
    code = torch.randn(2, 5, 3, 3)
    cos = _manual_cos(code, probe.centres.detach()).float()
    loss, probs = probe(code, alpha=3.0)
    want = torch.softmax(3.0 * cos, dim=1)
    assert torch.allclose(probs, want, atol=1e-5)
    assert loss.item() == pytest.approx(-(want * cos).sum(1).mean().item(), abs=1e-5)
    lp = probe.log_probs(code)
    assert lp.shape == (2, 4, 3, 3)
    assert torch.allclose(lp, torch.log_softmax(2.0 * cos, dim=1), atol=1e-5)
    assert torch.allclose(lp.exp().sum(1), torch.ones(2, 3, 3), atol=1e-6)


def test_cluster_probe_bad_code():
    with pytest.raises(StegoError, match="^code:"):
        ClusterProbe(4, 3)(torch.randn(1, 5, 2, 2))


def test_linear_probe_shapes_and_predict():
    probe = LinearProbe(6, 3)
    assert probe.conv.kernel_size == (1, 1) and probe.conv.bias is not None
    code = torch.randn(2, 6, 4, 4)
    logits = probe(code)
    assert logits.shape == (2, 3, 4, 4)
    assert torch.equal(probe.predict(code), logits.argmax(1))


def test_linear_probe_loss_matches_manual_ce_and_ignores_invalid():
    torch.manual_seed(3)
    logits = torch.randn(2, 4, 3, 3)
    label = torch.randint(0, 4, (2, 3, 3))
    label[0, 0, 0] = -1
    label[1, 2, 1] = -1
    label[1, 0, 2] = 4  # out of range -> ignored as well
    got = linear_probe_loss(logits, label)
    terms = []
    for n in range(2):
        for y in range(3):
            for x in range(3):
                lab = int(label[n, y, x])
                if 0 <= lab < 4:
                    z = logits[n, :, y, x].tolist()
                    terms.append(math.log(sum(math.exp(v) for v in z)) - z[lab])
    assert len(terms) == 15
    assert got.item() == pytest.approx(sum(terms) / len(terms), abs=1e-5)


def test_linear_probe_loss_upsamples_bilinear_half_pixel():
    # logits 1x2 -> label 1x4 (align_corners False): [a, .75a+.25b, .25a+.75b, b]
    a, b = 2.0, -1.0
    logits = torch.zeros(1, 2, 1, 2)
    logits[0, 0, 0] = torch.tensor([a, b])
    label = torch.tensor([[[1, 1, 1, 1]]])
    got = linear_probe_loss(logits, label)
    want = sum(math.log(math.exp(v) + 1.0) for v in (a, 0.75 * a + 0.25 * b, 0.25 * a + 0.75 * b, b)) / 4
    assert got.item() == pytest.approx(want, abs=1e-6)


def test_linear_probe_loss_all_ignored_is_zero_with_graph_and_bad_label():
    logits = torch.randn(1, 3, 2, 2, requires_grad=True)
    loss = linear_probe_loss(logits, torch.full((1, 4, 4), -1))
    assert loss.item() == 0.0
    loss.backward()
    with pytest.raises(StegoError, match="^label:"):
        linear_probe_loss(logits, torch.zeros(1, 4, 4))
    with pytest.raises(StegoError, match="^label:"):
        linear_probe_loss(logits, torch.zeros(2, 4, 4, dtype=torch.long))


def test_linear_probe_loss_gradient_reaches_logits_only_through_valid_pixels():
    logits = torch.randn(1, 3, 2, 2, requires_grad=True)
    label = torch.tensor([[[0, -1], [-1, -1]]])
    linear_probe_loss(logits, label).backward()
    assert logits.grad[0, :, 0, 0].abs().sum() > 0
    assert logits.grad[0, :, 1, 1].abs().sum() == 0
