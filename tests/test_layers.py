"""Layer adapters and capture hooks (docs/algorithms.md §1-2): captured quantities reconstruct autograd's
gradients; the minibatch Hessian action, input mean and A match explicit unfold computations."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kfqn.layers import CaptureHooks, Conv2dAdapter, LinearAdapter

CASES = [(cls, i) for cls in (LinearAdapter, Conv2dAdapter) for i in range(len(cls.examples()))]


def _case(cls, i, device):
    torch.manual_seed(i)
    module, shape = cls.examples()[i]
    module = module.double().to(device)
    return module, torch.randn(*shape, dtype=torch.float64, device=device), cls(module)


def _run(module, adapter, x):
    hooks = CaptureHooks(module, adapter, keep_grad_output=True)
    out = module(x)
    target = torch.randn_like(out)
    loss = ((out - target) ** 2).sum() / x.shape[0]  # mean over the batch
    module.zero_grad()
    loss.backward()
    hooks.remove()
    return hooks.slots["current"], out


@pytest.mark.parametrize("cls,i", CASES)
def test_captured_quantities_reconstruct_gradients(cls, i, device):
    module, x, adapter = _case(cls, i, device)
    cap, out = _run(module, adapter, x)
    m = x.shape[0]
    abar = adapter.patches(x)                       # (m, T, d_a)
    g = adapter.per_sample_grad_outputs(cap.grad_out)  # (m, T, d_g), = m * dL/dh
    assert abar.shape[1] == cap.positions == g.shape[1]
    mbar = torch.einsum("itg,ita->ga", g, abar) / m
    torch.testing.assert_close(mbar, adapter.homogeneous_grad(), rtol=1e-10, atol=1e-10)
    # means captured by the hooks
    torch.testing.assert_close(cap.g_mean, g.mean(dim=(0, 1)), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(cap.h_mean, adapter.output_mean(out.detach()), rtol=0, atol=0)
    h = torch.einsum("ga,ita->itg", adapter.homogeneous_weight(), abar)
    torch.testing.assert_close(cap.h_mean, h.mean(dim=(0, 1)), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("cls,i", CASES)
def test_statistics_match_explicit_patches(cls, i, device):
    module, x, adapter = _case(cls, i, device)
    m = x.shape[0]
    abar = adapter.patches(x).reshape(-1, adapter.d_a)
    s = torch.randn(adapter.d_a, dtype=torch.float64, device=device)
    a_explicit = abar.T @ abar / m                  # A = (1/m) sum_i sum_t abar abar^T
    torch.testing.assert_close(adapter.input_covariance(x), a_explicit, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(adapter.input_covariance(x, chunk=1), a_explicit, rtol=1e-10, atol=1e-10)
    base = torch.randn(adapter.d_a, adapter.d_a, dtype=torch.float64, device=device)
    acc = base.clone()   # in place: out += alpha sum abar abar^T
    assert adapter.add_covariance_(acc, x, 0.3) is acc
    torch.testing.assert_close(acc, base + 0.3 * m * a_explicit, rtol=1e-10, atol=1e-10)
    bad = torch.full_like(x, float("nan"))       # a masked-out step adds nothing, even from NaN
    no = torch.zeros((), dtype=torch.bool, device=device)
    assert torch.equal(adapter.add_covariance_(acc.clone(), bad, 0.3, mask=no), acc)
    torch.testing.assert_close(adapter.hessian_action(x, s), a_explicit @ s, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(adapter.input_mean(x), abar.mean(0), rtol=1e-10, atol=1e-12)
    assert adapter.positions(x) * m == abar.shape[0]


def test_unfold_order_matches_weight_view():
    """im2col order (c_in, k_h, k_w) matches weight.view(c_out, -1): h = Wbar abar."""
    conv = nn.Conv2d(2, 3, 3, padding=1).double()
    x = torch.randn(2, 2, 5, 5, dtype=torch.float64)
    ad = Conv2dAdapter(conv)
    h = torch.einsum("ga,ita->itg", ad.homogeneous_weight(), ad.patches(x))
    ref = conv(x).reshape(2, 3, -1).transpose(1, 2)
    torch.testing.assert_close(h, ref, rtol=1e-12, atol=1e-12)


def test_split_inverts_homogeneous():
    for module in (nn.Linear(4, 3), nn.Conv2d(2, 3, 3), nn.Conv2d(2, 3, 3, bias=False)):
        ad = LinearAdapter(module) if isinstance(module, nn.Linear) else Conv2dAdapter(module)
        parts = ad.split(ad.homogeneous_weight())
        for p, q in zip(parts, ad.params()):
            assert torch.equal(p, q.detach())
        assert ad.homogeneous_weight().shape == (ad.d_g, ad.d_a)


def test_unsupported_conv_reasons():
    assert "groups=2" in Conv2dAdapter.unsupported_reason(nn.Conv2d(4, 4, 3, groups=2))
    assert "padding_mode" in Conv2dAdapter.unsupported_reason(nn.Conv2d(2, 2, 3, padding_mode="reflect"))
    assert Conv2dAdapter.unsupported_reason(nn.Conv2d(2, 2, 3)) is None


def test_capture_with_inplace_activation_sees_preactivation_gradient():
    conv = nn.Conv2d(2, 3, 3).double()
    act = nn.ReLU(inplace=True)
    ad = Conv2dAdapter(conv)
    hooks = CaptureHooks(conv, ad, keep_grad_output=True)
    x = torch.randn(3, 2, 5, 5, dtype=torch.float64)
    out = act(conv(x))
    (out ** 2).sum().backward()
    cap = hooks.slots["current"]
    pre = conv(x).detach()
    expected = 2 * torch.relu(pre)  # d/dh of relu(h)^2 = 2 relu(h) * 1[h > 0]
    torch.testing.assert_close(cap.grad_out, expected)
    torch.testing.assert_close(cap.h_mean, pre.mean(dim=(0, 2, 3)))


def test_hooks_idle_without_grad_and_when_phase_none():
    lin = nn.Linear(3, 2)
    hooks = CaptureHooks(lin, LinearAdapter(lin))
    with torch.no_grad():
        lin(torch.randn(4, 3))
    assert hooks.slots["current"].inp is None
    hooks.phase = None
    lin(torch.randn(4, 3)).sum().backward()
    assert hooks.slots["current"].inp is None


@pytest.mark.parametrize("d", [5, 768, 1001])
def test_add_gram_blocked_equals_full_product(d):
    from kfqn.layers.base import add_gram_
    g = torch.Generator().manual_seed(d)
    a = torch.randn(40, d, dtype=torch.float64, generator=g)
    base = torch.randn(d, d, dtype=torch.float64, generator=g)
    out = add_gram_(base.clone(), a, 0.5)
    torch.testing.assert_close(out, base + 0.5 * a.T @ a, rtol=1e-12, atol=1e-12)
