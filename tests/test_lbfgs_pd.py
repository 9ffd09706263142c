"""L-BFGS (compact form) keeps H positive definite on adversarial pairs (issue 10).

Seed 5924699 of benchmarks/adversarial_pairs.py once fed (lbfgs_compact, powell, float64) a
pair with s ~ 1e29, y ~ 1e12 and cos(s, y) ~ 4e-18: its s^T y was below the rounding of its own
dot product.  A later pair with gamma = 'scaled' (gamma ~ 5e32) made the compact form cancel
terms ~1e67 to produce an H of size ~1e33, and H came out indefinite (lambda_min / lambda_max
= -0.70).  Such a pair is now rejected.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import adversarial_pairs as adv  # noqa: E402

from kfqn.updates.lbfgs import LBFGSFactor  # noqa: E402


def test_seed_5924699_keeps_pd():
    rows = adv.run(n_pairs=480, seed=5924699, seq_len=10)
    for key, row in rows.items():
        if key[0].startswith("lbfgs"):
            assert row.failures == 0, (key, row.examples)
    row = rows[("lbfgs_compact", "powell", "float64")]
    assert row.worst_ratio >= -adv.REL_EIG


@pytest.mark.parametrize("dense_factor", [0, 10**9])
def test_unresolved_curvature_pair_is_rejected(dense_factor):
    g = torch.Generator().manual_seed(0)
    d = 6
    f = LBFGSFactor(d, torch.float64, "cpu", memory=3, gamma="scaled", dense_factor=dense_factor)
    y = torch.randn(d, generator=g, dtype=torch.float64) * 1e12
    s = torch.randn(d, generator=g, dtype=torch.float64) * 1e29
    s = s - (s @ y) / (y @ y) * y                     # s nearly orthogonal to y ...
    s = s + y * (1e-18 * s.norm() / y.norm())          # ... with cos(s, y) ~ 1e-18 > 0
    assert float(s @ y) > 0
    before = f.dense().clone()
    assert not bool(f.update(s, y))
    assert torch.equal(f.dense(), before)
    # the follow-up pair of the failing sequence, at its scales, is accepted and H stays PD
    s2 = torch.randn(d, generator=g, dtype=torch.float64) * 1e63
    y2 = s2 * 1e-33 + torch.randn(d, generator=g, dtype=torch.float64) * 1e29
    assert bool(f.update(s2, y2))
    e = torch.linalg.eigvalsh(f.dense())
    assert float(e[0]) >= -1e-6 * float(e[-1])


def test_normal_pairs_accepted():
    g = torch.Generator().manual_seed(1)
    d = 12
    f = LBFGSFactor(d, torch.float32, "cpu", memory=2, dense_factor=0)
    for _ in range(20):
        s = torch.randn(d, generator=g)
        y = (torch.rand(d, generator=g) * 3 + 0.1) * s + 0.3 * torch.randn(d, generator=g)
        if float(s @ y) > 0:
            assert bool(f.update(s, y))
