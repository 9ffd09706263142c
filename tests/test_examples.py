"""The README's plugin guide, followed as a user would: the one-file FOOF preconditioner of
examples/foof.py loads through the ``plugins`` key and passes the preconditioner contract."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import kfqn
import test_preconditioners as contract
from helpers import teacher_data


@pytest.fixture
def foof_registered():
    import foof

    if not kfqn.default_registry().is_registered(foof):
        kfqn.register_plugin(foof)
    yield foof
    kfqn.unregister_plugin(foof)


def test_foof_loads_through_the_plugins_key(foof_registered):
    kfqn.unregister_plugin(foof_registered)   # as a user would: named in the config only
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
    opt = kfqn.build_optimizer(model, {"plugins": ["foof"], "preconditioner": "foof"})
    assert type(opt.layers["0"].precond).__name__ == "FOOF"


def test_foof_passes_the_preconditioner_contract(foof_registered):
    contract.test_preconditioner_contract("foof", teacher_data(96))


def test_foof_direction_is_m_times_the_damped_inverse(foof_registered):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2)).double()
    x, y = torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 2, (8,))
    w0 = torch.cat([model[0].weight, model[0].bias[:, None]], 1).detach().clone()
    opt = kfqn.build_optimizer(model, {"preconditioner": {"name": "foof", "beta": 0.5},
                                       "factor_dtype": "float64", "momentum": 0.0,
                                       "weight_decay": 0.0, "damping": 0.1, "lr": 1.0})

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss
    closure()
    grad = torch.cat([model[0].weight.grad, model[0].bias.grad[:, None]], 1).clone()
    opt.step(closure)
    abar = torch.cat([x, torch.ones(8, 1, dtype=torch.float64)], 1)
    a = abar.T @ abar / 8
    want = grad @ torch.linalg.inv(a + 0.1 * torch.eye(4, dtype=torch.float64))
    got = w0 - torch.cat([model[0].weight, model[0].bias[:, None]], 1).detach()
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_foof_declares_its_statistics_for_owner_placement(foof_registered):
    """The example declares its batch statistic: placement=owner builds it (meta copies on the
    ranks that do not own a layer) and its first round carries A's local value."""
    from kfqn.core.communicator import Communicator

    class RankView(Communicator):
        rank, world_size = 1, 2

    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    opt = kfqn.build_optimizer(model, {"preconditioner": "foof", "placement": "owner"},
                               comm=RankView())
    owned = {n: l.owned for n, l in opt.layers.items()}
    assert sorted(owned.values()) == [False, True]
    shadow = next(l for l in opt.layers.values() if not l.owned)
    assert shadow.precond.a.is_meta
    plan = shadow.precond.batch_means("current", 0)
    x = torch.randn(5, 4)
    local = plan["input_covariance"](shadow.adapter, type("Cap", (), {"inp": x})())
    assert local.shape == (shadow.adapter.d_a, shadow.adapter.d_a) and not local.is_meta
