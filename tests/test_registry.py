"""The pluggy registry: built-ins via the public hooks, run-time and entry-point plugins,
duplicate names, overrides, the listing, and the example DFP plugin used in a real build."""
from __future__ import annotations

import sys
import textwrap
import types

import pytest
import torch
from torch import nn

import kfqn
from kfqn.core.registry import KINDS, Registry
from kfqn.core.errors import RegistryError
from kfqn.updates.damping import NoDamping


def _plugin(kind_hook: str, *components) -> types.SimpleNamespace:
    ns = types.SimpleNamespace()
    setattr(ns, kind_hook, kfqn.hookimpl(lambda: list(components)))
    return ns


def test_builtins_cover_every_component_kind_of_the_spec():
    reg = Registry(load_entry_points=False)
    assert {"linear", "conv2d"} <= set(reg.names("layer_adapter"))
    assert {"bfgs", "lbfgs", "identity"} <= set(reg.names("factor_update"))
    assert {"none", "powell", "dd", "ddv2"} <= set(reg.names("damping"))
    assert {"ema_hessian_action", "minibatch_hessian_action"} <= set(reg.names("a_estimator"))
    assert {"kbfgs", "kbfgs_l", "kfbfgs_cnn", "kfbfgs_l_cnn"} <= set(reg.names("preset"))
    for r in reg.components():
        assert r.description, f"{r.kind} {r.name} has no description"
        assert r.plugin.startswith("kfqn.builtin")


def test_duplicate_name_is_an_error_unless_override():
    reg = Registry(load_entry_points=False)

    class Twin(NoDamping):
        description = "a second 'none'"

    with pytest.raises(RegistryError, match=r"damping 'none' .* is already registered .* override=True"):
        reg.register(_plugin("kfqn_dampings", Twin))
    assert reg.get("damping", "none") is NoDamping  # the failed plugin was rolled back
    reg.register(_plugin("kfqn_dampings", Twin), override=True)
    assert reg.get("damping", "none") is Twin

    class Flagged(NoDamping):
        override = True

    reg.register(_plugin("kfqn_dampings", Flagged))
    assert reg.get("damping", "none") is Flagged


def test_unknown_names_and_kinds():
    reg = Registry(load_entry_points=False)
    with pytest.raises(RegistryError, match=r"unknown damping 'powel'.*Did you mean 'powell'"):
        reg.get("damping", "powel")
    with pytest.raises(RegistryError, match="unknown component kind"):
        reg.get("dampings", "dd")
    with pytest.raises(RegistryError, match="without a string 'name'"):
        reg.register(_plugin("kfqn_dampings", object()))


def test_components_listing():
    rows = kfqn.components()
    kinds = {k for k, _, _ in rows}
    from kfqn.runner.registry import RUNNER_KINDS

    assert {"layer_adapter", "factor_update", "damping", "preset"} <= kinds
    assert kinds <= set(KINDS) | set(RUNNER_KINDS)
    text = kfqn.format_components("damping")
    assert text.splitlines()[0] == "damping:" and "ddv2" in text


def test_entry_point_plugins_are_discovered(tmp_path, monkeypatch):
    (tmp_path / "kfqn_fake_plugin.py").write_text(textwrap.dedent("""
        import kfqn
        from kfqn.updates.damping import NoDamping

        class Loud(NoDamping):
            name = "loud"
            description = "from an entry point"

        @kfqn.hookimpl
        def kfqn_dampings():
            return [Loud]
    """))
    dist = tmp_path / "kfqn_fake_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: kfqn-fake-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[kfqn]\nfake = kfqn_fake_plugin\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    reg = Registry()
    assert reg.get("damping", "loud").description == "from an entry point"
    assert reg.tables()["damping"]["loud"].plugin == "fake"
    sys.modules.pop("kfqn_fake_plugin", None)


def test_broken_entry_point_names_the_culprit(tmp_path, monkeypatch):
    (tmp_path / "kfqn_broken_plugin.py").write_text("raise ImportError('boom')\n")
    dist = tmp_path / "kfqn_broken_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: kfqn-broken-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[kfqn]\nbroken = kfqn_broken_plugin\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(RegistryError, match="entry-point group 'kfqn' failed.*boom"):
        Registry()


def test_example_dfp_plugin_registers_and_trains():
    import dfp_update  # examples/dfp_update.py, on sys.path via conftest

    name = kfqn.register_plugin(dfp_update)
    try:
        assert "dfp" in kfqn.default_registry().names("factor_update")
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
        opt = kfqn.build_optimizer(model, "kbfgs", g_side={"update": "dfp"},
                                   a_side={"warm_start": False})
        x, t = torch.randn(64, 4), torch.randn(64, 2)

        def closure():
            opt.zero_grad()
            loss = ((model(x) - t) ** 2).mean()
            loss.backward()
            return loss

        first = float(closure().detach())
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for _ in range(20):
                opt.step(closure)
        assert float(closure().detach()) < first
        assert opt.stats()["2"]["g_accepted"] in (0.0, 1.0)
        h = opt.factors()["2"]["H_g"]
        assert not torch.equal(h, torch.eye(2))  # DFP did update H_g
        with pytest.raises(RegistryError, match="already registered"):
            kfqn.register_plugin(dfp_update)
    finally:
        kfqn.unregister_plugin(dfp_update)
    assert "dfp" not in kfqn.default_registry().names("factor_update")
    assert name
