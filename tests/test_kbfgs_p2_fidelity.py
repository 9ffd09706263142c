"""K-BFGS / K-BFGS(L) as the P2 authors' public code computes them (docs/algorithms.md §3).

* The momentum Mhat and the pair averages (sbar, ybar) start at zero: the first two steps of a
  tiny MLP are pinned by values computed here by hand from autograd (Mhat_1 = 0.1 G_1,
  sbar_1 = 0.1 s_1, sbar_2 = 0.09 s_1 + 0.1 s_2, theta_1 = theta_0 - lr H_g0 Mhat_1 H_a0).
* The ``first`` variants (``momentum_init: first``, ``g_side.ema_init: first``) still agree
  with the independent reference run with the same starts.
* H_a takes the same skip rules as H_g, the norm gate with g_ref = v included.
* An MNIST-shaped (scaled-down) autoencoder with the P2 loss (sigmoid cross-entropy summed over
  pixels, mean over samples), warm start, float64: 20 steps of ``kbfgs`` and ``kbfgs_l`` agree
  with the reference to 1e-10 relative, parameters and factors.
"""
from __future__ import annotations

import math
import pytest
import torch
from torch import nn
import torch.nn.functional as F

import kfqn
from reference_impl import DT, compare_with_library

TOL = 1e-10
#: the library's "A factors start from the first batch" warning of runs without a warm start
pytestmark = pytest.mark.filterwarnings("ignore:.*warm_start")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def assert_matches(result, steps: int, rel: float = TOL) -> None:
    diffs, scales, ref = result
    for key in ("params", "H_a", "H_g", "A", "loss"):
        assert key in diffs and len(diffs[key]) == steps, key
        for k, (d, sc) in enumerate(zip(diffs[key], scales[key])):
            assert d <= rel * max(1.0, sc), (
                f"{key} differs from the reference at step {k}: {d:.3e} (scale {sc:.3e})")
    moved = max(float((p - q).abs().max()) for p, q in zip(ref.params(), ref.initial_params))
    assert moved > 1e-3
    return ref


# -- the first two steps, by hand ---------------------------------------------------------------
def _layer_stats(model: nn.Sequential, x: torch.Tensor, y: torch.Tensor):
    """(hbar, gbar) of both Linear layers at the model's current parameters: means over the
    batch of h and of g = m dL/dh, from autograd on the mean cross-entropy."""
    with torch.enable_grad():
        h1 = model[0](x)
        h1.retain_grad()
        h2 = model[2](torch.tanh(h1))
        h2.retain_grad()
        loss = F.cross_entropy(h2, y)
        loss.backward()
    m = x.shape[0]
    model.zero_grad()
    return [(h.detach().mean(0), (m * h.grad).mean(0)) for h in (h1, h2)]


def _homogeneous_grad(model, x, y, tau):
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    out = []
    for lin in (model[0], model[2]):
        w = torch.cat([lin.weight, lin.bias[:, None]], 1)
        g = torch.cat([lin.weight.grad, lin.bias.grad[:, None]], 1)
        out.append(g + tau * w.detach())
    model.zero_grad()
    return out


def test_first_two_steps_pinned_by_hand():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    shadow = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    shadow.load_state_dict(model.state_dict())
    g = torch.Generator().manual_seed(1)
    x = torch.randn(12, 3, generator=g, dtype=DT)
    y = torch.randint(0, 2, (12,), generator=g)
    batches = [(x[:6], y[:6]), (x[6:], y[6:])]
    lr, lam, tau = 0.3, 0.3, 1e-3
    opt = kfqn.build_optimizer(model, "kbfgs", lr=lr, damping=lam, weight_decay=tau,
                               factor_dtype="float64")
    with opt.warm_start():
        model(x)
    names = ["0", "2"]
    h_a0 = [opt.factors()[n]["H_a"].clone() for n in names]
    # warm-start A0 by hand: the per-sample mean of abar abar^T over the whole data
    inputs = [x, torch.tanh(shadow[0](x)).detach()]
    for n, a_in, h0 in zip(names, inputs, h_a0):
        abar = torch.cat([a_in, torch.ones(len(a_in), 1, dtype=DT)], 1)
        a0 = abar.T @ abar / len(a_in)
        torch.testing.assert_close(h0, torch.linalg.inv(a0 + math.sqrt(lam) * torch.eye(len(a0), dtype=DT)),
                                   rtol=1e-12, atol=1e-12)

    def closure_for(xb, yb):
        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(model(xb), yb)
            loss.backward()
            return loss
        return closure

    s_hist: list[list[torch.Tensor]] = []
    y_hist: list[list[torch.Tensor]] = []
    for k, (xb, yb) in enumerate(batches):
        theta_k = {n: p.detach().clone() for n, p in shadow.named_parameters()}
        grads = _homogeneous_grad(shadow, xb, yb, tau)
        before = _layer_stats(shadow, xb, yb)
        opt.step(closure_for(xb, yb))
        state = opt.state_dict()["layers"]
        if k == 0:
            # Mhat_1 = 0.1 G_1 (zero start), and the first step uses H_g0 = I, H_a0 from the warm start
            for n, gk, h0 in zip(names, grads, h_a0):
                torch.testing.assert_close(state[n]["momentum"], 0.1 * gk, rtol=1e-13, atol=1e-15)
                step = -lr * (0.1 * gk) @ h0
                want_w = theta_k[f"{n}.weight"] + step[:, :-1]
                want_b = theta_k[f"{n}.bias"] + step[:, -1]
                lin = model[int(n)]
                torch.testing.assert_close(lin.weight.detach(), want_w, rtol=1e-12, atol=1e-14)
                torch.testing.assert_close(lin.bias.detach(), want_b, rtol=1e-12, atol=1e-14)
        shadow.load_state_dict(model.state_dict())
        after = _layer_stats(shadow, xb, yb)  # theta+ = the new iterate, same minibatch
        s_hist.append([b[0] - a[0] for b, a in zip(before, after)])
        y_hist.append([b[1] - a[1] for b, a in zip(before, after)])
        for j, n in enumerate(names):
            if k == 0:
                want_s, want_y = 0.1 * s_hist[0][j], 0.1 * y_hist[0][j]
            else:
                want_s = 0.09 * s_hist[0][j] + 0.1 * s_hist[1][j]
                want_y = 0.09 * y_hist[0][j] + 0.1 * y_hist[1][j]
            torch.testing.assert_close(state[n]["precond"]["g"]["s_avg"], want_s, rtol=1e-10, atol=1e-13)
            torch.testing.assert_close(state[n]["precond"]["g"]["y_avg"], want_y, rtol=1e-10, atol=1e-13)
    # the averages really moved (the checks above are not on zeros)
    assert min(float(s.abs().max()) for s in s_hist[1]) > 1e-4


