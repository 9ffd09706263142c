"""BFGS / L-BFGS inverse updates: secant equation, symmetry, positive definiteness, skipping,
and dense BFGS == L-BFGS while the memory holds every pair (docs/algorithms.md §3)."""
from __future__ import annotations

import pytest
import torch
from hypothesis import assume, event, given
from hypothesis import strategies as st

from kfqn.updates.bfgs import BFGSFactor, bfgs_inverse_update
from kfqn.updates.lbfgs import LBFGSFactor
from strategies import LBFGS_FORMS, curvature_pair, spd

F64 = torch.float64


def _min_eig(h: torch.Tensor) -> float:
    return float(torch.linalg.eigvalsh(h).min())


@given(st.data())
def test_bfgs_secant_symmetry_pd(data):
    h = data.draw(spd())
    d = h.shape[0]
    s, y = data.draw(curvature_pair(d))
    f = BFGSFactor(d, F64, "cpu")
    f.reset(h)
    assert bool(f.update(s, y))
    new = f.dense()
    torch.testing.assert_close(new @ y, s, rtol=1e-7, atol=1e-9)  # H+ y = s
    torch.testing.assert_close(new, new.T, rtol=0, atol=0)
    assert _min_eig(new) > 0


@given(st.data())
def test_bfgs_expanded_form_equals_product_form(data):
    h = data.draw(spd())
    d = h.shape[0]
    s, y = data.draw(curvature_pair(d))
    rho = 1.0 / float(s @ y)
    eye = torch.eye(d, dtype=F64)
    ref = (eye - rho * torch.outer(s, y)) @ h @ (eye - rho * torch.outer(y, s)) + rho * torch.outer(s, s)
    torch.testing.assert_close(bfgs_inverse_update(h, s, y), ref, rtol=1e-8, atol=1e-8)


@given(st.data())
def test_bfgs_skips_nonpositive_curvature_and_nonfinite(data):
    h = data.draw(spd())
    d = h.shape[0]
    s, y = data.draw(curvature_pair(d))
    f = BFGSFactor(d, F64, "cpu")
    f.reset(h)
    assert not bool(f.update(s, -y))  # s^T y < 0
    torch.testing.assert_close(f.dense(), 0.5 * (h + h.T))
    bad = s.clone()
    bad[0] = float("nan")
    assert not bool(f.update(bad, y))
    assert not bool(f.update(s, y, allow=torch.tensor(False)))
    torch.testing.assert_close(f.dense(), 0.5 * (h + h.T))


@pytest.mark.parametrize("form", sorted(LBFGS_FORMS))
@given(st.integers(1, 6), st.integers(1, 6), st.data())
def test_lbfgs_equals_dense_bfgs_while_memory_holds_all_pairs(form, dim, n_pairs, data):
    dense = BFGSFactor(dim, F64, "cpu")
    limited = LBFGSFactor(dim, F64, "cpu", memory=n_pairs + data.draw(st.integers(0, 3)),
                          **LBFGS_FORMS[form])
    for _ in range(n_pairs):
        s, y = data.draw(curvature_pair(dim))
        # damp like the optimizer would so every pair is accepted by both
        assert bool(dense.update(s, y)) == bool(limited.update(s, y))
    v = torch.randn(dim, 3, dtype=F64)
    torch.testing.assert_close(limited.apply(v), dense.apply(v), rtol=1e-7, atol=1e-8)
    torch.testing.assert_close(limited.apply(v[:, 0]), dense.apply(v[:, 0]), rtol=1e-7, atol=1e-8)


@pytest.mark.parametrize("form", sorted(LBFGS_FORMS))
@given(st.integers(2, 6), st.data())
def test_lbfgs_fifo_keeps_newest_pairs_and_secant(form, dim, data):
    memory = 3
    f = LBFGSFactor(dim, F64, "cpu", memory=memory, **LBFGS_FORMS[form])
    pairs = [data.draw(curvature_pair(dim)) for _ in range(5)]
    for s, y in pairs:
        f.update(s, y)
    # rows oldest first: the last `memory` pairs
    for row, (s, y) in enumerate(pairs[-memory:]):
        torch.testing.assert_close(f.s[row], s)
        torch.testing.assert_close(f.y[row], y)
    s, y = pairs[-1]
    torch.testing.assert_close(f.apply(y), s, rtol=1e-6, atol=1e-8)  # newest pair's secant
    h = f.dense()
    torch.testing.assert_close(h, h.T, rtol=1e-8, atol=1e-8)
    assert _min_eig(h) > 0


@pytest.mark.parametrize("form", sorted(LBFGS_FORMS))
def test_lbfgs_rejected_pair_changes_nothing(form):
    f = LBFGSFactor(3, F64, "cpu", memory=4, **LBFGS_FORMS[form])
    s = torch.tensor([1.0, 0.0, 0.0], dtype=F64)
    f.update(s, 2 * s)
    before = {k: v.clone() for k, v in f.state_dict().items()}
    assert not bool(f.update(s, -s))
    for k, v in f.state_dict().items():
        assert torch.equal(v, before[k])


@pytest.mark.parametrize("form", sorted(LBFGS_FORMS))
def test_lbfgs_scaled_gamma(form):
    f = LBFGSFactor(2, F64, "cpu", memory=2, gamma="scaled", **LBFGS_FORMS[form])
    s = torch.tensor([1.0, 0.0], dtype=F64)
    y = torch.tensor([4.0, 0.0], dtype=F64)
    f.update(s, y)
    assert float(f.gamma) == 0.25  # s^T y / y^T y
    torch.testing.assert_close(f.apply(torch.tensor([0.0, 1.0], dtype=F64)),
                               torch.tensor([0.0, 0.25], dtype=F64))


