"""The first-order fallbacks (``momentum``, ``adam``, ``rmsprop``; kfqn/updates/first_order.py)
against torch.optim, step for step: bit for bit where the rule is torch's (SGD, Adam, AdamW,
RMSprop), with torch's fused kernels and without them (``Fallback.use_fused = False``), over
two param groups of different dtypes whose lr, momentum and weight decay change between steps;
skipped steps (``ok`` false, a NaN or inf gradient, a finite gradient beyond the overflow
bound) that change nothing bit for bit; never a non-finite parameter or state; no host
synchronisation on CUDA. ``benchmarks/fallback_speed.py`` measures the step time."""
from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import kfqn
from kfqn.updates.first_order import Fallback

CONFIGS = {
    "sgd_m": {"preset": "sgd_m", "weight_decay": 1e-3},
    "sgd_m-torch-outside": {"preset": "sgd_m", "momentum_form": "torch", "lr": 0.05,
                            "weight_decay": 1e-2, "weight_decay_mode": "outside"},
    "sgd_m-first": {"preset": "sgd_m", "momentum_init": "first"},
    "adam": {"preset": "adam", "weight_decay": 1e-3},
    "adam-no-bias-correction": {"preset": "adam", "momentum": 0.0,
                                "fallback": {"bias_correction": False, "beta2": 0.99}},
    "adamw": {"preset": "adam", "lr": 3e-3, "weight_decay": 1e-2, "weight_decay_mode": "outside",
              "fallback": {"beta1": 0.8, "beta2": 0.99, "eps": 1e-6}},
    "rmsprop": {"preset": "rmsprop"},
    "rmsprop-first": {"preset": "rmsprop", "momentum_init": "first"},
    "rmsprop-torch-defaults": {"preset": "rmsprop", "momentum": 0.0, "weight_decay": 0.0,
                               "fallback": {"alpha": 0.99}},
    "rmsprop-torch-outside-bc": {"preset": "rmsprop", "momentum_form": "torch",
                                 "weight_decay": 1e-2, "weight_decay_mode": "outside",
                                 "fallback": {"bias_correction": True}},
    "rmsprop-centered": {"preset": "rmsprop", "fallback": {"centered": True}},
}


def _model(device, dtype=torch.float32, second=None) -> nn.Module:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(7, 5), nn.Tanh(), nn.Linear(5, 3)).to(device, dtype)
    if second is not None:
        model[2].to(second)
    return model


def _grads(model: nn.Module, step: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(p.shape, generator=g, dtype=torch.float64).mul_(0.1 * (1 + step % 3))
            for p in model.parameters()]


def _set_grads(model, grads) -> None:
    for p, g in zip(model.parameters(), grads):
        p.grad = g.to(p.device, p.dtype).clone()


def _build(spec, model, fused: bool = True, **kw):
    old = Fallback.use_fused
    Fallback.use_fused = fused
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return kfqn.build_optimizer(model, spec, **kw)
    finally:
        Fallback.use_fused = old


def _state(opt) -> dict:
    return {(k, n): t.clone() for k, d in opt.fallback.state_dict().items() for n, t in d.items()}


def _assert_finite(model, opt) -> None:
    for p in model.parameters():
        assert torch.isfinite(p).all()
    for key, t in _state(opt).items():
        assert not t.is_floating_point() or torch.isfinite(t).all(), key


# -- torch.optim references ------------------------------------------------------------------
class Reference:
    """A torch.optim optimizer over the same two param groups, the kfqn group settings copied
    in before each step; weight decay 'outside' as theta (1 - lr tau) before the step."""

    def __init__(self, rule: str, groups: list[dict], mode: str, fused: bool):
        self.rule, self.mode = rule, mode
        kw = {"fused": True} if fused else {"foreach": False}
        if rule == "sgd":
            self.opt = torch.optim.SGD([{"params": g["params"]} for g in groups], lr=0.1, **kw)
            # zero buffers: kfqn's zero start (the 'torch' form's first step rho 0 + G = G is
            # torch's b_1 = G); and torch's fused SGD fails on a buffer that a parameter
            # without a gradient at the first step did not get
            for g in groups:
                for p in g["params"]:
                    self.opt.state[p]["momentum_buffer"] = torch.zeros_like(p)
        elif rule == "adam":
            cls = torch.optim.Adam if mode == "inside" else torch.optim.AdamW
            self.opt = cls([{"params": g["params"]} for g in groups], **kw)
        else:
            self.opt = torch.optim.RMSprop([{"params": g["params"]} for g in groups],
                                           alpha=0.9, eps=1e-8, foreach=fused)
            for g in groups:  # a buffer also where the momentum is 0 at the first step
                for p in g["params"]:
                    self.opt.state[p].update(step=torch.zeros(()),
                                             square_avg=torch.zeros_like(p),
                                             momentum_buffer=torch.zeros_like(p))

    @torch.no_grad()
    def step(self, groups: list[dict], ema: bool) -> None:
        for mine, g in zip(self.opt.param_groups, groups):
            lr, rho, wd = g["lr"], g["momentum"], g["weight_decay"]
            mine["lr"] = lr
            if self.rule == "adam":
                mine.update(betas=(rho, 0.9), eps=1e-8, weight_decay=wd)
                continue
            inside = wd if self.mode == "inside" else 0.0
            mine.update(momentum=rho, weight_decay=inside)
            if self.rule == "sgd":
                mine["dampening"] = 1.0 - (1.0 - rho) if ema else 0.0
            if wd and self.mode == "outside":
                for p in mine["params"]:
                    if p.grad is not None:
                        p.mul_(1.0 - lr * wd)
        self.opt.step()


