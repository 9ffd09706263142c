"""Inversion strategies: damped inverses, which path ran (first, float64 retry, eigh), both
fallback modes agreeing, non-finite and indefinite input, tensor damping."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kfqn.inversion.cholesky as chol
from kfqn.inversion import CholeskyInversion, EighInversion, LazyCholeskyInversion

F64 = torch.float64


def cholesky(lazy: bool):
    return (LazyCholeskyInversion if lazy else CholeskyInversion)(min_eig=0.0)


def spd(n: int, seed: int, dtype=F64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    b = torch.randn(n, n, generator=g, dtype=F64)
    return (b @ b.T).to(dtype)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 7), damping=st.floats(1e-3, 10.0), seed=st.integers(0, 2**16),
       lazy=st.booleans())
def test_damped_inverse(n, damping, seed, lazy):
    a = spd(n, seed)
    eye = torch.eye(n, dtype=F64)
    for strategy in (cholesky(lazy), EighInversion(min_eig=0.0)):
        res = strategy.invert(a, damping)
        torch.testing.assert_close(res.inverse @ (a + damping * eye), eye, rtol=1e-7, atol=1e-7)
        assert int(res.fallback) == 0
        torch.testing.assert_close(res.inverse, res.inverse.T, rtol=0, atol=0)


@pytest.mark.parametrize("lazy", [False, True])
def test_indefinite_input_falls_back_to_clamped_eigh(lazy):
    a = torch.diag(torch.tensor([2.0, -1.0, -3.0], dtype=F64))
    res = cholesky(lazy).invert(a, 0.5)
    assert int(res.fallback) == 2 and int(res.clamped) == 2
    torch.testing.assert_close(res.inverse, torch.diag(torch.tensor([0.4, 2.0, 2.0], dtype=F64)))
    eig = EighInversion(min_eig=0.1).invert(a, 0.5)
    assert int(eig.clamped) == 2
    torch.testing.assert_close(eig.inverse, torch.diag(torch.tensor([0.4, 1 / 0.6, 1 / 0.6],
                                                                     dtype=F64)))


@pytest.mark.parametrize("lazy", [False, True])
def test_float32_failure_is_retried_in_float64(lazy, monkeypatch):
    real = chol.cholesky_inverse

    def flaky(m):
        inv, ok = real(m)
        return inv, ok & (m.dtype == torch.float64)   # float32 "fails"

    monkeypatch.setattr(chol, "cholesky_inverse", flaky)
    a = spd(4, 0, torch.float32)
    res = cholesky(lazy).invert(a, 0.1)
    assert int(res.fallback) == 1 and res.inverse.dtype == torch.float32
    torch.testing.assert_close(res.inverse @ (a + 0.1 * torch.eye(4)), torch.eye(4),
                               rtol=1e-4, atol=1e-4)


def test_nonfinite_input_never_reaches_lapack():
    a = torch.full((3, 3), float("nan"))
    for strategy in (cholesky(False),
                     EighInversion(min_eig=0.0)):
        res = strategy.invert(a, 0.5)
        torch.testing.assert_close(res.inverse, 2.0 * torch.eye(3))


def test_tensor_damping():
    a = spd(3, 1)
    d = torch.tensor(0.3, dtype=F64)
    for strategy in (cholesky(False),
                     EighInversion(min_eig=0.0)):
        torch.testing.assert_close(strategy.invert(a, d).inverse,
                                   torch.linalg.inv(a + 0.3 * torch.eye(3, dtype=F64)))
