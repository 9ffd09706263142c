"""The G side's flat path (kfqn/curvature/secant_pairs.py ``_Group``, the flat damping kernels
of kfqn/updates/damping.py): the same pairs, averages, dampings, gates and updates as the
per-layer path, state at fixed addresses, and a fixed number of ops per family (issue 11)."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import kfqn
from helpers import OpCount, assert_resumes_exactly, batches, make_closure, quiet, tensor_paths
from kfqn.curvature.secant_pairs import SecantPairsG, _Group
from kfqn.updates.damping import DDV2Damping, DoubleDamping, PowellDamping

F64 = torch.float64




def mlp(seed: int = 0, widths=(6, 9, 7, 5, 4)) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), nn.Tanh()]
    return nn.Sequential(*layers[:-1]).double()


def data(n: int = 64, d: int = 6, k: int = 4, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=F64), torch.randint(0, k, (n,), generator=g)


def build(model, preset, **over):
    opt = quiet(kfqn.build_optimizer, model, preset, factor_dtype="float64", lr=0.05, **over)
    if opt.needs_warm_start:
        x, _ = data()
        with opt.warm_start():
            model(x)
    return opt


def g_estimators(opt) -> list[SecantPairsG]:
    return [layer.precond.g for layer in opt.layers.values()]


def run(model, opt, steps: int, seed: int = 1) -> None:
    x, y = data(seed=seed)
    it = batches(x, y, 16)
    for _ in range(steps):
        opt.step(make_closure(opt, model, *next(it)))


PRESETS = [("kbfgs", {}), ("kfbfgs_cnn", {}), ("kfbfgs_l_cnn", {}),
           ("kbfgs", {"g_side": {"source": "next_iterate"}}),
           ("kbfgs", {"g_side": {"ema_init": "first"}}),
           ("kbfgs", {"g_side": {"damping": {"name": "powell"}}}),
           ("kbfgs", {"g_side": {"damping": "none"}}),
           ("kfbfgs_cnn", {"g_side": {"norm_gate": True}})]
IDS = ["kbfgs", "kfbfgs_cnn", "kfbfgs_l_cnn", "next_iterate", "ema_first", "powell", "none",
       "ddv2_gate"]


@pytest.mark.parametrize("preset,over", PRESETS, ids=IDS)
def test_flat_group_matches_per_layer_path(preset, over, monkeypatch):
    """Float64: the flat path against the per-layer path (same damping kernels, BLAS dots and
    an unfused EMA there) over 6 steps: the parameters, H_g and the pair averages agree to
    1e-9 relative, the counters and decisions exactly."""
    model, twin = mlp(), mlp()
    opt = build(model, preset, **over)
    run(model, opt, 6)
    assert all(e._group is not None for e in g_estimators(opt))
    monkeypatch.setattr(_Group, "of", staticmethod(lambda *a: None))
    opt2 = build(twin, preset, **over)
    run(twin, opt2, 6)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)
    for e, f in zip(g_estimators(opt), g_estimators(opt2)):
        assert f._group is None
        for key in ("s_avg", "y_avg", "prev_h", "prev_g"):
            torch.testing.assert_close(getattr(e, key), getattr(f, key), rtol=1e-9, atol=1e-14)
        for key in ("pairs", "has_prev", "rejected"):
            assert torch.equal(getattr(e, key), getattr(f, key)), key
        torch.testing.assert_close(e.factor.dense(), f.factor.dense(), rtol=1e-9, atol=1e-12)
        se, sf = e.stats(), f.stats()
        assert se.keys() == sf.keys()
        for k in se:
            if se[k].dtype == torch.bool:
                assert torch.equal(se[k], sf[k]), k
            else:
                torch.testing.assert_close(se[k].to(F64), sf[k].to(F64), rtol=1e-9, atol=1e-14)


def g_addresses(opt) -> dict:
    """The G estimators' own state tensors (not the factors'), path -> address."""
    return {p: t.data_ptr() for p, t in tensor_paths(opt.state_dict())
            if "/g/" in p and "/factor/" not in p}


def test_group_state_is_views_at_fixed_addresses_and_loads_in_place():
    model, twin = mlp(), mlp()
    opt = build(model, "kbfgs")
    run(model, opt, 3)
    addr = {p: t.data_ptr() for p, t in tensor_paths(opt.state_dict())}
    grp = g_estimators(opt)[0]._group
    for e in g_estimators(opt):
        assert e._group is grp
        assert e.s_avg.untyped_storage().data_ptr() == grp.work.buf.untyped_storage().data_ptr()
    run(model, opt, 4, seed=2)
    assert addr == {p: t.data_ptr() for p, t in tensor_paths(opt.state_dict())}
    # a checkpoint loads into the buffers (addresses kept, group intact) and resumes exactly
    twin.load_state_dict(model.state_dict())
    opt2 = build(twin, "kbfgs")
    run(twin, opt2, 1, seed=3)             # builds opt2's groups
    addr2 = g_addresses(opt2)
    opt2.load_state_dict(opt.state_dict())
    assert addr2 == g_addresses(opt2)
    assert all(e._group is not None for e in g_estimators(opt2))
    x, y = data(seed=4)
    assert_resumes_exactly(opt, model, mlp(), lambda m: build(m, "kbfgs"), batches(x, y, 16))


def test_skipped_step_leaves_the_group_state_alone():
    model = mlp()
    opt = build(model, "kbfgs")
    run(model, opt, 3)
    before = {p: t.clone() for p, t in tensor_paths(opt.state_dict())}
    x, y = data()

    def bad():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x[:16]), y[:16]) * float("nan")
        loss.backward()
        return loss
    opt.step(bad)
    after = dict(tensor_paths(opt.state_dict()))
    for p, t in before.items():
        if "/g/" in p and "factor" not in p:
            assert torch.equal(t, after[p]), p


AE_G = (1000, 500, 250, 30, 250, 500, 1000, 784)


def _many_ops(rule, dims) -> int:
    g = torch.Generator().manual_seed(0)
    s = [torch.randn(d, generator=g) for d in dims]
    y = [si + 0.3 * torch.randn(d, generator=g) for si, d in zip(s, dims)]
    hy = [lambda v: v * 1.5] * len(dims)     # one op per layer
    mu2 = [0.1] * len(dims)
    rule.many(s, y, hy, mu2)   # caches
    with OpCount() as c:
        rule.many(s, y, hy, mu2)
    return c.n - len(dims)


@pytest.mark.parametrize("rule", [PowellDamping(), DoubleDamping(), DDV2Damping()],
                         ids=lambda r: r.name)
def test_damping_many_dispatches_a_fixed_number_of_ops(rule):
    """Besides the H y products, ``many`` dispatches the same ops for 2 layers as for the
    autoencoder's 8 (at most 50: Powell 27, DD 50, DDV2 37 today)."""
    eight, two = _many_ops(rule, AE_G), _many_ops(rule, AE_G[:2])
    assert eight == two and eight <= 50, (eight, two)