SPECS = {  # rule -> the kfqn spec whose fallback is that torch rule
    "sgd": {"preset": "sgd_m"},
    "adam": {"preset": "adam", "fallback": {"name": "adam", "beta2": 0.9, "eps": 1e-8,
                                            "bias_correction": True}},
    "rmsprop": {"preset": "rmsprop", "momentum_form": "torch",
                "fallback": {"name": "rmsprop", "alpha": 0.9, "eps": 1e-8}},
}


@settings(max_examples=30, deadline=None)
@given(rule=st.sampled_from(["sgd", "adam", "rmsprop"]), fused=st.booleans(),
       mode=st.sampled_from(["inside", "outside"]), ema=st.booleans(),
       second=st.sampled_from([torch.float32, torch.float64]),
       hyper=st.lists(st.tuples(st.sampled_from([1e-3, 0.05, 0.3]),
                                st.sampled_from([0.0, 0.5, 0.9]),
                                st.sampled_from([0.0, 1e-4, 1e-2])), min_size=2, max_size=2),
       events=st.lists(st.sampled_from(["ok", "ok", "ok", "not_ok", "nan", "inf", "huge",
                                        "no_grad"]), min_size=7, max_size=7))
def test_fallback_equals_torch_optim_bit_for_bit(rule, fused, mode, ema, second, hyper, events):
    """Two param groups (float32 and float32 or float64) whose settings change after step 3, as
    an LR scheduler would change them; skipped steps are steps torch.optim does not take."""
    if rule == "rmsprop" and ema:
        ema = False  # torch's RMSprop has only the undamped buffer
    if rule == "adam" and mode == "inside":
        ema = False  # (momentum_form has no effect on Adam)
    spec = {**SPECS[rule], "momentum_form": "ema" if ema else "torch", "weight_decay_mode": mode}
    mine, theirs = _model("cpu", second=second), _model("cpu", second=second)

    def groups(model):
        return [{"params": list(model[0].parameters())}, {"params": list(model[2].parameters())}]

    opt = _build(spec, mine, fused, param_groups=groups(mine))
    assert opt.fallback.fused == (fused or rule == "rmsprop") and len(opt.fallback.buckets) == 2
    ref_groups = groups(theirs)
    ref = Reference(rule, ref_groups, mode, fused)
    for step, event in enumerate(events):
        for g, rg, (lr, rho, wd) in zip(opt.param_groups, ref_groups,
                                        hyper if step < 3 else hyper[::-1]):
            g.update(lr=lr, momentum=rho, weight_decay=wd)
            rg.update(lr=lr, momentum=rho, weight_decay=wd)
        grads = _grads(mine, step)
        if event in ("nan", "inf", "huge"):  # huge: finite, beyond every rule's bound
            i = step % len(grads)
            huge = 3e38 if list(mine.parameters())[i].dtype == torch.float32 else 1e307
            grads[i].view(-1)[0] = {"nan": float("nan"), "inf": float("inf"), "huge": huge}[event]
        _set_grads(mine, grads)
        _set_grads(theirs, grads)
        if event == "no_grad":  # a parameter without a gradient is not stepped
            mine[0].bias.grad = theirs[0].bias.grad = None
        opt.fallback.step(torch.tensor(event != "not_ok"))
        if event in ("ok", "no_grad"):
            ref.step(opt.param_groups, ema)
        for (n, p), q in zip(mine.named_parameters(), theirs.parameters()):
            assert torch.equal(p, q), f"step {step} ({event}) {n}: {(p - q).abs().max():.3e}"
        _assert_finite(mine, opt)
    if rule == "adam":  # the counters: accepted steps, as torch's step count (float32)
        t = opt.fallback.state_dict()["t"]
        for n, p in theirs.named_parameters():
            assert float(t[n]) == float(ref.opt.state[p].get("step", 0)), n


