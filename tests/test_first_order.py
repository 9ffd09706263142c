"""First-order presets (docs/algorithms.md §4: ``sgd_m``, ``adam``, ``rmsprop``) against torch.optim, step for
step; their options (torch defaults, decoupled weight decay, centred RMSprop); non-finite steps;
checkpoints; and that they are presets like every other one."""
from __future__ import annotations

import io
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import kfqn
from helpers import make_closure, small_cnn, teacher_data


def cnn() -> nn.Module:
    """``small_cnn`` without the bias in front of BatchNorm: that bias has a zero gradient up to
    rounding, which Adam and RMSprop would amplify into differences of order lr."""
    model = small_cnn()
    conv = model[0]
    model[0] = nn.Conv2d(3, 6, 3, padding=1, bias=False)
    with torch.no_grad():
        model[0].weight.copy_(conv.weight)
    return model


def _compare(spec: dict, make_ref, steps: int = 6, model_fn=cnn, rtol=1e-5, atol=1e-6,
             exact=False):
    x, y = teacher_data(16 * steps)
    m1, m2 = model_fn(), model_fn()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a first-order preset warns about nothing
        opt = kfqn.build_optimizer(m1, spec)
    assert opt.preconditioned_modules == []
    ref = make_ref(m2.parameters())
    for step, (xb, yb) in enumerate(zip(x.split(16), y.split(16))):
        opt.step(make_closure(opt, m1, xb, yb))
        make_closure(ref, m2, xb, yb)()
        ref.step()
        for (n, p), q in zip(m1.named_parameters(), m2.parameters()):
            if exact:
                assert torch.equal(p, q), f"step {step} {n}: {(p - q).abs().max():.3e}"
            else:
                torch.testing.assert_close(p, q, rtol=rtol, atol=atol, msg=f"step {step} {n}")
    return opt


@pytest.mark.parametrize("spec,ref", [
    ({"preset": "sgd_m", "weight_decay": 1e-3, "momentum_init": "first"},
     lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, dampening=0.9, weight_decay=1e-3,
                               fused=True)),
    ({"preset": "sgd_m", "momentum_form": "torch", "lr": 0.05},  # zero start == torch's here
     lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-5, fused=True)),
    ({"preset": "adam", "weight_decay": 1e-3},
     lambda p: torch.optim.Adam(p, lr=1e-3, betas=(0.9, 0.9), eps=1e-8, weight_decay=1e-3,
                                fused=True)),
    ({"preset": "adam", "weight_decay": 0.0, "fallback": {"beta2": 0.999}},  # torch defaults
     lambda p: torch.optim.Adam(p, fused=True)),
    ({"preset": "adam", "lr": 3e-3, "weight_decay": 1e-2, "weight_decay_mode": "outside",
      "fallback": {"beta1": 0.8, "beta2": 0.99, "eps": 1e-6}},
     lambda p: torch.optim.AdamW(p, lr=3e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=1e-2,
                                 fused=True)),
    ({"preset": "rmsprop", "momentum": 0.0, "weight_decay": 0.0, "fallback": {"alpha": 0.99}},
     lambda p: torch.optim.RMSprop(p, lr=1e-3)),  # torch defaults
    ({"preset": "rmsprop", "momentum_form": "torch", "weight_decay": 1e-3},
     lambda p: torch.optim.RMSprop(p, lr=1e-3, alpha=0.9, momentum=0.9, weight_decay=1e-3)),
    ({"preset": "rmsprop", "momentum_form": "torch", "fallback": {"centered": True}},
     lambda p: torch.optim.RMSprop(p, lr=1e-3, alpha=0.9, momentum=0.9, weight_decay=1e-5,
                                   centered=True)),
], ids=["sgd_m", "sgd_m-torch", "adam", "adam-torch-defaults", "adamw", "rmsprop-torch-defaults",
        "rmsprop-momentum", "rmsprop-centered"])
