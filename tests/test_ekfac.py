"""EKFAC (kfqn/preconditioners/ekfac.py): equals K-FAC when the scaling is the product of the
damped factor eigenvalues; its refitted scaling and direction match a dense eigenbasis
computation from explicit per-sample gradients; it trains and resumes exactly."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kfqn
from helpers import assert_resumes_exactly, batches, make_closure, quiet, small_cnn, teacher_data

F64 = torch.float64


def _opt(model, name, **kw):
    section = {"name": name, "warm_start": False, "inverse_every": 3, "inverse_warmup": 2,
               **kw.pop("preconditioner", {})}
    return quiet(kfqn.build_optimizer, model, {"preset": "kfac", "factor_dtype": "float64",
                                               "preconditioner": section, **kw})


@pytest.mark.parametrize("section", [
    {"fisher": "empirical"},
    {"fisher": "sampled", "seed": 4, "damping_split": "pi"},
    {"fisher": "exact", "stats_every": 2},
])
def test_kronecker_scaling_is_kfac(section):
    """S = (l_G + gamma_G)(l_A + gamma_A)^T gives K-FAC's (G + gG I)^-1 M (A + gA I)^-1."""
    x, y = teacher_data(64)
    x = x.double()
    m1, m2 = small_cnn().double(), small_cnn().double()
    o1 = _opt(m1, "kfac", preconditioner=section, lr=0.2)
    o2 = _opt(m2, "ekfac", preconditioner={**section, "scaling": "kronecker"}, lr=0.2)
    for (xb, yb), _ in zip(batches(x, y, 16), range(8)):
        o1.step(make_closure(o1, m1, xb, yb))
        o2.step(make_closure(o2, m2, xb, yb))
    moved = max(float((p - q).detach().abs().max()) for p, q in zip(m1.parameters(), small_cnn().double().parameters()))
    assert moved > 1e-3
    for p, q in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-10)


def test_refit_scaling_and_direction_match_a_dense_eigenbasis():
    torch.manual_seed(0)
    layer = nn.Linear(4, 3).double()
    model = nn.Sequential(layer, nn.Tanh(), nn.Linear(3, 2).double())
    x, t = torch.randn(10, 4, dtype=F64), torch.randn(10, 2, dtype=F64)
    before = [p.detach().clone() for p in layer.parameters()]
    opt = _opt(model, "ekfac", preconditioner={"fisher": "empirical", "loss": "mse",
                                               "loss_reduction": "mean"},
               lr=1.0, momentum=0.0, weight_decay=0.0, damping=0.3)

    def closure():
        opt.zero_grad()
        loss = F.mse_loss(model(x), t)
        loss.backward()
        return loss

    # dense oracle: per-sample gradients of l_i = mean-loss * m, from autograd one by one
    w0 = torch.cat([before[0], before[1][:, None]], 1)                  # Wbar (3, 5)
    per = []
    for i in range(10):
        xi = x[i:i + 1]
        wb = w0.clone().requires_grad_(True)
        h = xi @ wb[:, :4].T + wb[:, 4]
        out = model[2](torch.tanh(h))
        li = F.mse_loss(out, t[i:i + 1], reduction="sum") / 2          # = m * (this sample's share)
        per.append(torch.autograd.grad(li, wb)[0])
    opt.step(closure)  # after the oracle: the step moves the second layer too
    per = torch.stack(per)                                              # (m, d_g, d_a)
    abar = torch.cat([x, torch.ones(10, 1, dtype=F64)], 1)
    a = abar.T @ abar / 10
    f = opt.factors()["0"]
    torch.testing.assert_close(f["A"], a)
    q_a, q_g = f["Q_A"], f["Q_G"]
    q = torch.kron(q_g, q_a)                                           # row-major vec basis
    coords = per.reshape(10, -1) @ q                                   # Q^T vec(J_i)
    s = (coords ** 2).mean(0)
    lam = 0.3
    torch.testing.assert_close(f["S"].reshape(-1), s + lam)
    grad = per.mean(0)                                                  # the minibatch gradient
    dense = q @ ((q.T @ grad.reshape(-1)) / (s + lam))
    after = torch.cat([layer.weight.detach(), layer.bias.detach()[:, None]], 1)
    torch.testing.assert_close((w0 - after).reshape(-1), dense, rtol=1e-10, atol=1e-12)


def test_ekfac_trains_a_cnn_and_resumes_exactly():
    x, y = teacher_data(128)
    model = small_cnn()
    opt = _opt(model, "ekfac", lr=0.1)
    first = float(F.cross_entropy(model(x), y).detach())
    data = batches(x, y, 32)
    for _ in range(12):
        opt.step(make_closure(opt, model, *next(data)))
    assert float(F.cross_entropy(model(x), y).detach()) < 0.95 * first
    assert_resumes_exactly(opt, model, small_cnn(), lambda m: _opt(m, "ekfac", lr=0.1), data,
                           steps=4)


def test_ekfac_is_registered_from_its_own_file():
    reg = kfqn.default_registry()
    assert "ekfac" in reg.names("preconditioner")
    assert reg.get("preconditioner", "ekfac").__module__ == "kfqn.preconditioners.ekfac"


@pytest.mark.parametrize("scaling", ["refit", "kronecker"])
def test_statistics_every_few_steps(scaling):
    """stats_every > 1: a basis due on a step without statistics waits for the next one
    (refit), so the scaling is always estimated in the basis it is used with."""
    x, y = teacher_data(96)
    model = small_cnn()
    opt = _opt(model, "ekfac", preconditioner={"stats_every": 2, "scaling": scaling}, lr=0.1)
    data = batches(x, y, 32)
    first = float(F.cross_entropy(model(x), y).detach())
    for _ in range(9):
        opt.step(make_closure(opt, model, *next(data)))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert float(F.cross_entropy(model(x), y).detach()) < first