@pytest.mark.parametrize("name", [n for n in CONFIGS if not n.startswith("rmsprop")])
def test_fused_and_plain_torch_paths_agree(name, device):
    """``use_fused = False`` (the path of a torch or device without the fused kernels): the
    plain torch.optim step, put back where skipped; same steps up to rounding, counters bit
    for bit."""
    m_fused, m_plain = _model(device), _model(device)
    fused, plain = _build(CONFIGS[name], m_fused, True), _build(CONFIGS[name], m_plain, False)
    assert fused.fallback.fused and not plain.fallback.fused
    for step in range(8):
        grads = _grads(m_fused, step)
        if step == 3:  # a non-finite gradient: the whole step is skipped on both paths
            grads[0][0, 0] = float("nan")
        for model, opt in ((m_fused, fused), (m_plain, plain)):
            _set_grads(model, grads)
            opt.step()
        for (n, p), q in zip(m_fused.named_parameters(), m_plain.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=f"step {step} {n}")
        s_fused, s_plain = _state(fused), _state(plain)
        assert s_fused.keys() == s_plain.keys()
        for key, t in s_fused.items():
            assert t.dtype == s_plain[key].dtype and t.shape == s_plain[key].shape, key
            if t.is_floating_point():
                torch.testing.assert_close(t, s_plain[key], rtol=1e-5, atol=1e-5, msg=str(key))
            else:  # step counts and started flags
                assert torch.equal(t, s_plain[key]), key
    assert int(fused.stats()["_global"]["nonfinite_steps"]) == 1


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_skipped_step_changes_nothing_bitwise(name, fused, device):
    model = _model(device)
    opt = _build(CONFIGS[name], model, fused)
    for step in range(2):
        _set_grads(model, _grads(model, step))
        opt.step()
    params = [p.detach().clone() for p in model.parameters()]
    state = _state(opt)
    for bad in (float("inf"), float("nan"), 1e30):
        grads = _grads(model, 2)
        grads[-1][0] = bad
        _set_grads(model, grads)
        opt.step()
        for p, q in zip(model.parameters(), params):
            assert torch.equal(p, q)
        for key, t in _state(opt).items():
            assert torch.equal(t, state[key]), key


@pytest.mark.parametrize("name", ["sgd_m", "adam", "adamw", "rmsprop", "rmsprop-centered"])
def test_a_finite_gradient_that_would_overflow_skips_the_step(name, device):
    """float32: |g| = 1e19 is finite but g^2 is not (Adam's and RMSprop's v would become inf and
    freeze the parameter). The whole step is skipped (as GradScaler skips it), not counted as
    non-finite, and the next ordinary step is taken; a large gradient below the bound is
    taken and leaves everything finite."""
    model = _model(device)
    opt = _build(CONFIGS[name], model)
    _set_grads(model, _grads(model, 0))
    opt.step()
    params = [p.detach().clone() for p in model.parameters()]
    state = _state(opt)
    grads = _grads(model, 1)
    grads[0][0, 0] = 1e19 if name != "sgd_m" else 3e38
    _set_grads(model, grads)
    opt.step()
    for p, q in zip(model.parameters(), params):
        assert torch.equal(p, q)
    for key, t in _state(opt).items():
        assert torch.equal(t, state[key]), key
    assert int(opt.stats()["_global"]["nonfinite_steps"]) == 0
    grads[0][0, 0] = 1e15
    _set_grads(model, grads)
    opt.step()
    assert not torch.equal(model[0].weight, params[0])
    _assert_finite(model, opt)


@pytest.mark.parametrize("name", ["sgd_m", "adam", "rmsprop"])
def test_float64_and_float16_parameters(name, device):
    """Both train and stay finite (float16: eps at least float16's smallest normal number)."""
    for dtype in (torch.float64, torch.float16):
        model = _model(device, dtype)
        opt = _build(CONFIGS[name], model)
        before = [p.detach().clone() for p in model.parameters()]
        for step in range(3):
            _set_grads(model, _grads(model, step))
            opt.step()
        for p, q in zip(model.parameters(), before):
            assert p.dtype == dtype and torch.isfinite(p).all() and not torch.equal(p, q)
        _assert_finite(model, opt)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rule", ["sgd", "adam"])
