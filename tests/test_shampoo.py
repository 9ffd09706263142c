"""Shampoo (docs/algorithms.md §4): statistics from the homogeneous gradient, inverse fourth roots, the first
step in closed form, cadences, grafting, preconditioning off = SGD, resume."""
from __future__ import annotations

import io

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import kfqn
from kfqn.inversion import CholeskyInversion, EighInversion
from helpers import make_closure, quiet, small_cnn, teacher_data

F64 = torch.float64


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def shampoo(model, **kw):
    return kfqn.build_optimizer(model, {"preset": "shampoo", "factor_dtype": "float64",
                                        "weight_decay": 0.0, **kw})


def closure_for(opt, model, x, y):
    return make_closure(opt, model, x, y)


def data(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g, dtype=F64), torch.randint(0, 3, (n,), generator=g)


def mbars(model):
    return {name: torch.cat([m.weight.grad, m.bias.grad[:, None]], 1)
            for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def root(mat, eps, p=4):
    e, v = torch.linalg.eigh(mat + eps * torch.eye(mat.shape[0], dtype=mat.dtype))
    return (v * e.pow(-1.0 / p)) @ v.T


def test_statistics_are_sums_of_homogeneous_gradient_products():
    model = mlp()
    opt = shampoo(model, lr=0.0)
    sums: dict[str, list] = {}
    for k in range(3):
        x, y = data(seed=k)
        opt.step(closure_for(opt, model, x, y))
        for name, mb in mbars(model).items():
            a, g = sums.setdefault(name, [0, 0])
            sums[name] = [a + mb.T @ mb, g + mb @ mb.T]
    for name, (a, g) in sums.items():
        f = opt.factors()[name]
        torch.testing.assert_close(f["A"], a)
        torch.testing.assert_close(f["G"], g)
        torch.testing.assert_close(f["H_a"], root(a, 1e-4))
        torch.testing.assert_close(f["H_g"], root(g, 1e-4))


def test_first_step_is_the_shampoo_update():
    """theta_1 = theta_0 - lr (Mbar Mbar^T + eps I)^(-1/4) Mhat_1 (Mbar^T Mbar + eps I)^(-1/4),
    Mhat_1 = 0.1 Mbar (the momentum starts at zero)."""
    model = mlp()
    before = {n: torch.cat([m.weight, m.bias[:, None]], 1).detach().clone()
              for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    opt = shampoo(model, lr=0.3, preconditioner={"epsilon": 1e-3,
                  "epsilon": 1e-3, "grafting": "none"})
    x, y = data()
    opt.step(closure_for(opt, model, x, y))
    for name, mb in mbars(model).items():
        m = dict(model.named_modules())[name]
        after = torch.cat([m.weight, m.bias[:, None]], 1).detach()
        step = root(mb @ mb.T, 1e-3) @ (0.1 * mb) @ root(mb.T @ mb, 1e-3)
        torch.testing.assert_close(after, before[name] - 0.3 * step)


@settings(max_examples=20, deadline=None)
@given(n=st.integers(1, 6), p=st.sampled_from([2, 4, 6]), eps=st.floats(1e-4, 1.0),
       seed=st.integers(0, 2**16))
def test_inverse_roots(n, p, eps, seed):
    g = torch.Generator().manual_seed(seed)
    b = torch.randn(n, n + 1, generator=g, dtype=F64)
    mat = b @ b.T
    for strategy in (EighInversion(min_eig=0.0), CholeskyInversion(min_eig=0.0)):
        r = strategy.invert_root(mat, eps, p).inverse
        torch.testing.assert_close(torch.linalg.matrix_power(r, p)
                                   @ (mat + eps * torch.eye(n, dtype=F64)),
                                   torch.eye(n, dtype=F64), rtol=1e-7, atol=1e-7)


def test_root_cadence_and_ema_option():
    model = mlp()
    opt = shampoo(model, lr=0.01,
                  preconditioner={"inverse_every": 3, "inverse_warmup": 1, "stats_every": 2, "beta": 0.5,
                  "inverse_every": 3, "inverse_warmup": 1, "stats_every": 2, "beta": 0.5})
    layer = opt.layers["0"]
    roots_at, stats_at, stat = [], [], None
    for k in range(8):
        x, y = data(seed=k)
        before = (layer.precond.a.updates.clone(), layer.precond.a.inversions)
        opt.step(closure_for(opt, model, x, y))
        if layer.precond.a.updates > before[0]:
            stats_at.append(k)
            mb = mbars(model)["0"]
            stat = mb.T @ mb if stat is None else 0.5 * stat + 0.5 * (mb.T @ mb)
        if layer.precond.a.inversions != before[1]:
            roots_at.append(k)
    assert stats_at == [0, 2, 4, 6]
    assert roots_at == [0, 3, 6]
    torch.testing.assert_close(layer.precond.a.stat, stat)


def test_grafting_gives_each_layer_the_sgd_momentum_step_length():
    model = mlp()
    w0 = [p.detach().clone() for p in model.parameters()]
    opt = shampoo(model, lr=0.2, preconditioner={"grafting": "sgd"})
    x, y = data()
    opt.step(closure_for(opt, model, x, y))
    mb = mbars(model)
    params = list(model.parameters())
    for i, name in enumerate(["0", "2"]):
        dw = torch.cat([params[2 * i] - w0[2 * i], (params[2 * i + 1] - w0[2 * i + 1])[:, None]], 1)
        # SGD-momentum's step length: lr ||Mhat_1||, Mhat_1 = 0.1 Mbar (zero start)
        torch.testing.assert_close(torch.linalg.norm(dw), 0.2 * torch.linalg.norm(0.1 * mb[name]))
        # ... while the direction is Shampoo's
        d = root(mb[name] @ mb[name].T, 1e-4) @ mb[name] @ root(mb[name].T @ mb[name], 1e-4)
        cos = (dw * -d).sum() / (torch.linalg.norm(dw) * torch.linalg.norm(d))
        torch.testing.assert_close(cos, torch.ones((), dtype=F64))


@pytest.mark.parametrize("grafting", ["none", "sgd"])
def test_preconditioning_off_equals_momentum_sgd(grafting):
    x, y = teacher_data(64)
    m1, m2 = small_cnn(), small_cnn()
    opt = kfqn.build_optimizer(m1, "shampoo", lr=0.05, weight_decay=1e-3, momentum_init="first",
                               preconditioner={"precondition": False,
                               "precondition": False, "grafting": grafting})
    ref = torch.optim.SGD(m2.parameters(), lr=0.05, momentum=0.9, dampening=0.9,  # EMA form
                          weight_decay=1e-3)
    for xb, yb in zip(x.split(16), y.split(16)):
        opt.step(make_closure(opt, m1, xb, yb))
        make_closure(ref, m2, xb, yb)()
        ref.step()
        for p, q in zip(m1.parameters(), m2.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_resume_equals_uninterrupted_run():
    x, y = teacher_data(64)
    kw = dict(lr=0.05, preconditioner={"inverse_every": 3, "inverse_warmup": 2,
              "inverse_every": 3, "inverse_warmup": 2, "grafting": "sgd"})

    def run(model, opt, start, count):
        for i in range(start, start + count):
            s = (i * 16) % 64
            quiet(opt.step, make_closure(opt, model, x[s:s + 16], y[s:s + 16]))

    m1 = small_cnn()
    o1 = kfqn.build_optimizer(m1, "shampoo", **kw)
    run(m1, o1, 0, 8)
    m2 = small_cnn()
    o2 = kfqn.build_optimizer(m2, "shampoo", **kw)
    run(m2, o2, 0, 4)
    buf = io.BytesIO()
    torch.save({"model": m2.state_dict(), "opt": o2.state_dict()}, buf)
    buf.seek(0)
    snap = torch.load(buf, weights_only=False)
    m3 = small_cnn(seed=5)
    m3.load_state_dict(snap["model"])
    o3 = kfqn.build_optimizer(m3, "shampoo", **kw)
    o3.load_state_dict(snap["opt"])
    run(m3, o3, 4, 4)
    for p, q in zip(m1.parameters(), m3.parameters()):
        assert torch.equal(p, q)
    for name, f in o1.factors().items():
        for key, mat in f.items():
            assert torch.equal(mat, o3.factors()[name][key]), (name, key)
