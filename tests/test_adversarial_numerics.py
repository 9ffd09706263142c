"""Issue 10, items 2-5: inversions, update rules and dampings under adversarial input.

Reproducers of the stress run's findings, each asserting the property that was broken:
every inversion strategy returns a finite symmetric positive definite inverse for any finite
symmetric input (never raises); L-BFGS rejects a pair that would make H non-finite (both product
forms); a factor that is given a non-finite value resets and counts it; the damping rules give a
finite pair that meets the postcondition or is rejected explicitly; BFGS does not lose positive
definiteness to cancellation in float32.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kfqn.inversion import CholeskyInversion, EighInversion, LazyCholeskyInversion
from kfqn.updates.base import postcondition_rtol
from kfqn.updates.bfgs import BFGSFactor
from kfqn.updates.damping import DDV2Damping, DoubleDamping, PowellDamping
from kfqn.updates.identity import IdentityFactor
from kfqn.updates.lbfgs import LBFGSFactor
from strategies import LBFGS_FORMS

DTYPES = [torch.float32, torch.float64]
STRATEGIES = {
    "cholesky_on_failure": lambda: CholeskyInversion(min_eig=0.0, host_reads="on_failure"),
    "cholesky_never": lambda: CholeskyInversion(min_eig=0.0, host_reads="never"),
    "cholesky_auto": lambda: CholeskyInversion(min_eig=0.0),
    "cholesky_lazy": lambda: LazyCholeskyInversion(min_eig=0.0),
    "eigh": lambda: EighInversion(min_eig=0.0),
}


def assert_spd(m: torch.Tensor, rel: float = 1e-6) -> None:
    """Finite, symmetric, lambda_min >= -rel * lambda_max (computed in float64)."""
    assert bool(torch.isfinite(m).all()), m
    torch.testing.assert_close(m, m.T, rtol=0, atol=0)
    e = torch.linalg.eigvalsh(m.double())
    assert float(e[-1]) > 0, e
    assert float(e[0]) >= -rel * float(e[-1]), e


# -- item 2: degenerate batches in the inversions ---------------------------------------------
@pytest.mark.parametrize("name", sorted(STRATEGIES))
@pytest.mark.parametrize("dtype", DTYPES)
def test_rank_one_huge_matrix_inverts(name, dtype):
    """The reproducer: ones(3, 3) * 1e20 raised in cholesky_inverse before the success check."""
    a = torch.ones(3, 3, dtype=dtype) * 1e20
    res = STRATEGIES[name]().invert(a, 0.5)
    assert res.inverse.dtype == dtype
    assert_spd(res.inverse)
    # the inverse never exceeds 1/damping along any direction (a is PSD)
    assert float(torch.linalg.eigvalsh(res.inverse.double())[-1]) <= 2.0 * (1 + 1e-5)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
@pytest.mark.parametrize("dtype", DTYPES)
def test_identical_samples_covariance_inverts(name, dtype):
    """A of 8 identical samples full((8, 4), 1e4) with a bias column: rank one, entries 1e8."""
    x = torch.cat([torch.full((8, 4), 1e4, dtype=dtype), torch.ones(8, 1, dtype=dtype)], 1)
    a = x.T @ x / 8
    res = STRATEGIES[name]().invert(a, math.sqrt(0.3))
    assert_spd(res.inverse)


finite_entry = st.one_of(st.floats(-1e30, 1e30).map(lambda v: float(torch.tensor(v, dtype=torch.float32))), st.sampled_from([0.0, 1e-30, 1e30, -1e30, 1e-40, 3e38, -3e38]))


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 5), data=st.data(), name=st.sampled_from(sorted(STRATEGIES)),
       dtype=st.sampled_from(DTYPES), damping=st.sampled_from([1e-8, 1e-3, 0.5, 1e3]))
def test_any_finite_symmetric_input_gives_finite_spd_inverse(n, data, name, dtype, damping):
    vals = data.draw(st.lists(finite_entry, min_size=n * n, max_size=n * n))
    m = torch.tensor(vals, dtype=torch.float64).reshape(n, n)
    a = (0.5 * m + 0.5 * m.T).to(dtype)
    res = STRATEGIES[name]().invert(a, damping)   # never raises
    assert res.inverse.dtype == dtype
    assert int(res.fallback) in (0, 1, 2, 3, 4)
    assert_spd(res.inverse)


@pytest.mark.parametrize("dtype", DTYPES)
def test_diagonal_fallback_when_everything_overflows(dtype):
    """Entries at the dtype's largest value: a finite positive definite scaled identity."""
    big = torch.finfo(dtype).max
    a = torch.tensor([[big, -big], [-big, big]], dtype=dtype)
    for name, make in STRATEGIES.items():
        res = make().invert(a, 0.1)
        assert_spd(res.inverse)