def test_g_side_group_step_op_count():
    """kbfgs on an MLP of 6 layers: the G side's after-trial hook dispatches <= 80 ops besides
    the factors' own H y products and updates (one op count per family, not per layer)."""
    model = mlp(widths=(6, 9, 7, 5, 8, 6, 4))
    opt = build(model, "kbfgs")
    run(model, opt, 3)
    grp = g_estimators(opt)[0]._group
    calls = {"n": 0}
    factor_cls = type(grp.factors[0])
    orig_update, orig_apply = factor_cls.update_many, factor_cls.apply

    def update_many(factors, s, y, allow):
        with _Paused():
            return orig_update(factors, s, y, allow)

    def apply(self, v):
        with _Paused():
            return orig_apply(self, v)

    counter = OpCount()

    class _Paused:
        def __enter__(self):
            self.n = counter.n

        def __exit__(self, *exc):
            counter.n = self.n

    orig_after = grp.after_trial

    def after_trial(*a):
        calls["n"] += 1
        with counter:
            orig_after(*a)
    grp.after_trial = after_trial
    try:
        factor_cls.update_many = classmethod(lambda cls, *a: update_many(*a))
        factor_cls.apply = apply
        run(model, opt, 1, seed=5)
    finally:
        factor_cls.update_many = orig_update
        factor_cls.apply = orig_apply
    assert calls["n"] == 1
    assert counter.n <= 80, counter.n


@settings(max_examples=30, deadline=None)
@given(st.data())
def test_flat_damping_close_to_the_per_layer_formulas(data):
    """Float64 ordinary pairs: each flat kernel's damped pair equals the per-layer
    implementation (``_single``: BLAS dots, textbook theta) to 1e-10 relative, with the same
    activations."""
    n = data.draw(st.integers(1, 5))
    dims = data.draw(st.lists(st.integers(1, 30), min_size=n, max_size=n))
    seed = data.draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    s = [torch.randn(d, generator=g, dtype=F64) for d in dims]
    y = [torch.randn(d, generator=g, dtype=F64) + 0.5 * si for si, d in zip(s, dims)]
    hs = []
    for d in dims:
        m = torch.randn(d, d, generator=g, dtype=F64)
        hs.append(m @ m.T / d + 0.5 * torch.eye(d, dtype=F64))
    hy = [lambda v, h=h: h @ v for h in hs]
    mu2 = [data.draw(st.sampled_from([0.05, 0.3, 0.9])) for _ in dims]
    for rule in (PowellDamping(), DoubleDamping(), DDV2Damping()):
        many = rule.many(s, y, hy, mu2)
        for i in range(n):
            ref = rule._single(s[i], y[i], hy[i](y[i]), mu2[i])
            assert bool(many[i].ok) == bool(ref.ok)
            for k in ref.active:
                assert bool(many[i].active[k]) == bool(ref.active[k]), (rule.name, k)
            torch.testing.assert_close(many[i].s, ref.s, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(many[i].y, ref.y, rtol=1e-10, atol=1e-12)
