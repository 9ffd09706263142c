"""The A side's batched paths (issue 11, op budget) against the per-layer code they replace:
the Gram product of :class:`kfqn.layers.base.GramPlan`, the Linear adapter's means and rows,
and the EMA / minibatch Hessian-action estimators' ``after_step_group`` on a group of Linear
layers against their per-layer loops (float64, to 1e-12 relative: the bias row and column of A
now come from the one product of abar = [a, 1], and s^T y from a segmented sum)."""
from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import kfqn
from kfqn.curvature.base import StepInfo
from kfqn.curvature.ema_hessian_action import EMAHessianActionA, padded_square
from kfqn.curvature.minibatch_hessian_action import MinibatchHessianActionA
from kfqn.layers import LinearAdapter
from kfqn.layers.base import GRAM_BLOCK_MIN, GramPlan, add_gram_
from kfqn.layers.capture import Capture

F64 = torch.float64


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("d", [1, 7, GRAM_BLOCK_MIN - 1, GRAM_BLOCK_MIN, GRAM_BLOCK_MIN + 33])
def test_gram_plan_matches_add_gram(d):
    torch.manual_seed(d)
    a = torch.randn(5, d, dtype=F64)
    base = torch.randn(d, d, dtype=F64)
    base = base + base.T
    out = base.clone()
    plan = GramPlan(out)
    assert plan.valid_for(out) and not plan.valid_for(out.clone())
    assert plan.add_(a, 0.3) is out
    _close(out, add_gram_(base.clone(), a, 0.3))
    if len(plan.rows) > 1:   # blocked: the off-diagonal blocks mirror each other exactly
        for lo, hi in zip(plan.edges[:-1], plan.edges[1:]):
            assert torch.equal(out[hi:, lo:hi], out[lo:hi, hi:].T)
    plan.add_(a, 0.5)        # the cached views keep working on the same state tensor
    _close(out, add_gram_(add_gram_(base.clone(), a, 0.3), a, 0.5))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(6, 5), (3, 2, 5), (5,)])
def test_linear_means_bit_equal_to_reshaped(bias, shape):
    """The 2-D fast paths (no reshape) compute what the reshaping code computed, bit for bit."""
    torch.manual_seed(1)
    ad = LinearAdapter(nn.Linear(5, 4, bias=bias).double())
    x = torch.randn(*shape, dtype=F64)
    rows = x.reshape(-1, 5)
    mean = rows.mean(0)
    if bias:
        mean = torch.cat([mean, mean.new_ones(1)])
    assert torch.equal(ad.input_mean(x), mean)
    assert torch.equal(ad.output_mean(x), rows.mean(0))
    # m * mean: one sum for a 2-D gradient (rounded once), else the reshaped mean times m
    want = rows.sum(0) if x.dim() == 2 else rows.mean(0) * x.shape[0]
    assert torch.equal(ad.grad_output_mean(x), want)
    torch.testing.assert_close(ad.grad_output_mean(x), rows.mean(0) * x.shape[0])
    assert torch.equal(ad.homogeneous_rows(x), ad.patches(x.reshape(x.shape[0] if x.dim() > 1
                                                                     else 1, -1, 5)
                                                            if x.dim() == 1 else x).reshape(-1, ad.d_a))
    assert torch.equal(ad.homogeneous_rows(x).mean(0), ad.input_mean(x))


def _estimators(preset, dims, **kw):
    torch.manual_seed(0)
    layers = [nn.Linear(i, o) for i, o in zip(dims[:-1], dims[1:])]
    model = nn.Sequential(*[m for l in layers for m in (l, nn.Tanh())][:-1]).double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = kfqn.build_optimizer(model, preset, factor_dtype="float64", lr=0.01, **kw)
    x, t = torch.randn(7, dims[0], dtype=F64), torch.randn(7, dims[-1], dtype=F64)

    def closure():
        opt.zero_grad()
        loss = ((model(x) - t) ** 2).mean()
        loss.backward()
        return loss

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(2):
            opt.step(closure)
    return [layer.precond.a for layer in opt.layers.values()]


def _inputs(ests, data, ok):
    caps, infos = [], []
    okt = torch.tensor(ok)
    for e in ests:
        d = e.ctx.adapter.module.in_features
        x = torch.randn(data.draw(st.integers(1, 6)), d, dtype=F64)
        if not ok and data.draw(st.booleans()):
            x[0, 0] = float("nan")
        caps.append(Capture(inp=x))
        infos.append(StepInfo(okt, 3, data.draw(st.sampled_from([0.1, 0.5])), 0.3))
    return caps, infos


def _compare(ests, ref, keys):
    for e, r in zip(ests, ref):
        _close(e.factor.dense(), r.factor.dense())
        for k in keys:
            got, want = e._stats[k], r._stats[k]
            if want.dtype.is_floating_point:
                if torch.isfinite(want):
                    _close(got, want)
            else:
                assert torch.equal(got, want), k


def _inputs_fixed(ests):
    gen = torch.Generator().manual_seed(5)
    caps = [Capture(inp=torch.randn(3, e.ctx.adapter.module.in_features, dtype=F64,
                                    generator=gen)) for e in ests]
    return caps, [StepInfo(torch.tensor(True), 2, 0.2, 0.3) for _ in ests]


EMA_DIMS = [GRAM_BLOCK_MIN, 5, 3, 4]    # the first layer takes the blocked Gram product


def _ema_ests():
    return _estimators("kbfgs", EMA_DIMS, a_side={"warm_start": False})