def test_low_precision_follows_torch_in_float32(rule, dtype, device):
    """float16 / bfloat16 parameters step as torch.optim in float32 up to their rounding (the
    fused kernels only where :func:`fused_supported` found them right: torch 2.13's CPU fused
    SGD is not, for these dtypes)."""
    spec = {**SPECS[rule], "momentum_form": "torch", "weight_decay_mode": "inside"}
    mine, ref_model = _model(device, dtype), _model(device, torch.float32)
    with torch.no_grad():
        for p, q in zip(mine.parameters(), ref_model.parameters()):
            q.copy_(p)
    opt = _build(spec, mine)
    ref = Reference(rule, [{"params": list(ref_model.parameters())}], "inside", False)
    for step in range(5):
        grads = _grads(mine, step)
        _set_grads(mine, grads)
        for p, q in zip(mine.parameters(), ref_model.parameters()):
            q.grad = p.grad.float()
        opt.step()
        ref.step(opt.param_groups, ema=False)
        for p, q in zip(mine.parameters(), ref_model.parameters()):
            torch.testing.assert_close(p.float(), q, rtol=0.0, atol=0.02)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_checkpoint_format_and_resume(name, device):
    """State keyed by parameter name (moments as the parameter, ``t`` long, ``started`` bool,
    0-dim); a checkpoint taken after a skipped step resumes bit for bit."""
    def run(model, opt, steps):
        for step in steps:
            grads = _grads(model, step)
            if step == 2:
                grads[1][0] = float("nan")
            _set_grads(model, grads)
            opt.step()

    m1 = _model(device)
    o1 = _build(CONFIGS[name], m1)
    run(m1, o1, range(6))
    m2 = _model(device)
    o2 = _build(CONFIGS[name], m2)
    run(m2, o2, range(3))
    fb = o2.fallback.state_dict()
    names = [n for n, _ in m2.named_parameters()]
    for kind, d in fb.items():
        if kind == "mu" and not d:
            continue
        assert list(d) == names, kind
        for n, t in d.items():
            if kind in ("t", "started"):
                assert t.shape == () and t.dtype == (torch.long if kind == "t" else torch.bool)
            else:
                assert t.shape == m2.get_parameter(n).shape
    snap = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in m2.state_dict().items()}
    state = o2.state_dict()
    m3 = _model(device)
    m3.load_state_dict(snap)
    o3 = _build(CONFIGS[name], m3)
    o3.load_state_dict(state)
    run(m3, o3, range(3, 6))
    for p, q in zip(m1.parameters(), m3.parameters()):
        assert torch.equal(p, q)
    s1, s3 = _state(o1), _state(o3)
    for key, t in s1.items():
        assert torch.equal(t, s3[key]), key


def test_the_torch_optimizers_held():
    model = _model("cpu")
    assert isinstance(_build(CONFIGS["sgd_m"], model).fallback.opt, torch.optim.SGD)
    assert type(_build(CONFIGS["adam"], model).fallback.opt) is torch.optim.Adam
    assert isinstance(_build(CONFIGS["adamw"], model).fallback.opt, torch.optim.AdamW)
    assert _build(CONFIGS["adam"], model).fallback.fused  # CPU: torch >= 2.4


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", list(CONFIGS))
def test_fallback_step_does_not_synchronise(name):
    device = torch.device("cuda")
    model = _model(device)
    opt = _build(CONFIGS[name], model)
    ok = torch.ones((), dtype=torch.bool, device=device)
    _set_grads(model, _grads(model, 0))
    opt.fallback.step(ok)
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


@settings(max_examples=60, deadline=None)
@given(name=st.sampled_from(list(CONFIGS)),
       dtype=st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16]),
       eps=st.sampled_from([None, 0.0, 1e-30]), lr=st.sampled_from([1e-3, 1.0, 100.0]),
       scales=st.lists(st.integers(-45, 40), min_size=6, max_size=6))
def test_never_a_non_finite_parameter_or_state(name, dtype, eps, lr, scales):
    """Gradients from 1e-45 to 1e40 (beyond float32's range: inf), any eps (0 included), large
    learning rates, low-precision dtypes: every parameter and state element stays finite."""
    spec = {**CONFIGS[name], "lr": lr}
    if eps is not None:
        spec["fallback"] = {**spec.get("fallback", {}), "name": spec["preset"] if
                            spec["preset"] != "sgd_m" else "momentum"}
        if spec["preset"] != "sgd_m":
            spec["fallback"]["eps"] = eps
    model = _model("cpu", dtype)
    opt = _build(spec, model)
    for step, k in enumerate(scales):
        grads = [g * 10.0 ** k for g in _grads(model, step)]
        _set_grads(model, grads)
        opt.step()
        _assert_finite(model, opt)
