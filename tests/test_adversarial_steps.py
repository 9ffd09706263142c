"""Full optimizer steps under adversarial input (issue figure, bounded): every preset, faulty
batches, losses and gradients drawn at random; no raise, no non-finite parameter or factor.
The full run (>= 10,000 steps, a table) is ``benchmarks/adversarial_steps.py``."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import kfqn
from helpers import all_presets, load_benchmark

adv = load_benchmark("adversarial_steps")

PRESETS = all_presets()


@pytest.mark.parametrize("preset", PRESETS)
def test_adversarial_steps(preset):
    row = adv.run_preset(preset, steps=80, seed=3)
    assert row.raises == 0 and row.nonfinite_params == 0 and row.nonfinite_factors == 0, \
        row.examples
    assert row.faults > 40 and 0 < row.skipped < row.steps  # the faults were real


@pytest.mark.parametrize("preset", ["kbfgs_l", "kfbfgs_l_cnn", "kfbfgs_ll_cnn", "kbfgs"])
def test_one_huge_loss_does_not_freeze_a_layer(preset):
    """A step with the loss scaled by 1e15 (finite) must not leave a factor that rejects every
    later direction: afterwards the factors are finite and no direction is rejected."""
    torch.manual_seed(0)
    net = adv.model()
    g = torch.Generator().manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = kfqn.build_optimizer(net, preset)
        if opt.needs_warm_start:
            with opt.warm_start():
                net(adv.batch("none", g)[0])
        for k in range(14):
            x, y = adv.batch("none", g)

            def closure(x=x, y=y, scale=1e15 if k == 3 else 1.0):
                opt.zero_grad()
                loss = F.cross_entropy(net(x), y) * scale
                loss.backward()
                return loss
            opt.step(closure)
    stats = opt.stats()
    for name, fs in opt.factors().items():
        for key, t in fs.items():
            assert torch.isfinite(t).all(), (name, key)
    rejected = {n: s["dir_rejected"] for n, s in stats.items() if n != "_global"}
    assert all(v == 0 for v in rejected.values()), rejected
    assert all(torch.isfinite(p).all() for p in net.parameters())
