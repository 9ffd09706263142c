"""Loading a checkpoint that does not fit: one line, nothing loaded, nothing crashes.

For every preset: a checkpoint of another layer width, of a conv kernel reshaped 3x3 -> 1x9 (the
same factor sizes), and checkpoints mutated by hypothesis (a tensor's shape or dtype, a key
renamed or removed, a tensor replaced by another kind of value) are each refused with one
:class:`KfqnError` line; the optimizer's state and the parameters are bit for bit as before,
and the next step runs. A fitting checkpoint still loads.
"""
from __future__ import annotations

import io
import warnings

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

import kfqn
from kfqn.core.errors import KfqnError
from kfqn.core.state_check import OPTIONAL_KEYS
from helpers import all_presets, flat_state, make_closure

PRESETS = all_presets()


def _model(width: int = 6, kernel=(3, 3)) -> nn.Module:
    torch.manual_seed(0)
    pad = (kernel[0] // 2, kernel[1] // 2)
    return nn.Sequential(nn.Conv2d(2, 3, kernel, padding=pad), nn.Tanh(), nn.Flatten(),
                         nn.Linear(3 * 5 * 5, width), nn.Tanh(), nn.Linear(width, 3))


def _trained(preset: str, **kw):
    model = _model(**kw)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 2, 5, 5, generator=g), torch.randint(0, 3, (16,), generator=g)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = kfqn.build_optimizer(model, preset)
        if opt.needs_warm_start:
            with opt.warm_start():
                model(x)
        for _ in range(2):
            opt.step(make_closure(opt, model, x, y))
    return model, opt, (x, y)


def _roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def _assert_refused_and_untouched(model, opt, bad, data):
    before_state = flat_state(opt.state_dict())
    before_params = [p.detach().clone() for p in model.parameters()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(KfqnError) as info:
            opt.load_state_dict(bad)
    message = str(info.value)
    assert "\n" not in message and len(message) < 400, message
    after_state = flat_state(opt.state_dict())
    assert before_state.keys() == after_state.keys()
    for key, val in before_state.items():
        other = after_state[key]
        assert (torch.equal(val, other) if isinstance(val, torch.Tensor) else val == other), key
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before_params))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt.step(make_closure(opt, model, *data))  # no crash, no NaN
    assert all(torch.isfinite(p).all() for p in model.parameters())
    return message


@pytest.mark.parametrize("preset", PRESETS)
def test_other_width_is_refused(preset):
    _, source, _ = _trained(preset, width=6)
    model, opt, data = _trained(preset, width=8)
    msg = _assert_refused_and_untouched(model, opt, _roundtrip(source.state_dict()), data)
    assert "3" in msg  # names a layer (the Linear of another width)


@pytest.mark.parametrize("preset", PRESETS)
def test_reshaped_conv_kernel_is_refused(preset):
    """Conv2d(2, 3, 3x3) and Conv2d(2, 3, 1x9) have the same factor sizes (d_a = 19)."""
    _, source, _ = _trained(preset, kernel=(3, 3))
    model, opt, data = _trained(preset, kernel=(1, 9))
    msg = _assert_refused_and_untouched(model, opt, _roundtrip(source.state_dict()), data)
    assert "'0.weight'" in msg


@pytest.mark.parametrize("preset", PRESETS)
def test_fitting_checkpoint_loads_exactly(preset):
    model, opt, data = _trained(preset)
    ckpt = _roundtrip({"model": model.state_dict(), "opt": opt.state_dict()})
    fresh = _model()
    fresh.load_state_dict(ckpt["model"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        o2 = kfqn.build_optimizer(fresh, preset)
        o2.load_state_dict(ckpt["opt"])
        for m, o in ((model, opt), (fresh, o2)):
            o.step(make_closure(o, m, *data))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), fresh.parameters()))


def _tensor_paths(obj, path=()):
    if isinstance(obj, torch.Tensor):
        yield path
    elif isinstance(obj, dict):
        for k, v in obj.items():
            if k not in ("config", "model", "unsupported"):
                yield from _tensor_paths(v, path + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _tensor_paths(v, path + (i,))


def _mutate(state, path, kind: str):
    parent = state
    for key in path[:-1]:
        parent = parent[key]
    key, t = path[-1], parent[path[-1]]
    if kind == "shape":
        parent[key] = torch.cat([t.reshape(-1), t.reshape(-1)[:1]]) if t.numel() else \
            torch.zeros(1, dtype=t.dtype)
    elif kind == "dtype":
        parent[key] = t.to(torch.float64 if t.dtype != torch.float64 else torch.float32)
    elif kind == "kind":
        parent[key] = "not a tensor"
    elif kind == "rename" and isinstance(key, str):
        parent[key + "_renamed"] = parent.pop(key)
    elif kind == "remove" and isinstance(key, str):
        del parent[key]
    else:
        return False
    return True


SOURCES = {}


@settings(max_examples=60, deadline=None)
@given(preset=st.sampled_from(PRESETS), pick=st.integers(0, 10_000),
       kind=st.sampled_from(["shape", "dtype", "kind", "rename", "remove"]))
def test_mutated_checkpoints_are_refused_whole(preset, pick, kind):
    if preset not in SOURCES:
        SOURCES[preset] = _trained(preset)
    model, opt, data = SOURCES[preset]
    state = _roundtrip(opt.state_dict())
    paths = sorted(_tensor_paths(state), key=str)
    path = paths[pick % len(paths)]
    if kind in ("rename", "remove") and (not isinstance(path[-1], str) or path[-1] in OPTIONAL_KEYS):
        kind = "shape"
    assert _mutate(state, path, kind)
    _assert_refused_and_untouched(model, opt, state, data)
