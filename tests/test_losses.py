"""Tests of stego_core.losses: golden pair losses, correlation vs a naive loop, point sampling, the full module."""
import math

import numpy as np
import pytest
import torch

from stego_core.config import StegoError
from stego_core.losses import (
    CorrespondenceLoss,
    pair_correspondence_loss,
    sample_points,
    super_perm,
    tensor_correlation,
)


def _golden_a_inputs():
    rng = np.random.default_rng(0)

    def n(shape):
        return torch.from_numpy(rng.standard_normal(shape).astype(np.float32))

    return n((2, 16, 4, 5)), n((2, 16, 3, 6)), n((2, 8, 4, 5)), n((2, 8, 3, 6))


def test_golden_a_pair_loss(golden):
    rows = golden["a_pair_loss"]["results"]
    assert len(rows) == 7
    f1, f2, c1, c2 = _golden_a_inputs()
    for row in rows:
        args = (f1, f1, c1, c1) if row.get("self_pair") else (f1, f2, c1, c2)
        loss, cd = pair_correspondence_loss(*args, row["shift"], pointwise=row["pointwise"],
                                            zero_clamp=row["zero_clamp"], stabilize=row["stabalize"])
        assert list(loss.shape) == row["loss_shape"]
        assert cd.shape == loss.shape
        close = dict(rel=1e-5, abs=1e-6)
        assert loss.mean().item() == pytest.approx(row["loss_mean"], **close), row
        assert cd.mean().item() == pytest.approx(row["cd_mean"], **close), row
        if "loss_sum" in row:
            assert loss.sum().item() == pytest.approx(row["loss_sum"], **close), row
        if "loss_first" in row:
            flat = loss.reshape(-1)
            assert flat[0].item() == pytest.approx(row["loss_first"], **close), row
            assert flat[-1].item() == pytest.approx(row["loss_last"], **close), row


def test_tensor_correlation_matches_naive_loop():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(2, 3, 2, 3, generator=g)
    b = torch.randn(2, 3, 4, 1, generator=g)
    b[1, :, 2, 0] = 0.0  # a zero vector: eps keeps it finite (correlation 0)
    out = tensor_correlation(a, b)
    assert out.shape == (2, 2, 3, 4, 1)
    for n in range(2):
        for h in range(2):
            for w in range(3):
                for i in range(4):
                    for j in range(1):
                        u = a[n, :, h, w].tolist()
                        v = b[n, :, i, j].tolist()
                        nu = max(math.sqrt(sum(x * x for x in u)), 1e-10)
                        nv = max(math.sqrt(sum(x * x for x in v)), 1e-10)
                        want = sum(x * y for x, y in zip(u, v)) / (nu * nv)
                        assert out[n, h, w, i, j].item() == pytest.approx(want, abs=1e-6)


def test_tensor_correlation_rejects_mismatched_channels():
    with pytest.raises(StegoError, match="^b:"):
        tensor_correlation(torch.randn(1, 3, 2, 2), torch.randn(1, 4, 2, 2))


def test_pair_loss_feats_get_no_gradient_code_does():
    f1, f2, c1, c2 = (t.clone().requires_grad_(True) for t in _golden_a_inputs())
    loss, _ = pair_correspondence_loss(f1, f2, c1, c2, 0.1, pointwise=True)
    loss.mean().backward()
    assert f1.grad is None and f2.grad is None
    assert c1.grad is not None and c1.grad.abs().sum() > 0


def test_pointwise_centring_keeps_global_mean_and_centres_rows():
    f1, f2, c1, c2 = _golden_a_inputs()
    ones = torch.ones_like(c1), torch.ones_like(c2)  # code correlation 1 everywhere -> loss = -(F - shift)
    raw, _ = pair_correspondence_loss(f1, f2, *ones, 0.0, pointwise=False)
    cen, _ = pair_correspondence_loss(f1, f2, *ones, 0.0, pointwise=True)
    fd_raw, fd_cen = -raw, -cen
    assert torch.allclose(fd_raw, tensor_correlation(f1, f2), atol=1e-6)
    row_means = fd_cen.mean(dim=(3, 4))
    assert torch.allclose(row_means, torch.full_like(row_means, fd_raw.mean().item()), atol=1e-6)


def test_sample_points_transposed_grid_nonsymmetric():
    t = torch.arange(6, dtype=torch.float32).reshape(1, 1, 2, 3)  # rows [0,1,2], [3,4,5]
    coords = torch.tensor([[[[-1.0, -1.0], [1.0, -1.0]],  # coords[0,0,0]: (x=-1,y=-1) -> 0; [0,0,1]: (1,-1) -> 2
                            [[0.0, 1.0], [1.0, 1.0]]]])  # coords[0,1,0]: (x=0,y=1) -> 4; [0,1,1]: (1,1) -> 5
    out = sample_points(t, coords)
    # output (p, q) reads coords[q, p]
    assert out[0, 0].tolist() == [[0.0, 4.0], [2.0, 5.0]]