# -- item 3: L-BFGS overflow guard, resets ----------------------------------------------------
@pytest.mark.parametrize("form", sorted(LBFGS_FORMS))
@pytest.mark.parametrize("dtype", DTYPES)
def test_lbfgs_rejects_pairs_that_overflow(form, dtype):
    big = torch.finfo(dtype).max
    f = LBFGSFactor(3, dtype, "cpu", memory=4, **LBFGS_FORMS[form])
    s = torch.tensor([1.0, 0.5, 0.0], dtype=dtype)
    assert bool(f.update(s, 2 * s))
    before = {k: v.clone() for k, v in f.state_dict().items()}
    cases = [
        (torch.full((3,), big / 2, dtype=dtype), torch.full((3,), big / 2, dtype=dtype)),  # s^T y = inf
        (torch.tensor([1e30, 0, 0], dtype=dtype), torch.tensor([1e30, 0, 0], dtype=dtype)),
        (torch.tensor([1e-30, 0, 0], dtype=dtype), torch.tensor([1e30, 1e30, 0], dtype=dtype)),
        (torch.tensor([1e20, 0, 0], dtype=dtype), torch.tensor([1e-20, 1e20, 0], dtype=dtype)),
    ]
    for s_bad, y_bad in cases:
        f.update(s_bad, y_bad)
        h = f.dense()
        assert bool(torch.isfinite(h).all()), (s_bad, y_bad)
        assert bool(torch.isfinite(f.apply(torch.ones(3, dtype=dtype))).all())
    # the first (s^T y = inf) is rejected and changes nothing
    g = LBFGSFactor(3, dtype, "cpu", memory=4, **LBFGS_FORMS[form])
    g.load_state_dict(before)
    assert not bool(g.update(*cases[0]))
    for k, v in g.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("form", sorted(LBFGS_FORMS))
def test_lbfgs_scaled_gamma_never_zero_or_inf(form):
    f = LBFGSFactor(2, torch.float32, "cpu", memory=2, gamma="scaled", **LBFGS_FORMS[form])
    s = torch.tensor([1e20, 0.0])
    y = torch.tensor([1e-20, 0.0])     # y^T y underflows to 0: s^T y / y^T y would be inf
    f.update(s, y)
    assert 0 < float(f.gamma) < math.inf
    assert bool(torch.isfinite(f.dense()).all())


