"""A skipped step (non-finite loss or gradient) changes nothing, counters and samplers included:
for every preset, a run with non-finite steps injected equals the run without them, parameters
and optimizer state bit for bit (only ``nonfinite_steps`` and the step counter differ)."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kfqn
from helpers import all_presets, flat_state

PRESETS = all_presets()
#: counters of calls of step() (host cadences) and of inversions computed on their cadence
STEP_KEYS = {"step", "nonfinite_steps", "inversions"}


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 4 * 4, 3))


def _run(preset: str, poison: set[int], bad: str):
    model = _model()
    g = torch.Generator().manual_seed(4)
    x = torch.randn(48, 1, 6, 6, generator=g)
    y = torch.randint(0, 3, (48,), generator=g)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = kfqn.build_optimizer(model, preset)
        if opt.needs_warm_start:
            with opt.warm_start():
                model(x)
        k = 0
        for step in range(6 + len(poison)):
            if step in poison:
                xb, yb = x[:16], y[:16]
            else:
                s = (k % 3) * 16
                xb, yb = x[s:s + 16], y[s:s + 16]
                k += 1

            def closure(xb=xb, yb=yb, poisoned=step in poison):
                opt.zero_grad()
                loss = F.cross_entropy(model(xb), yb)
                if poisoned and bad == "loss":
                    loss = loss * float("nan")
                loss.backward()
                if poisoned and bad == "grad" and model[0].weight.grad is not None:
                    model[0].weight.grad[0, 0, 0, 0] = float("inf")
                return loss
            opt.step(closure)
    return model, opt


@pytest.mark.parametrize("bad", ["loss", "grad"])
@pytest.mark.parametrize("preset", PRESETS)
def test_skipped_steps_change_nothing(preset, bad):
    clean_model, clean_opt = _run(preset, set(), bad)
    model, opt = _run(preset, {0, 3}, bad)
    assert int(opt.stats()["_global"]["nonfinite_steps"]) == 2
    for p, q in zip(clean_model.parameters(), model.parameters()):
        assert torch.isfinite(q).all()
        assert torch.equal(p, q), preset
    ours, theirs = flat_state(clean_opt.state_dict()), flat_state(opt.state_dict())
    assert ours.keys() == theirs.keys()
    for key, val in ours.items():
        if key.rsplit("/", 1)[-1] in STEP_KEYS:
            continue
        other = theirs[key]
        if isinstance(val, torch.Tensor):
            assert torch.equal(val, other), f"{preset}: {key} moved on a skipped step"
        else:
            assert val == other, f"{preset}: {key} = {other} after skipped steps, {val} without"