def test_preset_equals_torch_optimizer(spec, ref):
    """Bit for bit: the fallbacks hold torch.optim's SGD, Adam and AdamW (fused) and write
    RMSprop in torch's order; sgd_m's EMA form with momentum_init=first sets its first buffer
    as rho G + (1 - rho) G, G up to a rounding (kfqn/updates/first_order.py)."""
    _compare(spec, ref, exact=spec.get("momentum_init") != "first")


@pytest.mark.parametrize("init", ["zero", "first"])
def test_p2_rmsprop_momentum_is_an_ema_of_the_scaled_gradient(init):
    """The preset's P2 setting: v <- 0.9 v + 0.1 g^2, u = g / (sqrt(v) + eps),
    b <- 0.9 b + 0.1 u (b starts at 0, as in the P2 code; at u with momentum_init=first),
    theta <- theta - lr b."""
    x, y = teacher_data(48)
    model = small_cnn()
    opt = kfqn.build_optimizer(model, "rmsprop", weight_decay=0.0, momentum_init=init)
    w = model[0].weight
    v = torch.zeros_like(w)
    buf = None
    for xb, yb in zip(x.split(16), y.split(16)):
        before = w.detach().clone()
        opt.step(make_closure(opt, model, xb, yb))
        g = w.grad
        v = 0.9 * v + 0.1 * g * g
        u = g / (v.sqrt() + 1e-8)
        if buf is None:
            buf = u if init == "first" else 0.1 * u
        else:
            buf = 0.9 * buf + 0.1 * u
        torch.testing.assert_close(w.detach(), before - 1e-3 * buf, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("form", ["ema", "torch"])
def test_sgd_m_zero_start(form):
    """sgd_m's default start (the P2 code): b_0 = 0, b <- 0.9 b + c g (c = 0.1 'ema', 1
    'torch'), theta <- theta - lr b; so the first step is 0.1 lr g in the EMA form."""
    x, y = teacher_data(48)
    model = small_cnn()
    opt = kfqn.build_optimizer(model, "sgd_m", weight_decay=0.0, momentum_form=form)
    w = model[0].weight
    buf = torch.zeros_like(w)
    c = 0.1 if form == "ema" else 1.0
    for xb, yb in zip(x.split(16), y.split(16)):
        before = w.detach().clone()
        opt.step(make_closure(opt, model, xb, yb))
        buf = 0.9 * buf + c * w.grad
        torch.testing.assert_close(w.detach(), before - 0.1 * buf, rtol=1e-5, atol=1e-7)


@settings(max_examples=15, deadline=None)
@given(lr=st.floats(1e-4, 1e-1), b1=st.floats(0.0, 0.99), b2=st.floats(0.5, 0.999),
       eps=st.floats(1e-8, 1e-3), wd=st.sampled_from([0.0, 1e-4, 1e-2]),
       mode=st.sampled_from(["inside", "outside"]))
def test_adam_matches_torch_for_any_hyperparameters(lr, b1, b2, eps, wd, mode):
    def flat_model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4))

    cls = torch.optim.Adam if mode == "inside" else torch.optim.AdamW
    _compare({"preset": "adam", "lr": lr, "momentum": b1, "weight_decay": wd,
              "weight_decay_mode": mode, "fallback": {"beta2": b2, "eps": eps}},
             lambda p: cls(p, lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd, fused=True),
             steps=3, model_fn=flat_model, exact=True)


@settings(max_examples=15, deadline=None)
@given(lr=st.floats(1e-4, 1e-1), rho=st.sampled_from([0.0, 0.5, 0.9]),
       alpha=st.floats(0.5, 0.999), eps=st.floats(1e-8, 1e-3),
       wd=st.sampled_from([0.0, 1e-4, 1e-2]), centered=st.booleans())
