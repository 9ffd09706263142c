"""Optimizer state is updated in place: after the first steps every state tensor keeps its
address (the precondition for capturing a step in a CUDA graph and for torch's checkpoint
tools, which hold references to the state), for every preset."""
from __future__ import annotations

import pytest
import torch

import kfqn
from helpers import (all_presets, batches, make_closure, quiet, small_cnn, teacher_data,
                     tensor_paths, tensors_of)


def addresses(obj):
    """path -> data pointer of every state tensor."""
    return {path: t.data_ptr() for path, t in tensor_paths(obj)}


def _trained(preset, **overrides):
    """An optimizer of ``preset`` on the small CNN after warm start and three steps, its model
    and the rest of the batches."""
    x, y = teacher_data(64)
    model = small_cnn()
    opt = quiet(kfqn.build_optimizer, model, preset, **overrides)
    if opt.needs_warm_start:
        with opt.warm_start():
            model(x)
    data = batches(x, y, 16)
    for _ in range(3):
        opt.step(make_closure(opt, model, *next(data)))
    return opt, model, data


@pytest.mark.parametrize("preset", all_presets())
def test_state_tensors_keep_their_addresses(preset):
    opt, model, data = _trained(preset, preconditioner={"inverse_every": 3, "inverse_warmup": 1}
                                if preset in ("kfac", "shampoo") else {})
    before = addresses(opt.state_dict())
    for _ in range(7):  # past an inverse cadence
        opt.step(make_closure(opt, model, *next(data)))
    after = addresses(opt.state_dict())
    moved = sorted(k for k in before if k in after and before[k] != after[k])
    assert not moved, f"{preset}: state tensors replaced instead of updated in place: {moved}"


@pytest.mark.parametrize("preset", all_presets())
def test_torch_state_view_is_live(preset):
    """``opt.state`` (torch.optim's per-parameter state) covers every trainable parameter and
    holds kfqn's own state tensors, not copies: a view taken before ten steps shows their
    values after them."""
    opt, model, data = _trained(preset)
    view = opt.state
    assert set(map(id, view)) == {id(p) for p in model.parameters() if p.requires_grad}
    owned = {t.data_ptr() for t in tensors_of(opt.state_dict())}
    for p, entry in view.items():
        assert entry and all(t.data_ptr() in owned for t in entry.values()), preset
    snapshot = {(id(p), k): t.clone() for p, e in view.items() for k, t in e.items()}
    for _ in range(10):
        opt.step(make_closure(opt, model, *next(data)))
    fresh = opt.state
    changed = 0
    for p, entry in view.items():
        for k, t in entry.items():
            assert torch.equal(t, fresh[p][k]), f"{preset}: opt.state[{k}] went stale"
            changed += not torch.equal(t, snapshot[id(p), k])
    assert changed, preset

