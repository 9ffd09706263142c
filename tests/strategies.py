"""Hypothesis strategies for the algebra tests: SPD matrices and curvature pairs (float64)."""
from __future__ import annotations

import numpy as np
import torch
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

finite = st.floats(-2.0, 2.0, allow_nan=False, allow_infinity=False, width=64)


@st.composite
def spd(draw, dim: int | None = None, min_dim: int = 1, max_dim: int = 7) -> torch.Tensor:
    """A symmetric positive definite float64 matrix M M^T + c I."""
    d = dim if dim is not None else draw(st.integers(min_dim, max_dim))
    m = draw(arrays(np.float64, (d, d), elements=finite))
    c = draw(st.floats(0.05, 2.0))
    t = torch.from_numpy(m)
    return t @ t.T + c * torch.eye(d, dtype=torch.float64)


@st.composite
def vector(draw, dim: int, nonzero: bool = True) -> torch.Tensor:
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
def any_pair(draw, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, y) with no sign condition (for damping rules)."""
    return draw(vector(dim)), draw(vector(dim))


#: LBFGSFactor keyword arguments that force each of its two product forms
LBFGS_FORMS = {"dense": {"dense_factor": 10**9}, "compact": {"dense_factor": 0}}
