"""The layer direction P = -H_g M H_a equals the dense Kronecker solve -(A kron G)^{-1} vec(M)
with H_a = A^{-1}, H_g = G^{-1} (vec column-major), and the optimizer forms exactly that."""
from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from strategies import spd

F64 = torch.float64


@given(st.data())
def test_kronecker_apply_equals_dense_solve(data):
    a = data.draw(spd(max_dim=5))
    g = data.draw(spd(max_dim=5))
    m = torch.randn(g.shape[0], a.shape[0], dtype=F64)
    p = -torch.linalg.inv(g) @ m @ torch.linalg.inv(a)
    # vec(X) stacks columns: vec(G X A) = (A^T kron G) vec(X)
    vec = m.T.reshape(-1)
    dense = -torch.linalg.solve(torch.kron(a.T.contiguous(), g), vec)
    torch.testing.assert_close(p.T.reshape(-1), dense, rtol=1e-7, atol=1e-8)


def test_optimizer_direction_uses_both_factors():
    """One kbfgs step on a single Linear layer moves Wbar by lr * (-H_g Mhat H_a)."""
    import kfqn

    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 2).double()
    opt = kfqn.build_optimizer(lin, "kbfgs", lr=0.5, weight_decay=0.0, factor_dtype="float64",
                               a_side={"warm_start": False})
    x, t = torch.randn(8, 3, dtype=F64), torch.randn(8, 2, dtype=F64)
    # factors before the step: H_g = I, H_a = (A + sqrt(lambda) I)^{-1} from this batch
    abar = torch.cat([x, torch.ones(8, 1, dtype=F64)], 1)
    h_a = torch.linalg.inv(abar.T @ abar / 8 + 0.3 ** 0.5 * torch.eye(4, dtype=F64))
    w0 = torch.cat([lin.weight.detach(), lin.bias.detach()[:, None]], 1).clone()

    def closure():
        opt.zero_grad()
        loss = ((lin(x) - t) ** 2).sum(1).mean() / 2
        loss.backward()
        return loss

    closure()
    m = torch.cat([lin.weight.grad, lin.bias.grad[:, None]], 1).clone()
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt.step(closure)
    w1 = torch.cat([lin.weight.detach(), lin.bias.detach()[:, None]], 1)
    mhat = 0.1 * m  # Mhat_1 = (1 - rho) G_1: the momentum starts at zero (momentum_init=zero)
    torch.testing.assert_close(w1 - w0, 0.5 * (-(mhat @ h_a)), rtol=1e-10, atol=1e-12)
