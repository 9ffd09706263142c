"""Damping guarantees of docs/algorithms.md §3: Powell, DD, DDV2 (and 'none' leaves the pair alone)."""
from __future__ import annotations

import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from kfqn.updates.damping import DDV2Damping, DoubleDamping, NoDamping, PowellDamping
from strategies import any_pair, spd

MU1 = 0.2


def _setup(data):
    h = data.draw(spd())
    s, y = data.draw(any_pair(h.shape[0]))
    mu2 = data.draw(st.floats(0.01, 0.95))
    return h, s, y, mu2, (lambda v: h @ v)


@given(st.data())
def test_powell(data):
    h, s, y, mu2, hy = _setup(data)
    yhy = float(y @ h @ y)
    out = PowellDamping(mu1=MU1)(s, y, hy, mu2)
    torch.testing.assert_close(out.y, y)
    sy_new = float(out.s @ out.y)
    if float(s @ y) < MU1 * yhy:
        assert bool(out.active["powell"])
        assert abs(sy_new - MU1 * yhy) <= 1e-9 * max(1.0, yhy)  # equality afterwards
    else:
        assert not bool(out.active["powell"])
        torch.testing.assert_close(out.s, s)
    assert sy_new >= MU1 * yhy - 1e-9 * max(1.0, yhy)


@given(st.data())
def test_double_damping(data):
    h, s, y, mu2, hy = _setup(data)
    out = DoubleDamping(mu1=MU1)(s, y, hy, mu2)
    s1, _ = PowellDamping(mu1=MU1)(s, y, hy, mu2).s, None
    torch.testing.assert_close(out.s, s1)  # first stage is Powell on H
    ss = float(out.s @ out.s)
    sy = float(out.s @ out.y)
    assume(ss > 1e-8)
    if float(s1 @ y) < mu2 * ss:
        assert bool(out.active["second"])
        assert abs(sy - mu2 * ss) <= 1e-9 * max(1.0, ss)  # s^T y = mu2 s^T s afterwards
    assert sy >= mu2 * ss - 1e-9 * max(1.0, ss)


@given(st.data())
def test_ddv2(data):
    h, s, y, mu2, hy = _setup(data)
    out = DDV2Damping(mu1=MU1)(s, y, hy, mu2)
    s1 = PowellDamping(mu1=MU1)(s, y, hy, mu2).s
    torch.testing.assert_close(out.s, s1)
    torch.testing.assert_close(out.y, y + mu2 * s1)  # Levenberg-Marquardt on H^{-1}
    ss = float(out.s @ out.s)
    assert float(out.s @ out.y) >= mu2 * ss - 1e-9 * max(1.0, ss)


@given(st.data())
def test_none_is_identity(data):
    h, s, y, mu2, hy = _setup(data)
    out = NoDamping()(s, y, hy, mu2)
    assert out.s is s and out.y is y


def test_dampings_keep_bfgs_update_positive_definite():
    """After DD or DDV2 the pair has s^T y > 0, so BFGS accepts it and H stays SPD."""
    from kfqn.updates.bfgs import BFGSFactor

    torch.manual_seed(3)
    for rule in (DoubleDamping(mu1=0.2), DDV2Damping(mu1=0.2)):
        f = BFGSFactor(5, torch.float64, "cpu")
        for _ in range(30):
            s, y = torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
            out = rule(s, y, f.apply, 0.3)
            assert bool(f.update(out.s, out.y))
        assert float(torch.linalg.eigvalsh(f.dense()).min()) > 0
