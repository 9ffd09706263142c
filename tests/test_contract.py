"""One contract suite run over every registered component (the example DFP plugin included),
in the spirit of optax's shared optimizer tests: whatever a plugin registers must pass it."""
from __future__ import annotations

import io
import warnings

import pytest
import torch

import dfp_update
import kfqn
from kfqn.core.registry import Registry
from helpers import batches, make_closure, small_cnn, teacher_data
from test_layers import _run

REG = Registry()
REG.register(dfp_update)
F64 = torch.float64


def names(kind: str) -> list[str]:
    return REG.names(kind)


def _pairs(dim: int, n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    b = torch.randn(dim, dim, generator=g, dtype=F64)
    b = b @ b.T + 0.5 * torch.eye(dim, dtype=F64)
    for _ in range(n):
        s = torch.randn(dim, generator=g, dtype=F64)
        yield s, b @ s + 0.05 * torch.randn(dim, generator=g, dtype=F64)


# -- factor update rules ---------------------------------------------------------------------
@pytest.mark.parametrize("name", names("factor_update"))
def test_factor_update_contract(name):
    cls = REG.get("factor_update", name)
    f = cls(4, F64, "cpu")
    torch.testing.assert_close(f.dense(), f.apply(torch.eye(4, dtype=F64)))
    for s, y in _pairs(4, 6):
        accepted = f.update(s, y)
        assert accepted.dtype == torch.bool and accepted.dim() == 0
        h = f.dense()
        torch.testing.assert_close(h, h.T, rtol=1e-8, atol=1e-10)
        if cls.satisfies_secant:
            assert bool(accepted)
            torch.testing.assert_close(f.apply(y), s, rtol=1e-6, atol=1e-8)
        if cls.keeps_positive_definite:
            assert float(torch.linalg.eigvalsh(h).min()) > 0
    before = f.dense()
    s, y = next(_pairs(4, 1, seed=1))
    assert not bool(f.update(s, -y))                      # s^T y < 0: skipped
    assert not bool(f.update(s * float("nan"), y))         # non-finite: skipped
    assert not bool(f.update(s, y, torch.tensor(False)))   # gate closed: skipped
    torch.testing.assert_close(f.dense(), before, rtol=0, atol=0)
    g = cls(4, F64, "cpu")
    g.load_state_dict(f.state_dict())
    torch.testing.assert_close(g.dense(), f.dense(), rtol=0, atol=0)
    assert f.state_bytes() >= 0


# -- damping rules -----------------------------------------------------------------------------
@pytest.mark.parametrize("name", names("damping"))
def test_damping_contract(name):
    cls = REG.get("damping", name)
    rule = cls(**{k: o.default for k, o in cls.options.items()})
    h = torch.diag(torch.tensor([0.5, 1.0, 2.0, 3.0], dtype=F64))
    g = torch.Generator().manual_seed(0)
    for _ in range(25):
        s = torch.randn(4, generator=g, dtype=F64)
        y = torch.randn(4, generator=g, dtype=F64)
        out = rule(s, y, lambda v: h @ v, 0.3)
        assert out.s.shape == s.shape and out.y.shape == y.shape
        assert torch.isfinite(out.s).all() and torch.isfinite(out.y).all()
        assert bool(rule.guarantee(out.s, out.y, lambda v: h @ v, 0.3)) or name == "none"
        for flag in out.active.values():
            assert flag.dtype == torch.bool


# -- inversion strategies --------------------------------------------------------------------
@pytest.mark.parametrize("name", names("inversion"))
def test_inversion_contract(name):
    cls = REG.get("inversion", name)
    inv = cls(**{k: o.default for k, o in cls.options.items()})
    a = torch.randn(5, 5, dtype=F64)
    a = a @ a.T
    res = inv.invert(a, 0.1)
    torch.testing.assert_close(res.inverse @ (a + 0.1 * torch.eye(5, dtype=F64)),
                               torch.eye(5, dtype=F64), rtol=1e-6, atol=1e-6)
    bad = -torch.eye(3, dtype=F64)  # not positive definite: must fall back, stay finite
    res = inv.invert(bad, 0.1)
    assert torch.isfinite(res.inverse).all()


# -- layer adapters ---------------------------------------------------------------------------
ADAPTER_CASES = [(n, i) for n in names("layer_adapter")
                 for i in range(len(REG.get("layer_adapter", n).examples()))]


@pytest.mark.parametrize("name,i", ADAPTER_CASES)
def test_layer_adapter_contract(name, i):
    cls = REG.get("layer_adapter", name)
    module, shape = cls.examples()[i]
    module = module.double()
    assert cls.matches(module) and cls.unsupported_reason(module) is None
    ad = cls(module)
    x = torch.randn(*shape, dtype=F64)
    cap, _ = _run(module, ad, x)
    abar = ad.patches(x)
    g = ad.per_sample_grad_outputs(cap.grad_out)
    torch.testing.assert_close(torch.einsum("itg,ita->ga", g, abar) / x.shape[0],
                               ad.homogeneous_grad(), rtol=1e-9, atol=1e-10)
    s = torch.randn(ad.d_a, dtype=F64)
    flat = abar.reshape(-1, ad.d_a)
    torch.testing.assert_close(ad.hessian_action(x, s), flat.T @ (flat @ s) / x.shape[0],
                               rtol=1e-9, atol=1e-10)
    parts = ad.split(ad.homogeneous_weight())
    assert [p.shape for p in parts] == [p.shape for p in ad.params()]


# -- estimators, fallbacks, presets: built into a real optimizer -------------------------------
def _fit(spec, steps=4, model=None, **kw):
    model = model or small_cnn()
    x, y = teacher_data(128)
    opt = kfqn.build_optimizer(model, spec, registry=REG, **kw)
    it = batches(x, y, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if opt.needs_warm_start:
            with opt.warm_start():
                for i in range(0, 128, 32):
                    model(x[i:i + 32])
        losses = [float(opt.step(make_closure(opt, model, *next(it))).detach()) for _ in range(steps)]
    return model, opt, losses


def _resume_matches(spec, **kw):
    model, opt, _ = _fit(spec, steps=3, **kw)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    clone = small_cnn()
    clone.load_state_dict(model.state_dict())
    opt2 = kfqn.build_optimizer(clone, spec, registry=REG, **kw)
    opt2.load_state_dict(torch.load(buf, weights_only=False))
    x, y = teacher_data(32, seed=7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt.step(make_closure(opt, model, x, y))
        opt2.step(make_closure(opt2, clone, x, y))
    for p, q in zip(model.parameters(), clone.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("name", names("a_estimator"))
def test_a_estimator_contract(name):
    spec = {"preset": "kfbfgs_cnn", "a_side": name}
    model, opt, losses = _fit(spec)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    for f in opt.factors().values():
        if "H_a" in f:
            torch.testing.assert_close(f["H_a"], f["H_a"].T, rtol=1e-5, atol=1e-6)
    _resume_matches(spec)


@pytest.mark.parametrize("name", names("g_estimator"))
def test_g_estimator_contract(name):
    spec = {"preset": "kfbfgs_cnn", "g_side": name}
    model, opt, losses = _fit(spec)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    _resume_matches(spec)


@pytest.mark.parametrize("name", names("fallback"))
def test_fallback_contract(name):
    model = small_cnn()
    bn = model[1].weight.detach().clone()
    model, opt, _ = _fit({"preset": "kfbfgs_cnn", "fallback": name}, model=model)
    assert "1.weight" in opt.fallback_params
    assert not torch.equal(model[1].weight, bn) and torch.isfinite(model[1].weight).all()


@pytest.mark.parametrize("name", names("preset"))
def test_preset_contract(name):
    model, opt, losses = _fit(name, steps=30)
    assert all(l == l for l in losses), losses
    assert sum(losses[-5:]) / 5 < losses[0], losses
    assert opt.stats()["_global"]["nonfinite_steps"] == 0
