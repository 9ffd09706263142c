"""placement=owner in one process: the size-balanced assignment (a property test), the ranks'
shares of the factors, and the refusals (kfqn.core.placement)."""
from __future__ import annotations

import itertools
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import kfqn
from kfqn.core.communicator import Communicator
from kfqn.core.errors import ConfigError
from kfqn.core.placement import assign_owners
from helpers import tensors_of


class RankView(Communicator):
    def __init__(self, rank: int, world_size: int) -> None:
        self.rank, self.world_size = rank, world_size


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 10**6), min_size=1, max_size=40) | st.lists(st.integers(1, 9), min_size=1, max_size=7),
       st.integers(1, 9))
def test_assignment_is_complete_deterministic_and_balanced(costs, n):
    named = {f"l{i}": c for i, c in enumerate(costs)}
    owner = assign_owners(named, n)
    assert owner == assign_owners(dict(named), n)           # every rank computes the same
    assert set(owner) == set(named) and set(owner.values()) <= set(range(n))
    load = [sum(c for k, c in named.items() if owner[k] == r) for r in range(n)]
    # longest-processing-time rule: within the largest layer of a perfect split, and within
    # 4/3 of the best assignment (found by brute force where that is cheap)
    assert max(load) <= sum(costs) / n + max(costs)
    if len(costs) <= 7 and n <= 4:
        best = min(max(sum(c for c, r in zip(costs, ranks) if r == k) for k in range(n))
                   for ranks in itertools.product(range(n), repeat=len(costs)))
        assert max(load) <= (4 / 3 - 1 / (3 * n)) * best + 1e-9
    if len(costs) >= n:
        assert min(load) > 0                                # nobody idle


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 16), nn.Tanh(),
                         nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 4))


@pytest.mark.parametrize("preset", ["kbfgs", "kfbfgs_l_cnn", "kfac", "shampoo"])
@pytest.mark.parametrize("n", [2, 3])
def test_each_layer_on_one_rank_and_the_others_hold_no_factor(preset, n):
    views = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full = kfqn.build_optimizer(_model(), preset)
        for r in range(n):
            views.append(kfqn.build_optimizer(_model(), {"preset": preset, "placement": "owner"},
                                              comm=RankView(r, n)))
    owned = [{k for k, l in v.layers.items() if l.owned} for v in views]
    assert sorted(k for o in owned for k in o) == sorted(full.layers)
    for v in views:
        for layer in v.layers.values():
            if not layer.owned:   # a state-free meta copy, no momentum
                assert layer.momentum.is_meta
                assert all(t.is_meta for t in tensors_of(layer.precond.state_dict()))
        assert "factors on this rank" in v.describe()


def test_owner_placement_refuses_what_it_cannot_run():
    with pytest.raises(ConfigError, match="placement=owner is not supported.*ekfac"):
        kfqn.build_optimizer(_model(), {"preset": "kfac", "placement": "owner",
                                        "preconditioner": {"name": "ekfac"}},
                             comm=RankView(0, 2))
    # K-FAC draws the Fisher's labels from a layer the rank owns: 4 layers, 5 ranks
    with pytest.raises(ConfigError, match="owns none of the 4 layers"):
        kfqn.build_optimizer(_model(), {"preset": "kfac", "placement": "owner"},
                             comm=RankView(4, 5))
    with pytest.raises(ConfigError, match="placement"):
        kfqn.build_optimizer(_model(), {"preset": "kbfgs", "placement": "sharded"})


def test_one_process_ignores_placement():
    """With one rank ``owner`` is ``replicated``: the same trajectory, bit for bit."""
    x = torch.randn(16, 6, generator=torch.Generator().manual_seed(2))
    out = []
    for placement in ("replicated", "owner"):
        net = _model()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = kfqn.build_optimizer(net, {"preset": "kbfgs", "placement": placement})
        for _ in range(3):
            def closure():
                opt.zero_grad()
                loss = net(x).pow(2).mean()
                loss.backward()
                return loss
            opt.step(closure)
        out.append(torch.cat([p.detach().reshape(-1) for p in net.parameters()]))
    assert torch.equal(out[0], out[1])
