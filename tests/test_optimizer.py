"""Optimizer behaviour: SGD equivalence with identity factors, checkpoint/resume, non-finite
handling, the extra pass leaving the model as found, schedulers, stats, factors, policies."""
from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from torch import nn

import kfqn
from kfqn.core.errors import KfqnError, UnsupportedModuleError
from helpers import QN_PRESETS, batches, make_closure, quiet, small_cnn, teacher_data

IDENTITY = {"a_side": {"update": "identity"}, "g_side": {"update": "identity"}}


@pytest.mark.parametrize("preset", QN_PRESETS)
@pytest.mark.parametrize("form,dampening", [("ema", 0.9), ("torch", 0.0)])
def test_identity_factors_reduce_to_momentum_sgd(preset, form, dampening, device):
    x, y = teacher_data(64)
    x, y = x.to(device), y.to(device)
    m1, m2 = small_cnn().to(device), small_cnn().to(device)
    opt = kfqn.build_optimizer(m1, preset, lr=0.05, momentum=0.9, weight_decay=1e-3,
                               momentum_form=form, momentum_init="first", factor_dtype="float32",
                               a_side={"update": "identity", "warm_start": False}
                               if preset.startswith("kbfgs") else {"update": "identity", "init": "identity"},
                               g_side={"update": "identity"})
    ref = torch.optim.SGD(m2.parameters(), lr=0.05, momentum=0.9, dampening=dampening,
                          weight_decay=1e-3)
    for step, (xb, yb) in zip(range(5), batches(x, y, 16)):
        opt.step(make_closure(opt, m1, xb, yb))
        make_closure(ref, m2, xb, yb)()
        ref.step()
        for (n, p), q in zip(m1.named_parameters(), m2.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=f"{preset} step {step} {n}")
    # the extra pass left BatchNorm statistics as a single forward would
    for b1, b2 in zip(m1.buffers(), m2.buffers()):
        torch.testing.assert_close(b1, b2)


def _train(preset, model, steps, data, opt=None, **kw):
    x, y = data
    opt = opt or kfqn.build_optimizer(model, preset, lr=0.2, **kw)
    it = batches(x, y, 32)
    losses = []
    for _ in range(steps):
        xb, yb = next(it)
        losses.append(float(quiet(opt.step, make_closure(opt, model, xb, yb)).detach()))
    return opt, losses


@pytest.mark.parametrize("preset", QN_PRESETS)
def test_presets_lower_the_loss_without_nans(preset):
    data = teacher_data(256)
    model = small_cnn()
    opt = kfqn.build_optimizer(model, preset, lr=0.5)
    if opt.needs_warm_start:
        with opt.warm_start():
            for i in range(0, 256, 64):
                model(data[0][i:i + 64])
    _, losses = _train(preset, model, 60, data, opt=opt)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-8:]) / 8 < 0.6 * losses[0], losses
    for p in model.parameters():
        assert torch.isfinite(p).all()
    stats = opt.stats()
    assert stats["_global"]["nonfinite_steps"] == 0
    for name in opt.preconditioned_modules:
        assert all(v == v for v in stats[name].values())  # no NaN figures


def _steps(model, opt, data, start, count):
    x, y = data
    for i in range(start, start + count):
        s = (i * 32) % x.shape[0]
        quiet(opt.step, make_closure(opt, model, x[s:s + 32], y[s:s + 32]))


@pytest.mark.parametrize("preset", QN_PRESETS + ["kfbfgs_cnn:next_iterate"])
def test_checkpoint_resume_equals_uninterrupted_run(preset):
    name, _, source = preset.partition(":")
    kw = {"g_side": {"source": source}} if source else {}
    data = teacher_data(128)
    ref_model = small_cnn()
    ref = kfqn.build_optimizer(ref_model, name, lr=0.2, **kw)
    _steps(ref_model, ref, data, 0, 7)

    model = small_cnn()
    opt = kfqn.build_optimizer(model, name, lr=0.2, **kw)
    _steps(model, opt, data, 0, 4)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=False)
    fresh = small_cnn(seed=99)
    fresh.load_state_dict(ckpt["model"])
    opt2 = kfqn.build_optimizer(fresh, name, lr=0.2, **kw)
    opt2.load_state_dict(ckpt["opt"])
    _steps(fresh, opt2, data, 4, 3)
    for (n, p), q in zip(fresh.named_parameters(), ref_model.parameters()):
        assert torch.equal(p, q), n
    for name_, f in opt2.factors().items():
        for k, v in f.items():
            assert torch.equal(v, ref.factors()[name_][k]), (name_, k)


def test_checkpoint_from_other_config_is_refused():
    model = small_cnn()
    sd = kfqn.build_optimizer(model, "kbfgs").state_dict()
    other = kfqn.build_optimizer(small_cnn(), "kbfgs_l")
    with pytest.raises(KfqnError, match="g_side"):
        other.load_state_dict(sd)
    with pytest.raises(KfqnError, match="not a kfqn optimizer checkpoint"):
        other.load_state_dict({"state": {}, "param_groups": []})


