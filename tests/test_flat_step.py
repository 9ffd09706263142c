"""The batched direction and move (kfqn/core/flat_step.py) equal the per-layer loop bit for bit:
momentum forms and starts, weight decay inside and outside, rejected directions, skipped steps,
Linear layers with and without bias and Conv2d layers; the state stays views of the flat
buffers through checkpoints and released layers."""
from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import Phase, given, settings, strategies as st
from torch import nn

import kfqn
from kfqn.core.flat_step import FlatBucket
from helpers import make_closure, quiet


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 5),
                         nn.Tanh(), nn.Linear(5, 4, bias=False), nn.Tanh(), nn.Linear(4, 3))


def _data(seed: int, n: int = 12):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, 6, 6, generator=g, dtype=torch.float64), \
        torch.randint(0, 3, (n,), generator=g)


def _run(batched: bool, preset: str, overrides: dict, poison: dict, steps: int, seed: int,
         monkeypatch) -> tuple[list[torch.Tensor], dict]:
    """Parameters and state after ``steps`` steps; ``poison``: step -> layer index whose
    direction is made non-finite at that step (and the step's loss too, when the index is
    -1)."""
    model = _model(seed).double()
    opt = quiet(kfqn.build_optimizer, model, preset, factor_dtype="float64", **overrides)
    if opt.needs_warm_start:
        with opt.warm_start():
            model(_data(seed)[0])
    layers = list(opt.layers.values())
    with monkeypatch.context() as m:
        if not batched:
            m.setattr(FlatBucket, "covers", lambda self, active: False)
        for step in range(steps):
            x, y = _data(seed * 100 + step)
            bad = poison.get(step)
            if bad is not None and bad >= 0:
                prec = layers[bad].precond
                orig = prec.precondition_t
                m.setattr(prec, "precondition_t", lambda mt, orig=orig: orig(mt) * float("nan"))
                m.setattr(prec, "precondition_t_into",
                          lambda mt, out, orig=orig: out.copy_(orig(mt) * float("nan")))
            if bad == -1:
                x = x * float("nan")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                opt.step(make_closure(opt, model, x, y))
            if bad is not None and bad >= 0:
                m.undo()
                if not batched:
                    m.setattr(FlatBucket, "covers", lambda self, active: False)
    return [p.detach().clone() for p in model.parameters()], opt.state_dict()


def _assert_same(a, b, path="state"):
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, path
        bits = (lambda t: t.contiguous().view(-1).view(torch.uint8)
                if t.is_floating_point() else t)
        assert torch.equal(bits(a), bits(b)), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{path}[{i}]")


@settings(max_examples=12, deadline=None,  # examples take seconds: no shrinking
          phases=[Phase.explicit, Phase.reuse, Phase.generate])
@given(preset=st.sampled_from(["kbfgs", "kfbfgs_l_cnn", "kfac"]),
       form=st.sampled_from(["ema", "torch"]),
       init=st.sampled_from(["zero", "first"]),
       wd=st.sampled_from([0.0, 1e-3]),
       mode=st.sampled_from(["inside", "outside"]),
       poison=st.dictionaries(st.integers(0, 4), st.integers(-1, 3), max_size=2),
       seed=st.integers(0, 3))
def test_batched_equals_per_layer_loop(preset, form, init, wd, mode, poison, seed):
    mp = pytest.MonkeyPatch()
    try:
        overrides = dict(momentum_form=form, momentum_init=init, weight_decay=wd,
                         weight_decay_mode=mode)
        if preset == "kfac":
            overrides["preconditioner"] = {"inverse_every": 2, "inverse_warmup": 1}
        got = _run(True, preset, overrides, poison, 5, seed, mp)
        want = _run(False, preset, overrides, poison, 5, seed, mp)
    finally:
        mp.undo()
    for p, q in zip(got[0], want[0]):
        _assert_same(p, q, "param")
        assert torch.isfinite(p).all()
    _assert_same(got[1]["layers"], want[1]["layers"], "layers")


def test_the_batched_path_is_taken_and_rejections_count(monkeypatch):
    """A non-finite direction of one layer moves none of its parameters and counts once; the
    other layers move."""
    calls = []
    orig = FlatBucket.step
    monkeypatch.setattr(FlatBucket, "step", lambda self, *a, **k: (calls.append(1),
                                                                     orig(self, *a, **k)))
    model = _model(0).double()
    opt = quiet(kfqn.build_optimizer, model, "kfbfgs_l_cnn", factor_dtype="float64")
    layers = list(opt.layers.values())
    before = [p.detach().clone() for p in model.parameters()]
    prec = layers[1].precond
    orig_pt = prec.precondition_t
    monkeypatch.setattr(prec, "precondition_t_into",
                        lambda mt, out: out.copy_(orig_pt(mt) * float("inf")))
    opt.step(make_closure(opt, model, *_data(0)))
    assert calls == [1]
    assert [int(l.dir_rejected) for l in layers] == [0, 1, 0, 0]
    moved = [not torch.equal(p, q) for p, q in zip(model.parameters(), before)]
    # conv weight, bias; linear 1 weight, bias (rejected); linear 2 weight; linear 3 w, b
    assert moved == [True, True, False, False, True, True, True]


def test_state_stays_in_the_flat_buffers_through_load_and_release():
    model = _model(1).double()
    opt = quiet(kfqn.build_optimizer, model, "kbfgs", factor_dtype="float64",
                a_side={"warm_start": False})
    x, y = _data(1)
    for _ in range(2):
        quiet(opt.step, make_closure(opt, model, x, y))
    bucket = opt._buckets[0]
    ptrs = {n: l.momentum.data_ptr() for n, l in opt.layers.items()}
    sd = opt.state_dict()
    sd = {**sd, "layers": {n: {**s, "momentum": s["momentum"].clone() + 1}
                           for n, s in sd["layers"].items()}}
    opt.load_state_dict(sd)
    for n, l in opt.layers.items():
        assert l.momentum.data_ptr() == ptrs[n]
        assert torch.equal(l.momentum, sd["layers"][n]["momentum"])
        assert l.momentum.untyped_storage().data_ptr() == bucket.momentum.untyped_storage().data_ptr()
    # a layer released to the fallback: the others keep their state, in a new bucket
    kept = {n: l.momentum.clone() for n, l in opt.layers.items()}
    name = next(iter(opt.layers))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt._release([name], "test")
    assert name not in opt.layers and len(opt._buckets[0].layers) == len(kept) - 1
    for n, l in opt.layers.items():
        assert torch.equal(l.momentum, kept[n])
        assert l.momentum.untyped_storage().data_ptr() == \
            opt._buckets[0].momentum.untyped_storage().data_ptr()
    quiet(opt.step, make_closure(opt, model, x, y))
    assert all(torch.isfinite(p).all() for p in model.parameters())