def test_rmsprop_and_sgd_match_torch_for_any_hyperparameters(lr, rho, alpha, eps, wd, centered):
    def flat_model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4))

    _compare({"preset": "rmsprop", "lr": lr, "momentum": rho, "weight_decay": wd,
              "momentum_form": "torch",
              "fallback": {"alpha": alpha, "eps": eps, "centered": centered}},
             lambda p: torch.optim.RMSprop(p, lr=lr, alpha=alpha, eps=eps, weight_decay=wd,
                                           momentum=rho, centered=centered),
             steps=3, model_fn=flat_model, exact=True)
    _compare({"preset": "sgd_m", "lr": lr, "momentum": rho, "weight_decay": wd,
              "momentum_form": "torch"},
             lambda p: torch.optim.SGD(p, lr=lr, momentum=rho, weight_decay=wd, fused=True),
             steps=3, model_fn=flat_model, exact=True)


@pytest.mark.parametrize("preset", ["sgd_m", "adam", "rmsprop"])
def test_nonfinite_step_changes_nothing(preset):
    x, y = teacher_data(32)
    model = small_cnn()
    opt = kfqn.build_optimizer(model, preset)
    opt.step(make_closure(opt, model, x[:16], y[:16]))
    params = [p.detach().clone() for p in model.parameters()]
    state = {k: {n: t.clone() for n, t in d.items()} for k, d in opt.fallback.state_dict().items()}

    def bad():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x[16:]), y[16:]) * float("nan")
        loss.backward()
        return loss

    opt.step(bad)
    for p, q in zip(model.parameters(), params):
        assert torch.equal(p, q)
    for k, d in opt.fallback.state_dict().items():
        for n, t in d.items():
            assert torch.equal(t, state[k][n]), (k, n)
    assert opt.stats()["_global"]["nonfinite_steps"] == 1


@pytest.mark.parametrize("preset", ["sgd_m", "adam", "rmsprop"])
def test_resume_equals_uninterrupted_run(preset):
    x, y = teacher_data(64)

    def run(model, opt, batches):
        for i in batches:
            opt.step(make_closure(opt, model, x[16 * i:16 * i + 16], y[16 * i:16 * i + 16]))

    m1 = small_cnn()
    o1 = kfqn.build_optimizer(m1, preset)
    run(m1, o1, range(4))
    m2 = small_cnn()
    o2 = kfqn.build_optimizer(m2, preset)
    run(m2, o2, range(2))
    buf = io.BytesIO()
    torch.save({"model": m2.state_dict(), "opt": o2.state_dict()}, buf)
    buf.seek(0)
    snap = torch.load(buf, weights_only=False)
    m3 = small_cnn(seed=4)
    m3.load_state_dict(snap["model"])
    o3 = kfqn.build_optimizer(m3, preset)
    o3.load_state_dict(snap["opt"])
    run(m3, o3, range(2, 4))
    for p, q in zip(m1.parameters(), m3.parameters()):
        assert torch.equal(p, q)


def test_state_bytes_count_every_moment():
    model = small_cnn()
    n = sum(p.numel() for p in model.parameters()) * 4
    assert kfqn.build_optimizer(model, "adam").state_bytes() == 2 * n
    assert kfqn.build_optimizer(model, "rmsprop").state_bytes() == 2 * n
    assert kfqn.build_optimizer(model, "sgd_m").state_bytes() == n


def test_presets_are_registered_and_validated():
    names = kfqn.default_registry().names("preset")
    assert {"kfac", "shampoo", "sgd_m", "adam", "rmsprop"} <= set(names)
    with pytest.raises(kfqn.ConfigError, match=r"fallback.beta2 = 1.5 is out of range"):
        kfqn.build_optimizer(small_cnn(), "adam", fallback={"beta2": 1.5})
    with pytest.raises(kfqn.ConfigError, match=r"unknown key 'fallback.beta3'.*beta2"):
        kfqn.build_optimizer(small_cnn(), "adam", fallback={"beta3": 0.9})
