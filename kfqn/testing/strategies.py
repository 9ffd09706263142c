"""Hypothesis strategies for testing kfqn components: SPD matrices, curvature pairs and
adversarial vectors (NaN, +-inf, signed zeros, huge, tiny and subnormal entries).

The well-behaved strategies (:func:`spd`, :func:`vector`, :func:`curvature_pair`,
:func:`any_pair`) give float64 CPU tensors; cast them with ``.to(dtype, device)``. The
adversarial ones take the dtype, so that "huge" and "tiny" mean the dtype's own extremes.
"""
from __future__ import annotations

from kfqn.testing import _deps  # noqa: F401  (a one-line ImportError without the test extra)

import numpy as np
import torch
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

F64 = torch.float64

finite = st.floats(-2.0, 2.0, allow_nan=False, allow_infinity=False, width=64)


@st.composite
def spd(draw, dim: int | None = None, min_dim: int = 1, max_dim: int = 7) -> torch.Tensor:
    """A symmetric positive definite float64 matrix M M^T + c I (entries of M in [-2, 2],
    c in [0.05, 2])."""
    d = dim if dim is not None else draw(st.integers(min_dim, max_dim))
    m = draw(arrays(np.float64, (d, d), elements=finite))
    c = draw(st.floats(0.05, 2.0))
    t = torch.from_numpy(m)
    return t @ t.T + c * torch.eye(d, dtype=F64)


@st.composite
def vector(draw, dim: int, nonzero: bool = True) -> torch.Tensor:
    """A float64 vector with entries in [-2, 2] (norm at least 1e-3 when ``nonzero``)."""
    v = torch.from_numpy(draw(arrays(np.float64, (dim,), elements=finite)))
    if nonzero and float(v.norm()) < 1e-3:
        v = v.clone()
        v[0] = 1.0
    return v


@st.composite
def curvature_pair(draw, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, y) with s^T y > 0: y = B s + small noise for an SPD B, flipped if needed."""
    b = draw(spd(dim=dim))
    s = draw(vector(dim))
    noise = draw(vector(dim, nonzero=False)) * draw(st.floats(0.0, 0.3))
    y = b @ s + noise
    if float(s @ y) <= 1e-6 * float(s.norm() * y.norm()):
        y = b @ s
    return s, y


@st.composite
def scaled_curvature_pair(draw, dim: int, max_exp: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """A :func:`curvature_pair` with s and y scaled by independent powers of ten in
    [1e-max_exp, 1e+max_exp] (s^T y > 0 still)."""
    s, y = draw(curvature_pair(dim))
    a, b = draw(st.integers(-max_exp, max_exp)), draw(st.integers(-max_exp, max_exp))
    return s * 10.0 ** a, y * 10.0 ** b


@st.composite
def curvature_pairs(draw, dim: int, min_size: int = 1, max_size: int = 4,
                    max_exp: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A sequence of float64 pairs (s, y) of one curvature: y = B s + noise (at most 0.3 of
    ||B s||) for an SPD B = Q diag(lambda) Q^T, lambda in [0.05, 20], Q a random rotation;
    s and y are scaled by independent powers of ten in [1e-max_exp, 1e+max_exp]; s^T y > 0.
    (Cheaper to draw than a :func:`curvature_pair` per pair.)"""
    ev = torch.tensor(draw(st.lists(st.floats(0.05, 20.0), min_size=dim, max_size=dim)),
                      dtype=F64)
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=F64))
    b = (q * ev) @ q.T
    pairs = []
    for _ in range(draw(st.integers(min_size, max_size))):
        s = draw(vector(dim))
        bs = b @ s
        noise = torch.randn(dim, generator=g, dtype=F64)
        y = bs + draw(st.floats(0.0, 0.3)) * noise * (bs.norm() / noise.norm().clamp_min(1e-300))
        if float(s @ y) <= 1e-6 * float(s.norm() * y.norm()):
            y = bs
        a, c = draw(st.integers(-max_exp, max_exp)), draw(st.integers(-max_exp, max_exp))
        pairs.append((s * 10.0 ** a, y * 10.0 ** c))
    return pairs