@pytest.mark.parametrize("preset", QN_PRESETS)
@pytest.mark.parametrize("poison", ["loss", "grad"])
def test_nonfinite_step_is_skipped_and_counted(preset, poison):
    data = teacher_data(128)
    model = small_cnn()
    opt, _ = _train(preset, model, 3, data)
    params = [p.detach().clone() for p in model.parameters()]
    factors = opt.factors()
    state = copy.deepcopy(opt.state_dict())  # state_dict holds live tensors, as torch.optim
    x, y = data

    def bad():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x[:32]), y[:32])
        if poison == "loss":
            loss = loss * float("nan")
        loss.backward()
        if poison == "grad" and model[-1].weight.grad is not None:  # None in the extra pass
            model[-1].weight.grad[0, 0] = float("inf")
        return loss

    quiet(opt.step, bad)
    for p, q in zip(model.parameters(), params):
        assert torch.equal(p, q)
    for name, f in opt.factors().items():
        for k, v in f.items():
            assert torch.equal(v, factors[name][k]), (name, k)
    for name, layer in state["layers"].items():
        assert torch.equal(opt.layers[name].momentum, layer["momentum"])
    assert opt.stats()["_global"]["nonfinite_steps"] == 1
    _, losses = _train(preset, model, 3, data, opt=opt)  # training goes on
    assert all(l == l for l in losses)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_extra_pass_restores_grads_bn_and_rng_and_sees_same_dropout():
    x, y = teacher_data(32)
    model = small_cnn(dropout=0.5)
    opt = kfqn.build_optimizer(model, "kbfgs", a_side={"warm_start": False})
    masks = []
    model[-2].register_forward_hook(lambda m, i, o: masks.append((i[0].clone(), o.clone())))
    calls = []

    def closure():
        calls.append(1)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    torch.manual_seed(5)
    bn = model[1]
    before = bn.running_mean.clone()
    quiet(opt.step, closure)
    assert len(calls) == 2
    (i1, o1), (i2, o2) = masks
    live = (i1 != 0) & (i2 != 0)
    assert live.sum() > 50 and torch.equal((o1 == 0) & live, (o2 == 0) & live)  # same dropout mask
    rng_after = torch.get_rng_state()
    # reference: one closure only from the same RNG state
    ref_model = small_cnn(dropout=0.5)
    ref_opt = kfqn.build_optimizer(ref_model, "kbfgs", a_side={"warm_start": False})
    torch.manual_seed(5)
    make_closure(ref_opt, ref_model, x, y)()
    assert torch.equal(torch.get_rng_state(), rng_after)
    torch.testing.assert_close(bn.running_mean, ref_model[1].running_mean)
    assert not torch.equal(bn.running_mean, before)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p.grad, q.grad)  # grads at theta, not theta+


def test_lr_read_from_param_groups_and_schedulers():
    data = teacher_data(64)
    model = small_cnn()
    opt = kfqn.build_optimizer(model, "kfbfgs_cnn", lr=0.3)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.0)
    _steps(model, opt, data, 0, 1)
    sched.step()
    assert opt.param_groups[0]["lr"] == 0.0
    before = [p.detach().clone() for p in model.parameters()]
    _steps(model, opt, data, 1, 2)
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p, q)


def test_param_groups_with_different_lr():
    model = small_cnn()
    head = list(model[-1].parameters())
    body = [p for p in model.parameters() if all(p is not h for h in head)]
    opt = kfqn.build_optimizer(model, "kfbfgs_cnn", param_groups=[{"params": body, "lr": 0.0},
                                                                  {"params": head, "lr": 0.1}])
    before = [p.detach().clone() for p in body]
    _steps(model, opt, teacher_data(64), 0, 2)
    assert all(torch.equal(p, q) for p, q in zip(body, before))
    assert not torch.equal(model[-1].weight, head[0].detach().clone() * 0 + before[0].sum() * 0)
    split = [{"params": [model[-1].weight], "lr": 0.1}, {"params": [p for p in model.parameters()
                                                                     if p is not model[-1].weight]}]
    with pytest.warns(UserWarning, match="different param groups"):
        opt = kfqn.build_optimizer(model, "kbfgs", param_groups=split)
    assert "6" not in opt.preconditioned_modules


def test_stats_factors_and_describe():
    data = teacher_data(64)
    model = small_cnn()
    opt, _ = _train("kbfgs_l", model, 3, data, factor_dtype="float64")
    stats = opt.stats()
    assert set(opt.preconditioned_modules) == {"0", "3", "6"}
    for name in opt.preconditioned_modules:
        row = stats[name]
        for key in ("sy", "sy_raw", "damping_powell", "damping_second", "g_rejected",
                    "a_rejected", "dir_rejected", "H_a_norm", "H_g_norm"):
            assert key in row, key
    f = opt.factors()["6"]
    assert f["H_a"].shape == (55, 55) and f["H_g"].shape == (4, 4) and f["A"].shape == (55, 55)
    assert f["H_a"].dtype == torch.float64
    torch.testing.assert_close(f["H_g"], f["H_g"].T)
    assert float(torch.linalg.eigvalsh(f["H_g"]).min()) > 0
    text = opt.describe()
    assert "fallback (momentum): 1.weight, 1.bias" in text
    assert opt.state_bytes() > 0
    times = opt.last_phase_times
    assert {"forward_backward", "extra_pass", "precondition", "factor_updates", "total"} <= set(times)


