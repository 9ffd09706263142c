"""Op budgets of the inverse-factor update rules (issue 11): the products with H dispatch one
op each, and a batched update costs a few ops per layer plus a fixed number per group."""
from __future__ import annotations

import torch

from kfqn.updates.bfgs import BFGSFactor
from kfqn.updates.lbfgs import LBFGSFactor
from helpers import OpCount

#: the layer sizes of the autoencoder (both sides of its eight layers)
AE_A = (785, 1001, 501, 251, 31, 251, 501, 1001)
AE_G = (1000, 500, 250, 30, 250, 500, 1000, 784)




def _count(fn) -> int:
    fn()  # caches (constants, layouts, views) filled outside the count
    with OpCount() as c:
        fn()
    return c.n


def _pairs(dims, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    s = [torch.randn(d, generator=g).to(dtype) for d in dims]
    y = [2.0 * si + 0.1 * torch.randn(si.shape[0], generator=g).to(dtype) for si in s]
    return s, y


def test_bfgs_products_are_one_op():
    f = BFGSFactor(31, torch.float32, "cpu")
    v, m = torch.randn(31), torch.randn(5, 31)
    mt = m.T
    assert _count(lambda: f.apply(v)) == 1
    assert _count(lambda: f.apply(mt)) == 1
    assert _count(lambda: f.apply_right(m)) == 1


def test_bfgs_apply_right_is_m_h_transposed_bitwise():
    f = BFGSFactor(9, torch.float64, "cpu")
    g = torch.Generator().manual_seed(1)
    f.reset(torch.eye(9, dtype=torch.float64) + 0.1 * torch.rand(9, 9, generator=g,
                                                                  dtype=torch.float64))
    for _ in range(3):
        s = torch.randn(9, generator=g, dtype=torch.float64)
        f.update(s, 2.0 * s + 0.1 * torch.randn(9, generator=g, dtype=torch.float64))
    m = torch.randn(4, 9, generator=g, dtype=torch.float64)
    assert torch.equal(f.apply_right(m), m @ f.h.T)
    f.reset()                                   # a new H: the cached transpose follows it
    assert torch.equal(f.apply_right(m), m @ f.h.T)


def test_lbfgs_products_ops():
    """4 ops in the compact form (three products with the memory and M, plus gamma v), 1
    with the dense H."""
    compact = LBFGSFactor(50, torch.float32, "cpu", memory=5)
    dense = LBFGSFactor(10, torch.float32, "cpu", memory=5)
    for f in (compact, dense):
        for seed in range(3):
            s, y = _pairs([f.dim], seed)
            f.update(s[0], y[0])
    assert compact._dense is None and dense._dense is not None
    for f, ops in ((compact, 4), (dense, 1)):
        v, m = torch.randn(f.dim), torch.randn(3, f.dim)
        assert _count(lambda: f.apply(v)) == ops
        assert _count(lambda: f.apply_right(m)) == ops


def test_lbfgs_products_agree():
    """apply, apply_right and the secant equation of the newest pair (float64)."""
    f = LBFGSFactor(40, torch.float64, "cpu", memory=4, dense_factor=0)
    for seed in range(6):
        s, y = _pairs([40], seed, torch.float64)
        assert bool(f.update(s[0], y[0]))
    eye = torch.eye(40, dtype=torch.float64)
    h = f.apply(eye)
    torch.testing.assert_close(f.apply_right(eye), h.T, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(h, h.T, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(f.apply(y[0]), s[0], rtol=1e-10, atol=1e-12)


def test_bfgs_update_many_op_budget():
    """At most 9 ops per factor for the autoencoder's eight layers (4 per layer: H y,
    H y - H^T y, the rank-2 addmm_ ... plus the group's scalar logic)."""
    for dims in (AE_A, AE_G):
        factors = [BFGSFactor(d, torch.float32, "cpu") for d in dims]
        s, y = _pairs(dims)
        allow = [torch.tensor(True)] * len(dims)
        n = _count(lambda: BFGSFactor.update_many(factors, s, y, allow))
        assert n <= 9 * len(dims), n


def test_lbfgs_update_many_op_budget():
    """kfbfgs_l_cnn's G side (memory 100; dense H where d <= 400): at most 20 ops per layer
    for the update, and update + apply (H y) + apply_right (the direction) at most 26."""
    factors = [LBFGSFactor(d, torch.float32, "cpu", memory=100) for d in AE_G]
    for seed in range(3):
        s, y = _pairs(AE_G, seed)
        LBFGSFactor.update_many(factors, s, y, [None] * len(AE_G))
    s, y = _pairs(AE_G, 9)
    allow = [torch.tensor(True)] * len(AE_G)
    upd = _count(lambda: LBFGSFactor.update_many(factors, s, y, allow))
    assert upd <= 20 * len(AE_G), upd
    grads = [torch.randn(7, d) for d in AE_G]
    prod = _count(lambda: [(f.apply(yi), f.apply_right(m))
                           for f, yi, m in zip(factors, y, grads)])
    assert upd + prod <= 26 * len(AE_G), (upd, prod)