def test_lbfgs_loss_scaled_by_1e15_keeps_the_factor():
    """One step with the loss scaled by 1e15 used to freeze an L-BFGS layer for good."""
    torch.manual_seed(0)
    f = LBFGSFactor(6, torch.float32, "cpu", memory=10)
    for _ in range(5):
        s = torch.randn(6)
        f.update(s, 2 * s + 0.1 * torch.randn(6))
    s = torch.randn(6) * 1e15
    f.update(s, 1e15 * s)
    assert bool(torch.isfinite(f.dense()).all())
    s = torch.randn(6)
    assert bool(f.update(s, 2 * s))                      # still learning afterwards
    torch.testing.assert_close(f.apply(2 * s), s, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("make", [
    lambda dt: BFGSFactor(3, dt, "cpu"),
    lambda dt: LBFGSFactor(3, dt, "cpu", memory=2, dense_factor=10**9),
    lambda dt: LBFGSFactor(3, dt, "cpu", memory=2, dense_factor=0),
    lambda dt: IdentityFactor(3, dt, "cpu"),
])
@pytest.mark.parametrize("dtype", DTYPES)
def test_factor_resets_counter(make, dtype):
    f = make(dtype)
    st_ = f.stats()
    assert set(st_) == {"resets"} and st_["resets"].dtype == torch.long and st_["resets"].dim() == 0
    assert int(st_["resets"]) == 0
    sd = f.state_dict()
    assert "resets" in sd
    # a poisoned state loads as the initial value and is counted
    bad = {k: (v.clone().fill_(float("nan")) if v.is_floating_point() else v.clone())
           for k, v in sd.items() if k != "resets"}
    g = make(dtype)
    g.load_state_dict(bad)                                # an old state dict: no "resets" key
    if isinstance(g, IdentityFactor):
        assert int(g.stats()["resets"]) == 0
        return
    assert int(g.stats()["resets"]) == 1
    torch.testing.assert_close(g.dense(), torch.eye(3, dtype=dtype), rtol=0, atol=0)
    h = make(dtype)
    h.load_state_dict(g.state_dict())                     # the count travels with the state
    assert int(h.stats()["resets"]) == 1


@pytest.mark.parametrize("dtype", DTYPES)
def test_bfgs_reset_with_nonfinite_h0_is_identity_and_counted(dtype):
    f = BFGSFactor(2, dtype, "cpu")
    f.reset(torch.tensor([[1.0, float("inf")], [float("inf"), 1.0]], dtype=dtype))
    torch.testing.assert_close(f.dense(), torch.eye(2, dtype=dtype))
    assert int(f.stats()["resets"]) == 1


@pytest.mark.parametrize("dtype", DTYPES)
def test_bfgs_rejects_a_pair_whose_update_overflows_h(dtype):
    big = torch.finfo(dtype).max
    f = BFGSFactor(2, dtype, "cpu")
    f.reset(torch.diag(torch.tensor([big / 8, 1.0], dtype=dtype)))
    s = torch.tensor([1.0, 0.0], dtype=dtype)
    y = torch.tensor([0.0, 1e-30], dtype=dtype)
    f.update(torch.tensor([big ** 0.5, 0.0], dtype=dtype), torch.tensor([1.0, 0.0], dtype=dtype))
    f.update(s, y)
    assert bool(torch.isfinite(f.dense()).all())


# -- item 5: float32 cancellation in BFGS -----------------------------------------------------
def test_bfgs_float32_cancellation_reproducer():
    f = BFGSFactor(1, torch.float32, "cpu")
    f.reset(torch.tensor([[1e30]]))
    f.update(torch.tensor([0.6]), torch.tensor([0.6]))
    assert float(f.dense()) > 0                           # was 0: accepted and cancelled


@settings(max_examples=80, deadline=None)
@given(scale=st.floats(1e2, 1e36), d=st.integers(1, 5), seed=st.integers(0, 2**16),
       dtype=st.sampled_from(DTYPES))
def test_bfgs_ill_scaled_h_stays_positive_definite(scale, d, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    ev = torch.ones(d, dtype=torch.float64)
    ev[0] = scale if dtype == torch.float64 or scale < 1e36 else 1e36
    f = BFGSFactor(d, dtype, "cpu")
    f.reset(((q * ev) @ q.T).to(dtype))
    for _ in range(6):
        s = torch.randn(d, generator=g, dtype=torch.float64)
        y = s * torch.rand(d, generator=g, dtype=torch.float64).add(0.1)
        f.update(s.to(dtype), y.to(dtype))
        assert_spd(f.dense())


# -- item 4: dampings -------------------------------------------------------------------------
RULES = {"powell": PowellDamping(mu1=0.2), "dd": DoubleDamping(mu1=0.2),
         "ddv2": DDV2Damping(mu1=0.2)}
vec_entry = st.one_of(st.floats(-1e3, 1e3).map(lambda v: float(torch.tensor(v, dtype=torch.float32))),
                      st.sampled_from([0.0, 1e-30, -1e-30, 1e-40, 1e15, -1e15, 1e30]))


@settings(max_examples=300, deadline=None)
@given(data=st.data(), d=st.integers(1, 4), rule=st.sampled_from(sorted(RULES)),
       dtype=st.sampled_from(DTYPES), mu2=st.sampled_from([0.0, 1e-4, 0.3, 0.95, 1.0, 2.0]),
       hscale=st.sampled_from([1e-20, 1.0, 1e20]))
def test_dampings_give_finite_pairs_meeting_the_postcondition_or_rejected(data, d, rule, dtype,
                                                                          mu2, hscale):
    s = torch.tensor(data.draw(st.lists(vec_entry, min_size=d, max_size=d)), dtype=dtype)
    y = data.draw(st.one_of(st.just(s.clone()),
                            st.lists(vec_entry, min_size=d, max_size=d).map(
                                lambda v: torch.tensor(v, dtype=dtype))))
    h = torch.diag(torch.linspace(0.5, 2.0, d, dtype=torch.float64) * hscale).to(dtype)
    hy = lambda v: h @ v  # noqa: E731
    out = RULES[rule](s, y, hy, mu2)
    assert out.ok is not None and out.ok.dtype == torch.bool
    assert bool(torch.isfinite(out.s).all() and torch.isfinite(out.y).all())
    if bool(out.ok):
        assert bool(RULES[rule].guarantee(out.s, out.y, hy, mu2))
        rtol = postcondition_rtol(dtype)
        sy, ss = float(out.s.double() @ out.y.double()), float(out.s.double() @ out.s.double())
        normal = float(out.s @ out.s) >= torch.finfo(dtype).tiny  # s^T s did not underflow
        if rule != "powell" and normal:
            assert sy >= mu2 * ss * (1 - 10 * rtol), (sy, ss)
    else:
        assert not bool(out.s.any()) and not bool(out.y.any())   # rejected: zero pair


def test_damping_reproducers_from_the_stress_run():
    """mu2 = 0 with s = 0, and y == s with mu2 = 2 (no theta2 exists): NaN before."""
    h = lambda v: v  # noqa: E731
    for dtype in DTYPES:
        z = torch.zeros(3, dtype=dtype)
        one = torch.ones(3, dtype=dtype)
        out = DoubleDamping(mu1=0.2)(z, one, h, 0.0)
        assert bool(torch.isfinite(out.s).all() and torch.isfinite(out.y).all())
        out = DoubleDamping(mu1=0.2)(one, one, h, 2.0)
        assert bool(torch.isfinite(out.s).all() and torch.isfinite(out.y).all())
        if bool(out.ok):
            assert float(out.s @ out.y) >= 2.0 * float(out.s @ out.s) * (1 - 1e-4)
        # y^T H y overflows to inf in float32
        big = torch.full((3,), 1e20, dtype=dtype)
        for rule in RULES.values():
            out = rule(torch.ones(3, dtype=dtype), big, h, 0.3)
            assert bool(torch.isfinite(out.s).all() and torch.isfinite(out.y).all())


@pytest.mark.parametrize("rule", sorted(RULES))
def test_comparisons_are_non_strict(rule):
    """docs/algorithms.md §3.3-3.4: Powell fires when s^T y <= mu1 y^T H y; DD's second stage when s^T y / s^T s <= mu2."""
    h = lambda v: v  # noqa: E731
    s = torch.tensor([1.0, 0.0], dtype=torch.float64)
    y = torch.tensor([0.25, 0.0], dtype=torch.float64)  # y^T H y = 1/16, s^T y = 1/4 ... scale:
    # s^T y = 0.25, y^T y = 0.0625: Powell at mu1 = 4 would be equality; use y = 5 s / ... instead
    y = torch.tensor([5.0, 0.0], dtype=torch.float64)   # s^T y = 5, y^T H y = 25, mu1 * 25 = 5
    out = RULES[rule](s, y, h, 0.3)
    assert bool(out.active["powell"])                    # equality fires
    if rule == "dd":
        s2 = torch.tensor([2.0, 0.0], dtype=torch.float64)
        y2 = torch.tensor([0.6, 1.0], dtype=torch.float64)  # s^T y / s^T s = 1.2 / 4 = 0.3 = mu2
        out = DoubleDamping(mu1=0.2)(s2, y2, lambda v: 0.01 * v, 0.3)
        assert bool(out.active["second"])