def test_first_step_is_ten_times_shorter_than_with_momentum_init_first():
    torch.manual_seed(3)
    base = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x = torch.randn(8, 3, dtype=DT)
    y = torch.randint(0, 2, (8,))
    moves = {}
    for init in ("zero", "first"):
        model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
        model.load_state_dict(base.state_dict())
        opt = kfqn.build_optimizer(model, "kbfgs", factor_dtype="float64", momentum_init=init)
        with opt.warm_start():
            model(x)

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss
        opt.step(closure)
        moves[init] = torch.cat([(p - q).flatten() for p, q in
                                 zip(model.parameters(), base.parameters())]).detach()
    torch.testing.assert_close(moves["first"], 10 * moves["zero"], rtol=1e-12, atol=1e-15)


# -- against the reference -----------------------------------------------------------------------
def mlp(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))


def problem(seed: int, steps: int, m: int = 6, scale: float = 2.0):
    g = torch.Generator().manual_seed(seed)
    x = scale * torch.randn(steps * m, 4, generator=g, dtype=DT)
    y = torch.randint(0, 3, (steps * m,), generator=g)
    return [(x[k * m:(k + 1) * m], y[k * m:(k + 1) * m]) for k in range(steps)], [x[:10], x[10:]]


@pytest.mark.parametrize("preset", ["kbfgs", "kbfgs_l", "kfbfgs_cnn"])
@pytest.mark.parametrize("momentum_init,ema_init", [("first", "first"), ("zero", "first"),
                                                    ("first", "zero")])
def test_start_variants_match_reference(preset, momentum_init, ema_init):
    data, warm = problem(7, 5)
    result = compare_with_library(
        mlp(7), preset, data, "ce", warm=warm if preset != "kfbfgs_cnn" else None,
        cfg_overrides={"momentum_init": momentum_init, "ema_init": ema_init},
        lib_kwargs={"momentum_init": momentum_init, "g_side": {"ema_init": ema_init}})
    diffs, scales, _ = result
    for key, per_step in diffs.items():
        for d, sc in zip(per_step, scales[key]):
            assert d <= TOL * max(1.0, sc), (key, per_step)


def test_a_side_norm_gate_matches_reference():
    """s_a^T y_a >= lambda_A ||s_a||^2, so at eps = 1e-4 the gate s_a^T y_a <= eps ||s_a||^2 ||v||
    needs ||v|| > 5e3; eps = 1.3 makes it fire on inputs of size ~2: it skips some H_a
    updates and not others, in the library as in the reference."""
    data, warm = problem(5, 5)
    result = compare_with_library(
        mlp(5), "kbfgs", data, "ce", warm=warm,
        cfg_overrides={"a_norm_gate_eps": 1.3},
        lib_kwargs={"a_side": {"norm_gate_eps": 1.3}})
    diffs, scales, ref = result
    for key, per_step in diffs.items():
        for d, sc in zip(per_step, scales[key]):
            assert d <= TOL * max(1.0, sc), (key, per_step)
    gated = [e for e in ref.log if e.endswith("/a:skip_gate")]
    assert 0 < len(gated) < 10, ref.log


def autoencoder(seed: int) -> nn.Sequential:
    """MNIST autoencoder's shape (784-1000-500-250-30-250-500-1000-784, ReLU, linear code) at
    1/50 of its width: 16-20-10-5-2-5-10-20-16."""
    torch.manual_seed(seed)
    sizes = [16, 20, 10, 5, 2, 5, 10, 20, 16]
    mods: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        mods.append(nn.Linear(a, b))
        if i < len(sizes) - 2 and b != 2:
            mods.append(nn.ReLU())
    return nn.Sequential(*mods)


@pytest.mark.parametrize("preset", ["kbfgs", "kbfgs_l"])
def test_mnist_shaped_autoencoder_20_steps(preset):
    g = torch.Generator().manual_seed(11)
    n, m, steps = 200, 10, 20
    x = torch.rand(n, 16, generator=g, dtype=DT)
    data = [(x[(k * m) % n:(k * m) % n + m],) * 2 for k in range(steps)]
    warm = [x[k:k + m] for k in range(0, n, m)]  # the warm-start pass over the training data
    result = compare_with_library(autoencoder(4), preset, data, "sigmoid_ce", warm=warm,
                                  lr=0.3, lam=0.3, tau=1e-5)
    ref = assert_matches(result, steps)
    # the run exercised the damping
    assert any(e.endswith(":dd2") or e.endswith(":powell") for e in ref.log)