def test_closure_required_for_extra_pass_but_not_for_next_iterate():
    x, y = teacher_data(32)
    model = small_cnn()
    opt = kfqn.build_optimizer(model, "kfbfgs_cnn")
    with pytest.raises(KfqnError, match="closure"):
        opt.step()
    opt = kfqn.build_optimizer(model, "kfbfgs_cnn", g_side={"source": "next_iterate"})
    for _ in range(3):
        make_closure(opt, model, x, y)()
        opt.step()
    assert opt.stats()["6"]["g_rejected"] + opt.stats()["6"]["g_accepted"] >= 1


def test_repeated_forward_is_a_clear_error():
    model = small_cnn()
    opt = kfqn.build_optimizer(model, "kfbfgs_cnn", g_side={"source": "next_iterate"})
    x, y = teacher_data(8)
    loss = nn.functional.cross_entropy(model(x), y) + nn.functional.cross_entropy(model(x), y)
    loss.backward()
    with pytest.raises(KfqnError, match="forward passes"):
        opt.step()


def test_unsupported_module_policies():
    def model():
        return nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, padding_mode="circular"),
                             nn.Flatten(), nn.Linear(4 * 36, 2))

    with pytest.raises(UnsupportedModuleError, match="padding_mode='circular'"):
        kfqn.build_optimizer(model(), "kfbfgs_cnn", unsupported="error")
    with pytest.warns(UserWarning, match="padding_mode='circular'"):
        opt = kfqn.build_optimizer(model(), "kfbfgs_cnn", unsupported="warn")
    assert opt.preconditioned_modules == ["2"] and "0" in opt.unsupported
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt = kfqn.build_optimizer(model(), "kfbfgs_cnn", unsupported="fallback")
    assert opt.fallback_params == ["0.weight", "0.bias"]


def test_warm_start_sets_a_from_all_data_and_restores_bn():
    x, y = teacher_data(96)
    model = small_cnn()
    opt = kfqn.build_optimizer(model, "kbfgs", factor_dtype="float64")
    assert opt.needs_warm_start
    bn = [b.clone() for b in model.buffers()]
    with opt.warm_start():
        for i in range(0, 96, 32):
            model(x[i:i + 32])
    assert not opt.needs_warm_start
    for b, c in zip(model.buffers(), bn):
        assert torch.equal(b, c)
    lin = model[-1]
    feats = nn.Sequential(*list(model)[:-1])
    with torch.no_grad():  # train-mode BatchNorm: the same 32-sample batches
        a = torch.cat([feats(x[i:i + 32]) for i in range(0, 96, 32)])
    abar = torch.cat([a, torch.ones(96, 1)], 1).double()
    torch.testing.assert_close(opt.factors()["6"]["A"], abar.T @ abar / 96)
    lam = 0.3 ** 0.5
    torch.testing.assert_close(opt.factors()["6"]["H_a"],
                               torch.linalg.inv(abar.T @ abar / 96 + lam * torch.eye(55, dtype=torch.float64)))


def _extra_pass_run(mode: str, read_grads: bool = False) -> tuple[list, list]:
    data = teacher_data(96)
    model = small_cnn()
    opt = kfqn.build_optimizer(model, "kfbfgs_cnn", dotlist=[f"trial_pass_grads={mode}"])
    x, y = data
    losses = []
    for i in range(4):
        xb, yb = x[32 * (i % 3): 32 * (i % 3 + 1)], y[32 * (i % 3): 32 * (i % 3 + 1)]

        def closure():
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(xb), yb)
            loss.backward()
            if read_grads:
                _ = sum(float(p.grad.norm()) for p in model.parameters())
            return loss
        losses.append(float(quiet(opt.step, closure).detach()))
    return [p.detach().clone() for p in model.parameters()], losses


def test_extra_pass_with_frozen_parameters_equals_the_full_backward():
    """trial_pass_grads=layer_outputs (dL/dh only) follows the same trajectory as running the
    closure's full backward at theta+ (trial_pass_grads=all)."""
    p_fast, l_fast = _extra_pass_run("layer_outputs")
    p_full, l_full = _extra_pass_run("all")
    assert l_fast == l_full
    for a, b in zip(p_fast, p_full):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_closure_reading_grads_in_the_extra_pass_gets_a_clear_error():
    with pytest.raises(KfqnError, match="trial_pass_grads=all"):
        _extra_pass_run("layer_outputs", read_grads=True)
    _extra_pass_run("all", read_grads=True)   # the documented way out works