def test_sample_points_bilinear_and_border():
    t = torch.arange(6, dtype=torch.float32).reshape(1, 1, 2, 3)
    coords = torch.tensor([[[[0.5, -1.0]], [[2.0, 5.0]], [[0.0, 0.0]]]])  # [1,3,1,2] -> out [1,1,1,3]
    out = sample_points(t, coords)[0, 0, 0].tolist()
    assert out[0] == pytest.approx(1.5)  # halfway between columns 1 and 2 of row 0
    assert out[1] == pytest.approx(5.0)  # outside: border padding clamps to the last row/column
    assert out[2] == pytest.approx(2.5)  # centre of the map: mean of t[:,1]


def test_super_perm_never_fixed_and_valid():
    saw_duplicate = False
    for seed in range(300):
        gen = torch.Generator().manual_seed(seed)
        size = 2 + seed % 7
        perm = super_perm(size, gen)
        assert perm.dtype == torch.long and perm.shape == (size,)
        assert int(perm.min()) >= 0 and int(perm.max()) < size
        assert not bool((perm == torch.arange(size)).any())
        saw_duplicate |= len(set(perm.tolist())) < size
    assert saw_duplicate  # the reference's draw is not always a permutation
    assert super_perm(1).tolist() == [0]


def test_super_perm_follows_randperm_fixed_point_rule():
    gen = torch.Generator().manual_seed(5)
    base = torch.randperm(6, generator=gen).tolist()
    gen.manual_seed(5)
    perm = super_perm(6, gen).tolist()
    want = [(v + 1) % 6 if v == i else v for i, v in enumerate(base)]
    assert perm == want


# ---------------------------------------------------------------------------------------------------------------
# Full module on a hand-checked 2x2 case: token-centre coordinates make the sampling exact, so the expected value
# can be computed with plain Python lists.

def _cos(u, v):
    nu = max(math.sqrt(sum(x * x for x in u)), 1e-10)
    nv = max(math.sqrt(sum(x * x for x in v)), 1e-10)
    return sum(x * y for x, y in zip(u, v)) / (nu * nv)


def _points(t, coords, b):
    """The vectors read at output positions (p, q) in row-major order: (p, q) reads coords[b, q, p]."""
    s = coords.shape[1]
    h, w = t.shape[-2:]
    pts = []
    for p in range(s):
        for q in range(s):
            x, y = coords[b, q, p].tolist()
            col = round((x + 1) / 2 * (w - 1))
            row = round((y + 1) / 2 * (h - 1))
            pts.append(t[b, :, row, col].tolist())
    return pts


def _naive_term(fa, fb, ca, cb, shift, pointwise, zero_clamp):
    """Mean loss over a batch: fa[n] etc. are lists of point vectors."""
    fds, cds = [], []
    for n in range(len(fa)):
        fd = [[_cos(u, v) for v in fb[n]] for u in fa[n]]
        cds.append([[_cos(u, v) for v in cb[n]] for u in ca[n]])
        fds.append(fd)
    if pointwise:
        allv = [x for fd in fds for row in fd for x in row]
        old = sum(allv) / len(allv)
        fds = [[[x - sum(row) / len(row) for x in row] for row in fd] for fd in fds]
        allv = [x for fd in fds for row in fd for x in row]
        new = sum(allv) / len(allv)
        fds = [[[x - new + old for x in row] for row in fd] for fd in fds]
    lo = 0.0 if zero_clamp else -9999.0
    vals = [-max(c, lo) * (f - shift)
            for fd, cd in zip(fds, cds) for frow, crow in zip(fd, cd) for f, c in zip(frow, crow)]
    return sum(vals) / len(vals), sum(c for cd in cds for row in cd for c in row) / len(vals)


