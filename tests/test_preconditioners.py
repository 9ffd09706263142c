"""One contract over every registered layer preconditioner (the method families: kronecker,
kfac, shampoo, ekfac and whatever a plugin adds), and the redesign's seams: checkpoints of the
old format, the ``plugins`` config key, the library without the runner."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import kfqn
from helpers import (assert_resumes_exactly, batches, flat_state, make_closure, quiet, small_cnn,
                     teacher_data)
from kfqn.core.errors import ConfigError, KfqnError
from kfqn.preconditioners.base import STATISTICS, LayerPreconditioner

FAMILIES = kfqn.default_registry().names("preconditioner")


def build(model, family, **kw):
    return quiet(kfqn.build_optimizer, model, {"preconditioner": family,
                                               "factor_dtype": "float64", **kw})


def _run(opt, model, data, steps):
    for _ in range(steps):
        opt.step(make_closure(opt, model, *next(data)))


@pytest.fixture(scope="module")
def problem():
    x, y = teacher_data(96)
    return x, y


def test_the_families_are_registered_where_they_are_defined():
    assert {"kronecker", "kfac", "shampoo", "ekfac"} <= set(FAMILIES)
    for name in FAMILIES:
        cls = kfqn.default_registry().get("preconditioner", name)
        assert issubclass(cls, LayerPreconditioner)
        assert cls.__module__.startswith("kfqn.preconditioners.") or not cls.__module__.startswith("kfqn.")


@pytest.mark.parametrize("family", FAMILIES)
def test_preconditioner_contract(family, problem):
    x, y = problem
    model = small_cnn()
    opt = build(model, family)
    assert set(opt.layers) == {"0", "3", "6"}            # every Conv2d and Linear, BN by fallback
    for layer in opt.layers.values():
        assert layer.precond.needs <= set(STATISTICS)
        assert isinstance(layer.precond, LayerPreconditioner)
    if opt.needs_warm_start:
        with opt.warm_start():
            model(x)
    data = batches(x, y, 32)
    first = float(F.cross_entropy(model(x), y).detach())
    _run(opt, model, data, 6)
    assert float(F.cross_entropy(model(x), y).detach()) < first
    for p in model.parameters():
        assert torch.isfinite(p).all()
    # factors: the inverse factors symmetric positive definite, the statistics symmetric
    for name, facs in opt.factors().items():
        for key, mat in facs.items():
            if key.startswith("H_") or key in ("A", "G"):
                torch.testing.assert_close(mat, mat.T, rtol=1e-8, atol=1e-10)
            if key.startswith("H_"):
                assert float(torch.linalg.eigvalsh(mat).min()) > 0, (name, key)
    assert opt.state_bytes() > 0
    # a skipped step (non-finite loss) changes no tensor but the skip counter; host-side
    # cadence bookkeeping (the step count, inverses recomputed from unchanged factors) may move
    before = flat_state(opt.state_dict())
    params = [p.detach().clone() for p in model.parameters()]
    xb, yb = next(data)

    def bad():
        opt.zero_grad()
        loss = F.cross_entropy(model(xb), yb) * float("nan")
        loss.backward()
        return loss
    opt.step(bad)
    after = flat_state(opt.state_dict())
    changed = [k for k in before if not (
        torch.equal(before[k], after[k]) if isinstance(before[k], torch.Tensor)
        else before[k] == after[k])]
    cadence = ("/step", "/inversions", "/inverse_due")
    assert [k for k in changed if not k.endswith(cadence)] == ["/nonfinite_steps"], changed
    assert all(not isinstance(before[k], torch.Tensor) for k in changed if k.endswith(cadence))
    for p, q in zip(params, model.parameters()):
        assert torch.equal(p, q)
    # resume: a fresh optimizer from the checkpoint continues bit for bit
    assert_resumes_exactly(opt, model, small_cnn(), lambda m: build(m, family), data)


def test_a_checkpoint_of_the_old_format_is_refused_in_one_line():
    model = small_cnn()
    opt = build(model, "kronecker")
    state = opt.state_dict()
    state["format"] = "kfqn-optimizer/1"
    with pytest.raises(KfqnError) as e:
        opt.load_state_dict(state)
    msg = str(e.value)
    assert "\n" not in msg and "kfqn-optimizer/1" in msg and "nothing was loaded" in msg


def test_a_and_g_sections_belong_to_the_kronecker_family():
    with pytest.raises(ConfigError, match=r"g_side is read by preconditioner 'kronecker' only.*"
                                          r"fisher"):
        kfqn.build_optimizer(small_cnn(), "kfac", g_side={"update": "bfgs"})
    cfg = kfqn.build_optimizer(small_cnn(), "kfac").config
    assert "a_side" not in cfg and "g_side" not in cfg and cfg["preconditioner"]["name"] == "kfac"


PLUGIN = '''
import kfqn
from kfqn.updates.damping import PowellDamping


@kfqn.register("damping")
class StrictPowell(PowellDamping):
    name = "strict_powell"
    description = "Powell with mu1 = 0.5 (test plugin)"

    def __init__(self, mu1: float = 0.5) -> None:
        super().__init__(mu1=mu1)
'''


def test_the_plugins_key_registers_a_module_before_the_config_is_read(tmp_path, monkeypatch):
    (tmp_path / "kfqn_test_plugin_mod.py").write_text(textwrap.dedent(PLUGIN))
    monkeypatch.syspath_prepend(str(tmp_path))
    reg = kfqn.core.registry.Registry(load_entry_points=False)
    spec = {"preset": "kbfgs", "plugins": ["kfqn_test_plugin_mod"],
            "g_side": {"damping": "strict_powell"}}
    opt = quiet(kfqn.build_optimizer, small_cnn(), spec, registry=reg)
    assert opt.config["g_side"]["damping"]["name"] == "strict_powell"
    assert "strict_powell" in reg.names("damping")
    # twice is fine (registered once)
    quiet(kfqn.build_optimizer, small_cnn(), spec, registry=reg)
    with pytest.raises(ConfigError) as e:
        kfqn.build_optimizer(small_cnn(), {"preset": "kbfgs", "plugins": ["no_such_mod_xyz"]},
                             registry=reg)
    assert "\n" not in str(e.value) and "plugins[0]" in str(e.value)


def test_the_library_imports_nothing_of_the_runner():
    code = textwrap.dedent("""
        import sys, torch, kfqn
        from torch import nn
        m = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
        for preset in kfqn.default_registry().names("preset"):
            kfqn.build_optimizer(m, preset)
        bad = sorted(k for k in sys.modules if k.startswith("kfqn.runner"))
        assert not bad, bad
        assert "dataset" not in kfqn.default_registry().kinds
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr
