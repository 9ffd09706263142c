"""The fused path of the first-order fallbacks (``momentum``, ``adam``, ``rmsprop``; see
kfqn/updates/first_order.py) against their exact path, step for step on CPU and CUDA: same
parameters and state up to rounding, the same counters bit for bit, skipped steps that change
nothing, a per-parameter skip where a step could overflow, and no host synchronisation."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import kfqn
from kfqn.updates.first_order import fused_kernels

CONFIGS = {
    "sgd_m": {"preset": "sgd_m", "weight_decay": 1e-3},
    "sgd_m-torch-outside": {"preset": "sgd_m", "momentum_form": "torch", "lr": 0.05,
                            "weight_decay": 1e-2, "weight_decay_mode": "outside"},
    "adam": {"preset": "adam", "weight_decay": 1e-3},
    "adam-no-bias-correction": {"preset": "adam", "momentum": 0.0,
                                "fallback": {"bias_correction": False, "beta2": 0.99}},
    "adamw": {"preset": "adam", "lr": 3e-3, "weight_decay": 1e-2, "weight_decay_mode": "outside",
              "fallback": {"beta1": 0.8, "beta2": 0.99, "eps": 1e-6}},
    "rmsprop": {"preset": "rmsprop"},
    "rmsprop-torch-defaults": {"preset": "rmsprop", "momentum": 0.0, "weight_decay": 0.0,
                               "fallback": {"alpha": 0.99}},
    "rmsprop-torch-outside-bc": {"preset": "rmsprop", "momentum_form": "torch",
                                 "weight_decay": 1e-2, "weight_decay_mode": "outside",
                                 "fallback": {"bias_correction": True}},
}


def _model(device, dtype=torch.float32) -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(7, 5), nn.Tanh(), nn.Linear(5, 3)).to(device, dtype)


def _grads(model: nn.Module, step: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(p.shape, generator=g, dtype=torch.float64).mul_(0.1 * (1 + step % 3))
            for p in model.parameters()]


def _set_grads(model, grads) -> None:
    for p, g in zip(model.parameters(), grads):
        p.grad = g.to(p.device, p.dtype).clone()


def _build(spec, model, fast: bool):
    opt = kfqn.build_optimizer(model, spec)
    opt.fallback.fast_path = fast
    return opt


def _state(opt) -> dict:
    return {(k, n): t.clone() for k, d in opt.fallback.state_dict().items() for n, t in d.items()}


def _skip_unless_fused(device):
    if not fused_kernels(torch.device(device), torch.float32):
        pytest.skip("this torch has no fused optimizer kernels here")


@pytest.mark.parametrize("name", list(CONFIGS))
def test_fused_path_equals_exact_path(name, device):
    _skip_unless_fused(device)
    spec = CONFIGS[name]
    m_fast, m_exact = _model(device), _model(device)
    fast, exact = _build(spec, m_fast, True), _build(spec, m_exact, False)
    calls = []
    original = type(fast.fallback)._step_exact
    fast.fallback._step_exact = lambda entries, ok: (calls.append(len(entries)),
                                                     original(fast.fallback, entries, ok))
    for step in range(8):
        grads = _grads(m_fast, step)
        if step == 3:  # a non-finite gradient: the whole step is skipped on both paths
            grads[0][0, 0] = float("nan")
        for model, opt in ((m_fast, fast), (m_exact, exact)):
            _set_grads(model, grads)
            opt.step()
        for (n, p), q in zip(m_fast.named_parameters(), m_exact.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=f"step {step} {n}")
        s_fast, s_exact = _state(fast), _state(exact)
        assert s_fast.keys() == s_exact.keys()
        for key, t in s_fast.items():
            assert t.dtype == s_exact[key].dtype and t.shape == s_exact[key].shape, key
            if t.is_floating_point():  # moments and buffers of order 1 (RMSprop's u ~ 1)
                torch.testing.assert_close(t, s_exact[key], rtol=1e-5, atol=1e-5, msg=str(key))
            else:  # step counts and started flags
                assert torch.equal(t, s_exact[key]), key
    assert calls and not any(calls), "the fused path did not take every parameter"
    assert int(fast.stats()["_global"]["nonfinite_steps"]) == 1


@pytest.mark.parametrize("name", list(CONFIGS))
def test_skipped_step_changes_nothing_bitwise(name, device):
    _skip_unless_fused(device)
    model = _model(device)
    opt = _build(CONFIGS[name], model, True)
    for step in range(2):
        _set_grads(model, _grads(model, step))
        opt.step()
    params = [p.detach().clone() for p in model.parameters()]
    state = _state(opt)
    grads = _grads(model, 2)
    grads[-1][0] = float("inf")
    _set_grads(model, grads)
    opt.step()
    for p, q in zip(model.parameters(), params):
        assert torch.equal(p, q)
    for key, t in _state(opt).items():
        assert torch.equal(t, state[key]), key


@pytest.mark.parametrize("name", ["sgd_m", "adam", "adamw", "rmsprop"])
def test_a_step_that_could_overflow_skips_only_that_parameter(name, device):
    """A finite gradient of 1e38 (float32, near its largest value): the fused path's bound cannot
    prove the step finite, so it skips that parameter's step and state update (the exact path
    might have taken it) and still takes the others' steps."""
    _skip_unless_fused(device)
    model = _model(device)
    opt = _build(CONFIGS[name], model, True)
    _set_grads(model, _grads(model, 0))
    opt.step()
    params = [p.detach().clone() for p in model.parameters()]
    state = _state(opt)
    grads = _grads(model, 1)
    grads[0][0, 0] = 1e38
    _set_grads(model, grads)
    opt.step()
    names = [n for n, _ in model.named_parameters()]
    for n, p, q in zip(names, model.parameters(), params):
        assert torch.isfinite(p).all()
        assert torch.equal(p, q) == (n == names[0]), n
    for (kind, n), t in _state(opt).items():
        if n == names[0]:
            assert torch.equal(t, state[(kind, n)]), (kind, n)
    assert int(opt.stats()["_global"]["nonfinite_steps"]) == 0


@pytest.mark.parametrize("name", ["sgd_m", "adam", "rmsprop"])
def test_float64_and_float16_parameters(name, device):
    """float64 takes the fused path, float16 the exact one; both train and stay finite."""
    for dtype in (torch.float64, torch.float16):
        model = _model(device, dtype)
        opt = _build(CONFIGS[name], model, True)
        before = [p.detach().clone() for p in model.parameters()]
        for step in range(3):
            _set_grads(model, _grads(model, step))
            opt.step()
        for p, q in zip(model.parameters(), before):
            assert p.dtype == dtype and torch.isfinite(p).all() and not torch.equal(p, q)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", list(CONFIGS))
def test_fallback_step_does_not_synchronise(name):
    device = torch.device("cuda")
    _skip_unless_fused(device)
    model = _model(device)
    opt = _build(CONFIGS[name], model, True)
    ok = torch.ones((), dtype=torch.bool, device=device)
    _set_grads(model, _grads(model, 0))
    opt.fallback.step(ok)  # the first step probes the kernels
    grads = [[g.to(device, torch.float32) for g in _grads(model, step)] for step in (1, 2)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step_grads in grads:
            for p, g in zip(model.parameters(), step_grads):
                p.grad.copy_(g)
            opt.fallback.step(ok)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("name", ["sgd_m", "adam", "adamw", "rmsprop", "rmsprop-torch-outside-bc"])
def test_carried_state_bounds_stay_above_the_state_norms(name, device):
    """The fused path's overflow test uses bounds of the state's 2-norms that it carries from
    step to step; they must stay upper bounds, also across exact-path steps and skipped steps."""
    _skip_unless_fused(device)
    model = _model(device)
    opt = _build(CONFIGS[name], model, True)
    fallback = opt.fallback
    for step in range(10):
        fallback.fast_path = step not in (4, 5)
        grads = _grads(model, step)
        if step == 7:
            grads[1][0] = float("nan")
        _set_grads(model, grads)
        opt.step()
        for kind, tensors in fallback.tracked.items():
            bounds = fallback.state_bounds(kind, list(tensors))
            for (n, t), bound in zip(tensors.items(), bounds):
                assert torch.linalg.vector_norm(t) <= bound * (1 + 1e-5), (step, kind, n)


@pytest.mark.parametrize("name", ["sgd_m", "adam", "rmsprop"])
def test_loaded_state_is_seen_by_the_bounds(name, device):
    """A checkpoint's state replaces the carried bounds: a loaded buffer near float32's largest
    value makes that parameter's next fused step one that could overflow, so it is skipped."""
    _skip_unless_fused(device)
    model = _model(device)
    opt = _build(CONFIGS[name], model, True)
    _set_grads(model, _grads(model, 0))
    opt.step()
    state = opt.state_dict()
    kind = "m" if name == "adam" else "buf"
    first = next(iter(state["fallback"][kind]))
    state["fallback"][kind][first] = torch.full_like(state["fallback"][kind][first], 1e38)
    opt.load_state_dict(state)
    before = [p.detach().clone() for p in model.parameters()]
    _set_grads(model, _grads(model, 1))
    opt.step()
    for (n, p), q in zip(model.named_parameters(), before):
        assert torch.equal(p, q) == (n == first), n
    assert torch.equal(opt.fallback.state_dict()[kind][first], state["fallback"][kind][first])