@pytest.mark.parametrize("pointwise,zero_clamp", [(False, True), (True, True), (True, False)])
def test_correspondence_loss_hand_computed(pointwise, zero_clamp):
    g = torch.Generator().manual_seed(3)
    b = 3
    feats = torch.randn(b, 3, 2, 2, generator=g)
    feats_pos = torch.randn(b, 3, 2, 2, generator=g)
    code = torch.randn(b, 2, 2, 2, generator=g)
    code_pos = torch.randn(b, 2, 2, 2, generator=g)
    corners = torch.tensor([-1.0, 1.0])
    # non-symmetric S=2 grids of token centres (x, y in {-1, 1}), different per image
    coords1 = corners[torch.randint(0, 2, (b, 2, 2, 2), generator=g)]
    coords2 = corners[torch.randint(0, 2, (b, 2, 2, 2), generator=g)]
    coords1[0] = torch.tensor([[[-1.0, -1.0], [1.0, -1.0]], [[1.0, 1.0], [-1.0, 1.0]]])
    perms = [torch.tensor([1, 2, 0]), torch.tensor([2, 2, 1])]
    w = dict(pos_intra_weight=0.3, pos_inter_weight=0.7, neg_inter_weight=0.2)
    sh = dict(pos_intra_shift=0.1, pos_inter_shift=0.2, neg_inter_shift=0.4)
    module = CorrespondenceLoss(**w, **sh, pointwise=pointwise, feature_samples=2, neg_samples=2,
                                zero_clamp=zero_clamp)
    out = module(feats, feats_pos, code, code_pos, coords1=coords1, coords2=coords2, perms=perms, return_corr=True)

    F1 = [_points(feats, coords1, n) for n in range(b)]
    G1 = [_points(code, coords1, n) for n in range(b)]
    F2 = [_points(feats_pos, coords2, n) for n in range(b)]
    G2 = [_points(code_pos, coords2, n) for n in range(b)]
    intra, cd_intra = _naive_term(F1, F1, G1, G1, 0.1, pointwise, zero_clamp)
    inter, cd_inter = _naive_term(F1, F2, G1, G2, 0.2, pointwise, zero_clamp)
    # negatives: image perm[n] read at n's coords2 points; the term is the mean of the concatenation
    negs = []
    for perm in perms:
        FN = [_points(feats[perm], coords2, n) for n in range(b)]
        GN = [_points(code[perm], coords2, n) for n in range(b)]
        negs.append(_naive_term(F1, FN, G1, GN, 0.4, pointwise, zero_clamp))
    neg = sum(v for v, _ in negs) / len(negs)
    assert out["pos_intra"].item() == pytest.approx(intra, abs=1e-6)
    assert out["pos_inter"].item() == pytest.approx(inter, abs=1e-6)
    assert out["neg_inter"].item() == pytest.approx(neg, abs=1e-6)
    assert out["total"].item() == pytest.approx(0.3 * intra + 0.7 * inter + 0.2 * neg, abs=1e-6)
    assert out["cd_intra"].item() == pytest.approx(cd_intra, abs=1e-6)
    assert out["cd_inter"].item() == pytest.approx(cd_inter, abs=1e-6)
    assert out["cd_neg"].item() == pytest.approx(sum(c for _, c in negs) / len(negs), abs=1e-6)
    # term means do not depend on the point order, but the raw tensor layout does: entry (n, p, q, i, j)
    # pairs the point read from coords1[n, q, p] with the one read from coords2[n, j, i]
    corr = out["corr_inter"]
    for n in range(b):
        for p in range(2):
            for q in range(2):
                for i in range(2):
                    for j in range(2):
                        want = _cos(G1[n][2 * p + q], G2[n][2 * i + j])
                        assert corr[n, p, q, i, j].item() == pytest.approx(want, abs=1e-6)


def test_correspondence_loss_rng_order_and_gradients():
    g = torch.Generator().manual_seed(11)
    b, s = 4, 3
    feats = torch.randn(b, 5, 4, 4, generator=g).requires_grad_(True)
    feats_pos = torch.randn(b, 5, 4, 4, generator=g)
    code = torch.randn(b, 3, 4, 4, generator=g).requires_grad_(True)
    code_pos = torch.randn(b, 3, 4, 4, generator=g)
    module = CorrespondenceLoss(pos_intra_weight=0.1, pos_inter_weight=1.0, neg_inter_weight=0.15,
                                pos_intra_shift=0.12, pos_inter_shift=0.2, neg_inter_shift=1.0,
                                pointwise=True, feature_samples=s, neg_samples=3)
    out = module(feats, feats_pos, code, code_pos, generator=torch.Generator().manual_seed(42), return_corr=True)
    # the same draws made by hand in the documented order: coords1, coords2, one super_perm per negative
    gen = torch.Generator().manual_seed(42)
    c1 = torch.rand([b, s, s, 2], generator=gen) * 2 - 1
    c2 = torch.rand([b, s, s, 2], generator=gen) * 2 - 1
    perms = [super_perm(b, gen) for _ in range(3)]
    ref = module(feats, feats_pos, code, code_pos, coords1=c1, coords2=c2, perms=perms)
    for key in ("pos_intra", "pos_inter", "neg_inter", "total"):
        assert out[key].item() == ref[key].item(), key
    assert out["corr_intra"].shape == (b, s, s, s, s)
    assert out["corr_neg"].shape == (3 * b, s, s, s, s)
    assert out["cd_neg"].item() == pytest.approx(out["corr_neg"].mean().item())
    # global RNG path: seeding torch reproduces the same draws
    torch.manual_seed(42)
    a1 = module(feats, feats_pos, code, code_pos)["total"].item()
    torch.manual_seed(42)
    a2 = module(feats, feats_pos, code, code_pos)["total"].item()
    assert a1 == a2
    out["total"].backward()
    assert feats.grad is None
    assert code.grad is not None and code.grad.abs().sum() > 0


