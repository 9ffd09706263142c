"""BFGS / L-BFGS inverse updates: secant equation, symmetry, positive definiteness, skipping,
and dense BFGS == L-BFGS while the memory holds every pair (docs/algorithms.md §3)."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given
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
