"""KF-BFGS-CNN (docs/algorithms.md §2-4, presets ``kfbfgs_cnn`` / ``kfbfgs_l_cnn``) against an independent dense
float64 reference (tests/reference_impl.py) on a tiny conv net: Conv2d (bias, stride/padding, or
dilation with a rectangular kernel), tanh, Flatten, Linear.

The reference builds the patches with an explicit im2col loop (checked against ``F.unfold``) and
accumulates A s, v, hbar and gbar (g_{i,t} = m dL/dh_{i,t}) with loops over samples and output
positions. Every step compares the parameters, H_a, H_g and the loss:
|library - reference| <= 1e-10 * max(1, max |reference|) per quantity (1e-10 absolute for
quantities of size <= 1, relative above). Observed: absolute differences below 2e-12.
"""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from reference_impl import DT, compare_with_library, homogeneous, im2col, reference_net

TOL = 1e-10
STEPS = 5


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny float64 problems: intra-op threading only adds overhead (and stalls badly on a loaded
    machine), so run this module single-threaded and restore the setting afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
CONVS = {
    "stride_pad": dict(kernel_size=3, stride=2, padding=1),
    "dilation_rect": dict(kernel_size=(2, 3), stride=(1, 2), padding=(2, 1), dilation=(2, 1)),
}


def cnn(seed: int, conv: str) -> nn.Sequential:
    torch.manual_seed(seed)
    c = nn.Conv2d(2, 3, **CONVS[conv])
    with torch.no_grad():
        n_out = c(torch.zeros(1, 2, 5, 5)).numel()
    return nn.Sequential(c, nn.Tanh(), nn.Flatten(), nn.Linear(n_out, 4))


def problem(seed: int, loss_kind: str, steps: int = STEPS, m: int = 4):
    g = torch.Generator().manual_seed(seed)
    n = 6 * m
    x = 2 * torch.randn(n, 2, 5, 5, generator=g, dtype=DT)
    if loss_kind == "mse":
        y = torch.randn(n, 4, generator=g, dtype=DT)
    else:
        y = torch.randint(0, 4, (n,), generator=g)
    data = [(x[k * m:(k + 1) * m], y[k * m:(k + 1) * m]) for k in range(steps)]
    warm = [x[:5], x[5:]]
    return data, warm


def run(seed, conv, loss_kind, preset="kfbfgs_cnn", *, source="extra_pass", steps=STEPS,
        warm=False, cfg_overrides=None, lib_kwargs=None, **kw):
    data, warm_batches = problem(seed, loss_kind, steps)
    cfg = {"source": source, **(cfg_overrides or {})}
    lib = {"g_side": {"source": source}, **(lib_kwargs or {})}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return compare_with_library(cnn(seed, conv), preset, data, loss_kind, lr=0.1, tau=5e-4,
                                    warm=warm_batches if warm else None, cfg_overrides=cfg,
                                    lib_kwargs=lib, **kw)


def check(result, steps: int = STEPS, keys=("params", "H_a", "H_g", "loss")):
    diffs, scales, ref = result
    for key in keys:
        assert key in diffs and len(diffs[key]) == steps, key
        for k, (d, sc) in enumerate(zip(diffs[key], scales[key])):
            assert d <= TOL * max(1.0, sc), (
                f"{key} differs from the reference at step {k}: max abs diff {d:.3e} "
                f"(reference scale {sc:.3e}); per step: {diffs[key]}")
    moved = max(float((p - q).abs().max()) for p, q in zip(ref.params(), ref.initial_params))
    assert moved > 1e-2
    assert max(float((f["H_g"] - torch.eye(f["H_g"].shape[0], dtype=DT)).abs().max())
               for f in ref.factors()) > 1e-3
    return ref


def events(ref, kind: str, side: str) -> list[str]:
    return [e for e in ref.log if e.endswith(f"/{side}:{kind}")]


@pytest.mark.parametrize("conv,loss_kind", [("stride_pad", "ce"), ("dilation_rect", "mse")])
def test_kfbfgs_cnn_extra_pass_matches_reference(conv, loss_kind):
    """Default kfbfgs_cnn: H_a from the first batch, minibatch Hessian action with Powell damping,
    dense BFGS with DDV2 for H_g on extra-pass pairs, no norm gate."""
    ref = check(run(2, conv, loss_kind))
    assert events(ref, "powell", "a") and events(ref, "powell", "g"), ref.log


@pytest.mark.parametrize("conv,loss_kind", [("stride_pad", "mse"), ("dilation_rect", "ce")])
def test_kfbfgs_cnn_next_iterate_matches_reference(conv, loss_kind):
    """g_side.source=next_iterate: the pair from steps k-1 and k (different minibatches) updates
    H_g before the direction of step k; the closure runs once per step."""
    ref = check(run(2, conv, loss_kind, source="next_iterate"))
    assert events(ref, "powell", "a") and events(ref, "powell", "g"), ref.log


@pytest.mark.parametrize("source", ["extra_pass", "next_iterate"])
def test_kfbfgs_l_cnn_equals_dense_bfgs_reference(source):
    """KF-BFGS(L)-CNN (L-BFGS, p = 100 >= number of pairs, gamma = 1) equals dense BFGS."""
    check(run(2, "stride_pad", "ce", "kfbfgs_l_cnn", source=source, steps=6,
              cfg_overrides={"g_update": "bfgs"}), steps=6)


def test_kfbfgs_cnn_sqrt_T_split_matches_reference():
    """conv_damping_split=sqrt_T: lambda_A = sqrt(lambda |T|), mu2 = sqrt(lambda / |T|) on the
    conv layer (|T| = 9), sqrt(lambda) on the Linear layer."""
    ref = check(run(2, "stride_pad", "ce", cfg_overrides={"conv_split": "sqrt_T"},
                    lib_kwargs={"conv_damping_split": "sqrt_T"}))
    assert ref.states[0].T == 9 and ref.states[1].T == 1


def test_kbfgs_on_cnn_matches_reference():
    """kbfgs on the conv net: warm-started EMA A = (1/m) sum_i sum_t abar abar^T (summed over
    positions), Hessian-action BFGS for H_a, DD and the norm gate for H_g."""
    ref = check(run(2, "stride_pad", "ce", "kbfgs", warm=True,
                    cfg_overrides={"g_damping": "dd", "norm_gate": True}),
                keys=("params", "H_a", "H_g", "A", "loss"))
    assert any(e.endswith("g:dd2") for e in ref.log), ref.log


@pytest.mark.parametrize("conv", sorted(CONVS))
def test_reference_im2col_reproduces_conv2d(conv):
    """Self-check of the reference: explicit im2col (order c_in, k_h, k_w) with
    Wbar = [weight.view(c_out, -1), bias] gives F.conv2d's output at every position."""
    model = cnn(0, conv).double()
    layer = reference_net(model)[0]
    x = torch.randn(3, 2, 5, 5, dtype=DT)
    cols = im2col(x, tuple(layer.W.shape[2:]), layer.stride, layer.padding, layer.dilation)
    abar = torch.cat([cols, torch.ones(*cols.shape[:2], 1, dtype=DT)], dim=2)
    out = model[0](x)
    want = out.detach().reshape(3, 3, -1).transpose(1, 2)
    assert torch.allclose(abar @ homogeneous(layer).T, want, atol=1e-13, rtol=0)
    assert abar.shape[1] == out.shape[2] * out.shape[3]
