"""SR1 (kfqn/updates/sr1.py), a built-in added as one new file: found by the built-in discovery
with no edit elsewhere, checked by the public contract suite exactly as a plugin author would
check their own rule, plus SR1's own oracles (finite termination on a quadratic, the skip rule,
the textbook formula, indefinite H allowed) and one training run."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import kfqn
from kfqn.testing import factor_update_contract
from kfqn.updates.sr1 import SR1Factor

F64 = torch.float64

# the public contract suite (kfqn.testing), as in a plugin author's test file
test_sr1_contract = factor_update_contract(SR1Factor)


def test_found_by_builtin_discovery():
    reg = kfqn.default_registry()
    assert "sr1" in reg.names("factor_update")
    assert reg.get("factor_update", "sr1") is SR1Factor
    assert SR1Factor.satisfies_secant and not SR1Factor.keeps_positive_definite


def _quadratic(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
    b = (q * torch.linspace(0.5, 5.0, n, dtype=F64)) @ q.T
    steps = torch.randn(n, n, generator=g, dtype=F64)        # columns: linearly independent
    return g, b, steps


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-9), (torch.float32, 2e-3)])
def test_finite_termination_on_a_quadratic(device, seed, dtype, rtol):
    """Nocedal & Wright Thm 6.1: n linearly independent steps on a quadratic with Hessian B,
    every update taken, give H = B^{-1} (from any symmetric H0), with the hereditary property
    H_k y_j = s_j for all j < k on the way."""
    n = 6
    g, b, steps = _quadratic(n, seed)
    f = SR1Factor(n, dtype, device)
    if seed == 2:                                             # another start than I
        m = torch.randn(n, n, generator=g, dtype=F64)
        f.reset((m @ m.T / n + torch.eye(n, dtype=F64)).to(device, dtype))
    ys = b @ steps
    for k in range(n):
        s, y = steps[:, k], ys[:, k]
        assert bool(f.update(s.to(device, dtype), y.to(device, dtype))), k
        h = f.dense().to("cpu", F64)
        hered = h @ ys[:, : k + 1] - steps[:, : k + 1]
        assert float(hered.abs().max()) <= rtol * 10 * float(steps.abs().max()), k
    err = torch.linalg.matrix_norm(f.dense().to("cpu", F64) - torch.linalg.inv(b))
    assert float(err / torch.linalg.matrix_norm(torch.linalg.inv(b))) <= rtol


def test_matches_the_textbook_formula():
    g = torch.Generator().manual_seed(4)
    f = SR1Factor(5, F64, "cpu")
    h = torch.eye(5, dtype=F64)
    for _ in range(4):
        s = torch.randn(5, generator=g, dtype=F64)
        y = 2.0 * s + 0.3 * torch.randn(5, generator=g, dtype=F64)
        v = s - h @ y
        assert bool(f.update(s, y))
        h = h + torch.outer(v, v) / torch.dot(v, y)
        torch.testing.assert_close(f.dense(), h, rtol=1e-12, atol=1e-12)


def test_skip_rule_fires_when_s_minus_hy_is_orthogonal_to_y():
    f = SR1Factor(3, F64, "cpu")
    e1, e2 = torch.eye(3, dtype=F64)[0], torch.eye(3, dtype=F64)[1]
    before = f.dense()
    # H = I, y = e1, s = e1 + e2: s - Hy = e2 is orthogonal to y (s^T y = 1 > 0)
    assert not bool(f.update(e1 + e2, e1))
    assert torch.equal(f.dense(), before)
    # nearly orthogonal: |(s - Hy)^T y| = 1e-9 ||s - Hy|| ||y|| < r ||s - Hy|| ||y|| (r = 1e-8)
    s = e1 + e2 + 1e-9 * e1
    assert not bool(f.update(s, e1))
    assert torch.equal(f.dense(), before)
    # ... which a smaller r takes, with H+ y = s
    g = SR1Factor(3, F64, "cpu", r=1e-10)
    assert bool(g.update(s, e1))
    torch.testing.assert_close(g.apply(e1), s, rtol=1e-6, atol=1e-6)
    # nothing to update: H y = s already
    assert not bool(f.update(e1, e1))


def test_may_leave_positive_definiteness():
    """s^T y > 0 but (s - Hy)^T y < 0: SR1 takes the pair and H+ is indefinite (which is why
    keeps_positive_definite is False)."""
    f = SR1Factor(2, F64, "cpu")
    s, y = torch.tensor([0.1, 1.0], dtype=F64), torch.tensor([1.0, 0.0], dtype=F64)
    assert bool(f.update(s, y))
    torch.testing.assert_close(f.apply(y), s)
    assert float(torch.linalg.eigvalsh(f.dense())[0]) < 0


def test_kbfgs_with_sr1_on_the_g_side_trains():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3))
    opt = kfqn.build_optimizer(model, "kbfgs", g_side={"update": "sr1"})
    x = torch.randn(128, 4)
    t = torch.sin(x @ torch.randn(4, 3))

    def closure():
        opt.zero_grad()
        loss = ((model(x) - t) ** 2).mean()
        loss.backward()
        return loss

    first = float(closure().detach())
    accepted = 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")       # no warm start: the A factor starts from a batch
        for _ in range(30):
            opt.step(closure)
            accepted += float(opt.stats()["2"]["g_accepted"])
    last = float(closure().detach())
    assert last < 0.7 * first, (first, last)
    assert accepted > 0                                    # SR1 did update H_g
    assert not torch.equal(opt.factors()["2"]["H_g"], torch.eye(3))
    assert all(torch.isfinite(p).all() for p in model.parameters())