@settings(max_examples=10, deadline=None)
@given(st.data(), st.booleans(), st.booleans())
def test_ema_batched_equals_loop(data, ok, fresh):
    ests, ref = _ema_ests(), _ema_ests()   # the same (seeded) state twice
    for e in ests + ref:
        if fresh:   # iteration 0: the EMA is skipped, the H_a update is not
            e.ema_updates.zero_()
    before = [e.a.clone() for e in ests]
    caps, infos = _inputs(ests, data, ok)
    assert all(e._batch_key(c, i) is not None for e, c, i in zip(ests, caps, infos))
    for step in range(2):   # twice: the second step reads the counters back from the first
        EMAHessianActionA.after_step_group(ests, caps, infos)
        EMAHessianActionA._after_step_loop(ref, caps, infos)
        for e, r, b in zip(ests, ref, before):
            _close(e.a, r.a)
            assert torch.equal(e.ema_updates, r.ema_updates)
            if not ok or (fresh and step == 0):
                assert torch.equal(e.a, b)   # untouched where skipped
    for e in ests:
        p = e._gram_plan()
        for lo, hi in zip(p.edges[:-1], p.edges[1:]):
            assert torch.equal(e.a[hi:, lo:hi], e.a[lo:hi, hi:].T)
    _compare(ests, ref, ["a_sy", "a_rejected"])


def test_ema_mixed_group_and_replaced_state():
    """A group mixing batched and per-layer layers (another dtype) runs each its own way; a
    state tensor replaced (load_state_dict) gets a new plan."""
    ests, ref = _ema_ests(), _ema_ests()
    EMAHessianActionA.after_step_group(ests, *_inputs_fixed(ests))   # a plan on the old A
    EMAHessianActionA._after_step_loop(ref, *_inputs_fixed(ref))
    old_a, plan = ests[0].a, ests[0]._plan
    for e in ests + ref:   # copied into the state tensors: the same tensors, the same plan
        e.load_state_dict({k: (v.clone() if k == "A" else v) for k, v in e.state_dict().items()})
    assert ests[0].a is old_a and ests[0]._plan is plan
    assert ests[0].a.stride(0) * ests[0].a.element_size() % 64 == 0   # padded rows
    ests[2].a = padded_square(ests[2].a.clone())      # a replaced A gets a new plan
    assert not ests[2]._plan.valid_for(ests[2].a)
    caps, infos = _inputs_fixed(ests)
    caps[1] = Capture(inp=caps[1].inp.float())
    infos = [StepInfo(torch.tensor(True), 3, 0.2, 0.3) for _ in ests]   # separate ok flags
    assert ests[1]._batch_key(caps[1], infos[1]) is None
    EMAHessianActionA.after_step_group(ests, caps, infos)
    EMAHessianActionA._after_step_loop(ref, caps, infos)
    assert ests[0]._plan is plan and ests[2]._plan.valid_for(ests[2].a)
    for e, r in zip(ests, ref):
        _close(e.a, r.a)
    _compare(ests, ref, ["a_sy", "a_rejected"])


@pytest.mark.parametrize("preset", ["kfbfgs_cnn", "kfbfgs_l_cnn"])
@settings(max_examples=8, deadline=None)
@given(data=st.data(), ok=st.booleans())
def test_minibatch_batched_equals_loop(preset, data, ok):
    ests, ref = _estimators(preset, [6, 5, 3, 4]), _estimators(preset, [6, 5, 3, 4])
    caps, infos = _inputs(ests, data, ok)
    assert all(e._rows_fast(c) for e, c in zip(ests, caps))
    for r in ref:   # the reference: the per-layer code (adapter means and Hessian action)
        r._rows_fast = lambda cap: False
    for _ in range(2):
        MinibatchHessianActionA.after_step_group(ests, caps, infos)
        MinibatchHessianActionA.after_step_group(ref, caps, infos)
    _compare(ests, ref, ["a_sy", "a_rejected"])


@pytest.mark.parametrize("preset", ["kbfgs", "kfbfgs_cnn"])
def test_apply_t_bit_equal(preset):
    ests = _estimators(preset, [6, 5, 3])
    for e in ests:
        mt = torch.randn(e.ctx.adapter.d_a, 4, dtype=F64)
        assert torch.equal(e.apply_t(mt), e.apply(mt.T).T)


def test_minibatch_a_sy_is_the_damped_pairs_product(monkeypatch):
    """``a_sy`` (taken from the flat damping's own s^T y) equals the dot product of the pair the
    damping returned, layer by layer."""
    import warnings

    import kfqn
    from kfqn.updates.damping import PowellDamping

    seen = []
    orig = PowellDamping.many

    def many(self, *a, **k):
        out = orig(self, *a, **k)
        seen.append([(d.s.clone(), d.y.clone()) for d in out])
        return out

    monkeypatch.setattr(PowellDamping, "many", many)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4), nn.Tanh(),
                          nn.Linear(4, 3)).double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = kfqn.build_optimizer(model, "kfbfgs_l_cnn", factor_dtype="float64")
    x, y = torch.randn(32, 6, dtype=F64), torch.randint(0, 3, (32,))

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss
    for _ in range(3):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt.step(closure)
    assert seen and len(seen[-1]) == len(opt.layers)
    for layer, (s, yy) in zip(opt.layers.values(), seen[-1]):
        torch.testing.assert_close(layer.precond.a._stats["a_sy"].to(F64), torch.dot(s, yy),
                                   rtol=1e-12, atol=1e-300)