def one_curvature_pair(dim: int, max_exp: int = 3):
    """A single pair of :func:`curvature_pairs`."""
    return curvature_pairs(dim, 1, 1, max_exp).map(lambda pairs: pairs[0])


@st.composite
def any_pair(draw, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, y) with no sign condition (for damping rules)."""
    return draw(vector(dim)), draw(vector(dim))


# -- adversarial ------------------------------------------------------------------------------
def special_values(dtype: torch.dtype = F64, finite_only: bool = False) -> list[float]:
    """Entries that break naive formulas in ``dtype``: signed zeros, the largest value and half
    of it, 1e15 and 1e30, the smallest normal and a subnormal, 1e-30, and (unless
    ``finite_only``) NaN and +-inf."""
    fi = torch.finfo(dtype)
    vals = [0.0, -0.0, 1.0, -1.0, fi.max, -fi.max, fi.max / 2, 1e15, -1e15, 1e30, -1e30,
            fi.tiny, -fi.tiny, fi.tiny / 4, 1e-30, -1e-30]
    if not finite_only:
        vals += [float("nan"), float("inf"), -float("inf")]
    # values the dtype cannot hold (1e30 fits float32; nothing here overflows it) stay as
    # they round
    return [float(torch.tensor(v, dtype=F64).to(dtype)) for v in vals]


def entries(dtype: torch.dtype = F64, finite_only: bool = False, bound: float = 1e3):
    """Single entries: ordinary floats in [-bound, bound] (rounded to ``dtype``) or
    :func:`special_values`."""
    ordinary = st.floats(-bound, bound, allow_nan=False, allow_infinity=False).map(
        lambda v: float(torch.tensor(v, dtype=F64).to(dtype)))
    return st.one_of(ordinary, st.sampled_from(special_values(dtype, finite_only)))


@st.composite
def adversarial_vector(draw, dim: int, dtype: torch.dtype = F64,
                       finite_only: bool = False) -> torch.Tensor:
    """A vector of ``dtype`` whose entries are drawn from :func:`entries`."""
    vals = draw(st.lists(entries(dtype, finite_only), min_size=dim, max_size=dim))
    return torch.tensor(vals, dtype=F64).to(dtype)


@st.composite
def adversarial_pair(draw, dim: int, dtype: torch.dtype = F64,
                     finite_only: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, y) of ``dtype`` meant to break an update or damping rule: independent adversarial
    vectors, y a (huge, tiny, negative or zero) multiple of an adversarial s, a well-behaved
    pair scaled to the dtype's extremes, or the zero pair."""
    kind = draw(st.sampled_from(["independent", "multiple", "scaled", "zero"]))
    if kind == "zero":
        z = torch.zeros(dim, dtype=dtype)
        return z, z.clone()
    if kind == "scaled":
        s, y = draw(one_curvature_pair(dim, 0))
        fi = torch.finfo(dtype)
        big = [fi.max / 8, 1e30, 1e15, 1.0, 1e-15, 1e-30, fi.tiny]
        a, b = draw(st.sampled_from(big)), draw(st.sampled_from(big))
        return (s * a).to(dtype), (y * b).to(dtype)
    s = draw(adversarial_vector(dim, dtype, finite_only))
    if kind == "multiple":
        c = draw(st.sampled_from([1.0, 2.0, -1.0, 0.0, 1e30, 1e-30]))
        return s, (s.double() * c).to(dtype)
    return s, draw(adversarial_vector(dim, dtype, finite_only))


@st.composite
def symmetric_matrix(draw, dim: int, dtype: torch.dtype = F64) -> torch.Tensor:
    """A finite symmetric matrix of ``dtype`` with entries from :func:`entries` (finite only):
    indefinite, singular or near the dtype's largest value, for inversion strategies."""
    vals = draw(st.lists(entries(dtype, finite_only=True, bound=1e30),
                         min_size=dim * dim, max_size=dim * dim))
    m = torch.tensor(vals, dtype=F64).reshape(dim, dim).to(dtype)
    return 0.5 * m + 0.5 * m.T


__all__ = ["finite", "spd", "vector", "curvature_pair", "scaled_curvature_pair",
           "curvature_pairs", "one_curvature_pair", "any_pair",
           "special_values", "entries", "adversarial_vector", "adversarial_pair",
           "symmetric_matrix"]