def test_state_dict_roundtrip_for_both_rules():
    for cls, kw in ((BFGSFactor, {}), (LBFGSFactor, {"memory": 3})):
        a = cls(4, F64, "cpu", **kw)
        for _ in range(3):
            s = torch.randn(4, dtype=F64)
            a.update(s, 2 * s + 0.1 * torch.randn(4, dtype=F64))
        b = cls(4, F64, "cpu", **kw)
        b.load_state_dict(a.state_dict())
        torch.testing.assert_close(a.dense(), b.dense())


# -- the floating-point guards of dense BFGS against loss of definiteness (issue 10) ----------

class _WithoutHyErrorGuard(BFGSFactor):
    hy_error_rtol = (float("inf"), float("inf"))


class _WithoutGrowthGuard(BFGSFactor):
    growth_rtol = (float("inf"), float("inf"))


class _WithoutNewGuards(BFGSFactor):
    hy_error_rtol = growth_rtol = (float("inf"), float("inf"))


@given(st.sampled_from([torch.float32, torch.float64]), st.booleans(), st.integers(1, 7),
       st.integers(1, 25), st.data())
def test_bfgs_new_guards_never_fire_on_well_scaled_pairs(dtype, from_identity, dim, n, data):
    """s^T y > 0 and moderate conditioning (y = B s + noise, B = M M^T + c I): the H y error
    guard and the growth guard never reject, so the factor follows, bit for bit, the same
    sequence as one without them, in float32 and float64."""
    guarded, free = BFGSFactor(dim, dtype, "cpu"), _WithoutNewGuards(dim, dtype, "cpu")
    if not from_identity:
        h0 = data.draw(spd(dim=dim)).to(dtype)
        guarded.reset(h0)
        free.reset(h0)
    for _ in range(n):
        s, y = (t.to(dtype) for t in data.draw(curvature_pair(dim)))
        ok_guarded, ok_free = guarded.update(s, y), free.update(s, y)
        assert bool(ok_guarded) == bool(ok_free)
        assert torch.equal(guarded.h, free.h)
    assert _min_eig(guarded.dense().double()) > 0


def _skewed(data, dim: int) -> torch.Tensor:
    """An SPD S plus a skew part A = K - K^T as large as S: a stored H whose H y is far off."""
    sym = data.draw(spd(dim=dim))
    k = data.draw(spd(dim=dim)) @ torch.triu(torch.ones(dim, dim, dtype=F64))
    skew = k - k.T
    return sym + skew * (float(sym.abs().max()) / max(float(skew.abs().max()), 1e-300))


@given(st.integers(2, 7), st.data())
def test_bfgs_hy_error_guard_rejects_and_leaves_h_unchanged(dim, data):
    """Where rho ||H y - H^T y||^2 / 4 > hy_error_rtol * max_i |(H+)_ii| the pair is rejected
    (update returns false, which the callers count) and H stays bitwise as it was."""
    h = _skewed(data, dim)
    s, y = data.draw(curvature_pair(dim))
    guarded, without = BFGSFactor(dim, F64, "cpu"), _WithoutHyErrorGuard(dim, F64, "cpu")
    for f in (guarded, without):
        f.load_state_dict({"h": h.clone()})
    hy = h @ y
    rho = 1.0 / float(s @ y)
    coef = (rho * float(y @ hy) + 1.0) * rho
    new_max = float((torch.diagonal(h) + (coef * s - 2.0 * rho * hy) * s).abs().max())
    fires = 0.25 * rho * float((hy - y @ h).norm()) ** 2 > BFGSFactor.hy_error_rtol[1] * new_max
    accepted_without = bool(without.update(s, y))
    # only the pairs every other guard accepts, on which this guard decides alone
    assume(accepted_without)
    event("fires" if fires else "does not fire")
    before = guarded.h.clone()
    accepted = bool(guarded.update(s, y))
    assert accepted == (not fires)
    if fires:
        assert torch.equal(guarded.h, before)
    else:
        assert torch.equal(guarded.h, without.h)


@given(st.sampled_from([torch.float32, torch.float64]), st.integers(1, 7), st.data())
def test_bfgs_growth_guard_rejects_and_leaves_h_unchanged(dtype, dim, data):
    """An H far smaller than the pair's own scale (rho ||s||^2): the increment's rounding
    would exceed growth_rtol times H's smallest diagonal entry, whose directions H+ keeps --
    the pair is rejected and H stays bitwise as it was."""
    # eps * bound >= eps * rho max|s|^2 > 1e-5 eps for these pairs, growth_rtol * min_i H_ii
    # <= 0.1 * 30 * tiny <= 3e-8 eps
    tiny = data.draw(st.floats(1e-3, 1.0)) * torch.finfo(dtype).eps * 1e-8
    h = (data.draw(spd(dim=dim)) * tiny).to(dtype)
    s, y = (t.to(dtype) for t in data.draw(curvature_pair(dim)))
    guarded, without = BFGSFactor(dim, dtype, "cpu"), _WithoutGrowthGuard(dim, dtype, "cpu")
    guarded.reset(h)
    without.reset(h)
    assume(bool(without.update(s, y)))
    before = guarded.h.clone()
    assert not bool(guarded.update(s, y))
    assert torch.equal(guarded.h, before)