def test_correspondence_loss_bad_inputs():
    module = CorrespondenceLoss(pos_intra_weight=1, pos_inter_weight=1, neg_inter_weight=1, pos_intra_shift=0,
                                pos_inter_shift=0, neg_inter_shift=0, pointwise=False, neg_samples=1)
    f = torch.randn(2, 4, 3, 3)
    c = torch.randn(2, 2, 3, 3)
    with pytest.raises(StegoError, match="^code_pos:"):
        module(f, f, c, torch.randn(3, 2, 3, 3))
    with pytest.raises(StegoError, match="^perms:"):
        module(f, f, c, c, perms=[torch.tensor([0, 2])])
    with pytest.raises(StegoError, match="^perms:"):
        module(f, f, c, c, perms=[torch.tensor([1, 0]), torch.tensor([1, 0])])
    with pytest.raises(StegoError, match="^feature_samples:"):
        CorrespondenceLoss(pos_intra_weight=1, pos_inter_weight=1, neg_inter_weight=1, pos_intra_shift=0,
                           pos_inter_shift=0, neg_inter_shift=0, pointwise=False, feature_samples=0)


def test_pair_loss_rejects_code_feature_size_mismatch():
    f1, f2, c1, c2 = _golden_a_inputs()
    with pytest.raises(StegoError, match="^code_b:"):
        pair_correspondence_loss(f1, f2, c1, c1, 0.0, pointwise=False)


@pytest.mark.parametrize("zero_clamp, stabilize", [(True, True), (False, True), (False, False)])
def test_loss_module_passes_its_clamps_on(zero_clamp, stabilize):
    """CorrespondenceLoss(zero_clamp=..., stabilize=...) computes its inter term with those clamps: the same value as
    the golden-pinned pair loss on the sampled maps (sampling written out with grid_sample, border, align_corners)."""
    import torch.nn.functional as F

    from stego_core.losses import CorrespondenceLoss

    g = torch.Generator().manual_seed(0)
    feats, feats_pos = torch.randn(2, 6, 5, 5, generator=g), torch.randn(2, 6, 5, 5, generator=g)
    code = torch.randn(2, 4, 5, 5, generator=g)
    code_pos = code * 0.9 + 0.1 * torch.randn(2, 4, 5, 5, generator=g)  # correlated: some correlations > 0.8
    c1, c2 = (torch.rand(2, 3, 3, 2, generator=g) * 2 - 1 for _ in range(2))
    loss = CorrespondenceLoss(pos_intra_weight=0.0, pos_inter_weight=1.0, neg_inter_weight=0.0, pos_intra_shift=0.0,
                              pos_inter_shift=0.3, neg_inter_shift=0.0, pointwise=False, feature_samples=3,
                              neg_samples=0, zero_clamp=zero_clamp, stabilize=stabilize)
    out = loss(feats, feats_pos, code, code_pos, coords1=c1, coords2=c2)

    def samp(t, coords):
        return F.grid_sample(t, coords.permute(0, 2, 1, 3), padding_mode="border", align_corners=True)

    f1, f2 = samp(feats, c1), samp(feats_pos, c2)
    g1, g2 = samp(code, c1), samp(code_pos, c2)
    fd = torch.einsum("nchw,ncij->nhwij", F.normalize(f1, dim=1, eps=1e-10), F.normalize(f2, dim=1, eps=1e-10))
    cd = torch.einsum("nchw,ncij->nhwij", F.normalize(g1, dim=1, eps=1e-10), F.normalize(g2, dim=1, eps=1e-10))
    assert (cd > 0.8).any() and (cd < 0).any()  # both clamps matter here
    clamped = cd.clamp(0.0 if zero_clamp else -9999.0, 0.8 if stabilize else None)
    expected = (-clamped * (fd - 0.3)).mean()
    assert out["pos_inter"].item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)
