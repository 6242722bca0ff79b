"""Tests of stego_core.heads: shapes, structure, and the three independent channel-dropout draws."""
import pytest
import torch
from torch import nn

from stego_core.config import StegoError
from stego_core.heads import STEGOHead


def _head(in_dim=16, code_dim=5, dropout=0.5):
    torch.manual_seed(0)
    return STEGOHead(in_dim, code_dim, dropout=dropout)


def test_structure_and_shapes():
    head = _head()
    assert isinstance(head.linear, nn.Conv2d) and head.linear.kernel_size == (1, 1)
    assert (head.linear.in_channels, head.linear.out_channels) == (16, 5)
    convs = [m for m in head.nonlinear if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(16, 16), (16, 5)]
    assert isinstance(head.nonlinear[1], nn.ReLU)
    assert all(c.bias is not None for c in convs + [head.linear])
    code = head(torch.randn(3, 16, 4, 7))
    assert code.shape == (3, 5, 4, 7)


def test_eval_mode_has_no_dropout():
    head = _head().eval()
    f = torch.randn(2, 16, 3, 3)
    want = head.linear(f) + head.nonlinear(f)
    assert torch.equal(head(f), want)
    assert torch.equal(head(f), head(f))
    dropped, code = head.forward_with_feats(f)
    assert torch.equal(dropped, f) and torch.equal(code, want)


def test_train_mode_two_independent_branch_masks_and_third_feature_draw():
    head = _head().train()
    f = torch.randn(2, 16, 3, 3) + 3.0  # no zero channels by chance
    torch.manual_seed(123)
    dropped, code = head.forward_with_feats(f)
    # replay the draws with a separate Dropout2d of the same p: branch 1, branch 2, loss features
    ref_drop = nn.Dropout2d(0.5).train()
    torch.manual_seed(123)
    m1, m2, m3 = ref_drop(f), ref_drop(f), ref_drop(f)
    assert not torch.equal(m1, m2)  # the draws differ...
    assert torch.allclose(code, head.linear(m1) + head.nonlinear(m2), atol=1e-6)  # ...and each branch gets its own
    assert not torch.allclose(code, head.linear(m1) + head.nonlinear(m1), atol=1e-3)
    assert torch.equal(dropped, m3)
    # whole channels are zeroed, survivors scaled by 1/(1-p)
    zero = (dropped == 0).all(dim=(2, 3))
    assert zero.any() and (~zero).any()
    assert torch.allclose(dropped[~zero], (f * 2.0)[~zero])
    # train mode output differs from eval mode output
    assert not torch.allclose(code, head.eval()(f), atol=1e-3)


def test_dropout_zero_is_identity_in_train_mode():
    head = _head(dropout=0.0).train()
    f = torch.randn(1, 16, 2, 2)
    assert torch.allclose(head(f), head.linear(f) + head.nonlinear(f))


def test_bad_inputs():
    with pytest.raises(StegoError, match="^dropout:"):
        STEGOHead(4, 2, dropout=1.0)
    with pytest.raises(StegoError, match="^code_dim:"):
        STEGOHead(4, 0)
    with pytest.raises(StegoError, match="^feats:"):
        STEGOHead(4, 2)(torch.randn(1, 3, 2, 2))


def test_gradient_flows_into_both_branches():
    head = _head().train()
    head(torch.randn(2, 16, 3, 3)).pow(2).sum().backward()
    assert head.linear.weight.grad.abs().sum() > 0
    assert head.nonlinear[2].weight.grad.abs().sum() > 0


def test_default_channel_dropout_is_the_reference_p():
    """Spec §1.3: Dropout2d(p=0.1). Measured, not read back: the fraction of zeroed channels over many draws and
    the survivors' scale 1/(1-p)."""
    torch.manual_seed(0)
    head = STEGOHead(400, 2).train()
    assert head.drop.p == 0.1
    x = torch.ones(50, 400, 1, 1)
    dropped = head.drop_features(x)  # [50,400,1,1]: 20,000 channel draws
    zero = dropped == 0
    assert abs(zero.float().mean().item() - 0.1) < 0.01
    torch.testing.assert_close(dropped[~zero], torch.full_like(dropped[~zero], 1 / 0.9))
