"""Inversion strategies: damped inverses, which path ran (first, float64 retry, eigh or shifted
Cholesky), every fallback mode agreeing, non-finite and indefinite input, tensor damping."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kfqn.inversion.cholesky as chol
from kfqn.inversion import CholeskyInversion, EighInversion, LazyCholeskyInversion

F64 = torch.float64


MODES = ["auto", "on_failure", "never", "lazy_class"]


def cholesky(mode):
    """The cholesky strategy in a host_reads mode (``True``/``False``: lazy class / auto)."""
    if mode is True or mode == "lazy_class":
        return LazyCholeskyInversion(min_eig=0.0)
    return CholeskyInversion(min_eig=0.0, host_reads="auto" if mode is False else mode)


def spd(n: int, seed: int, dtype=F64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    b = torch.randn(n, n, generator=g, dtype=F64)
    return (b @ b.T).to(dtype)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 7), damping=st.floats(1e-3, 10.0), seed=st.integers(0, 2**16),
       lazy=st.sampled_from(MODES))
def test_damped_inverse(n, damping, seed, lazy):
    a = spd(n, seed)
    eye = torch.eye(n, dtype=F64)
    for strategy in (cholesky(lazy), EighInversion(min_eig=0.0)):
        res = strategy.invert(a, damping)
        torch.testing.assert_close(res.inverse @ (a + damping * eye), eye, rtol=1e-7, atol=1e-7)
        assert int(res.fallback) == 0
        torch.testing.assert_close(res.inverse, res.inverse.T, rtol=0, atol=0)


@pytest.mark.parametrize("lazy", ["auto", "on_failure", "lazy_class"])
def test_indefinite_input_falls_back_to_clamped_eigh(lazy):
    a = torch.diag(torch.tensor([2.0, -1.0, -3.0], dtype=F64))
    res = cholesky(lazy).invert(a, 0.5)
    assert int(res.fallback) == 2 and int(res.clamped) == 2
    torch.testing.assert_close(res.inverse, torch.diag(torch.tensor([0.4, 2.0, 2.0], dtype=F64)))
    eig = EighInversion(min_eig=0.1).invert(a, 0.5)
    assert int(eig.clamped) == 2
    torch.testing.assert_close(eig.inverse, torch.diag(torch.tensor([0.4, 1 / 0.6, 1 / 0.6],
                                                                     dtype=F64)))


@pytest.mark.parametrize("lazy", MODES)
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


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 6), damping=st.floats(1e-3, 2.0), seed=st.integers(0, 2**16),
       dtype=st.sampled_from([torch.float32, F64]))
def test_sync_free_last_resort_is_the_shifted_cholesky_inverse(n, damping, seed, dtype):
    """host_reads=never on an indefinite matrix: code 3, the exact inverse of
    a + (damping + r) I with r the Gershgorin shift, symmetric positive definite."""
    g = torch.Generator().manual_seed(seed)
    b = torch.randn(n, n, generator=g, dtype=F64)
    m = b @ b.T
    low = torch.linalg.eigvalsh(m)[0]
    a = m - (low + damping + 0.5) * torch.eye(n, dtype=F64)  # smallest eigenvalue -damping-0.5
    res = cholesky("never").invert(a.to(dtype), damping)
    assert int(res.fallback) == 3 and res.inverse.dtype == dtype
    shift = chol.gershgorin_shift(a)
    expect = torch.linalg.inv(a + (damping + float(shift)) * torch.eye(n, dtype=F64))
    tol = 1e-4 if dtype == torch.float32 else 1e-8
    torch.testing.assert_close(res.inverse.double(), expect, rtol=tol, atol=tol)
    assert bool((torch.linalg.eigvalsh(res.inverse.double()) > 0).all())


def test_gershgorin_shift_makes_the_matrix_diagonally_dominant():
    a = torch.tensor([[1.0, -3.0, 0.5], [-3.0, 0.0, 1.0], [0.5, 1.0, -2.0]], dtype=F64)
    r = chol.gershgorin_shift(a)
    assert float(r) == pytest.approx(4.0)  # row 2: 3 + 1 - 0 = 4; row 3: 1.5 + 2 = 3.5
    m = a + float(r) * torch.eye(3, dtype=F64)
    assert bool((torch.diagonal(m) >= m.abs().sum(1) - torch.diagonal(m).abs()).all())


@pytest.mark.parametrize("mode", ["on_failure", "never"])
def test_modes_agree_on_the_first_path(mode, device):
    a = spd(5, 3, torch.float32).to(device)
    res = cholesky(mode).invert(a, 0.2)
    ref = torch.linalg.inv(a.double() + 0.2 * torch.eye(5, dtype=F64, device=device))
    assert int(res.fallback) == 0
    torch.testing.assert_close(res.inverse.double(), ref, rtol=1e-4, atol=1e-4)


def test_unknown_host_reads_mode_is_a_config_error():
    import kfqn
    from kfqn.core.errors import ConfigError
    model = torch.nn.Sequential(torch.nn.Linear(3, 2))
    with pytest.raises(ConfigError, match="host_reads"):
        kfqn.build_optimizer(model, "kfbfgs_cnn",
                             dotlist=["a_side.inversion={name: cholesky, host_reads: sometimes}"])
