"""Config loading, merging and validation: every bad input names the key and allowed values."""
from __future__ import annotations

import pytest
from torch import nn

import kfqn
from kfqn.core.config import merge, resolve_config
from kfqn.core.errors import ConfigError
from kfqn.core.registry import default_registry

REG = default_registry()


def test_presets_resolve_with_every_spec_option():
    cfg = resolve_config("kbfgs", REG)
    assert cfg["a_side"]["name"] == "ema_hessian_action" and cfg["a_side"]["warm_start"] is True
    assert cfg["g_side"] == {"name": "secant_pairs", "source": "extra_pass", "ema": 0.9,
                             "ema_init": "zero",
                             "damping": {"name": "dd", "mu1": 0.2}, "update": {"name": "bfgs"},
                             "norm_gate": True, "norm_gate_eps": 1e-4}
    assert cfg["momentum_init"] == "zero" and cfg["a_side"]["norm_gate"] is True
    cfg = resolve_config("kbfgs_l", REG)
    assert cfg["g_side"]["update"] == {"name": "lbfgs", "memory": 100, "gamma": "one"}
    assert cfg["name"] == "kbfgs_l" and cfg["a_side"]["name"] == "ema_hessian_action"
    cfg = resolve_config("kfbfgs_l_cnn", REG)
    assert cfg["g_side"]["damping"]["name"] == "ddv2" and cfg["g_side"]["norm_gate"] is False
    assert cfg["a_side"] == {"name": "minibatch_hessian_action", "init": "batch_inverse",
                             "update": {"name": "bfgs"}, "damping": {"name": "powell", "mu1": 0.2},
                             "inversion": {"name": "cholesky", "min_eig": 0.0,
                                           "host_reads": "auto"}}


def test_overrides_kwargs_dotlist_and_component_switch():
    cfg = resolve_config("kbfgs", REG, {"lr": 1, "g_side": {"damping": "ddv2"}},
                         ["g_side.update.name=lbfgs", "g_side.update.memory=7",
                          "a_side.beta=0.5", "conv_damping_split=sqrt_T"])
    assert cfg["lr"] == 1.0 and isinstance(cfg["lr"], float)
    assert cfg["g_side"]["damping"] == {"name": "ddv2", "mu1": 0.2}
    assert cfg["g_side"]["update"] == {"name": "lbfgs", "memory": 7, "gamma": "one"}
    assert cfg["a_side"]["beta"] == 0.5 and cfg["conv_damping_split"] == "sqrt_T"
    # switching a component replaces its section (old options do not leak into the new one)
    cfg = resolve_config("kbfgs_l", REG, {"g_side": {"update": "bfgs"}})
    assert cfg["g_side"]["update"] == {"name": "bfgs"}


def test_mapping_with_preset_and_yaml_path(tmp_path):
    cfg = resolve_config({"preset": "kfbfgs_cnn", "g_side": {"source": "next_iterate"}}, REG)
    assert cfg["g_side"]["source"] == "next_iterate" and cfg["name"] == "kfbfgs_cnn"
    path = tmp_path / "mine.yaml"
    path.write_text("base: kbfgs\nname: mine\nlr: ${damping}\ndamping: 0.7\n")
    cfg = resolve_config(str(path), REG)
    assert cfg["name"] == "mine" and cfg["lr"] == 0.7  # interpolation resolved


@pytest.mark.parametrize("spec,over,dot,match", [
    ("kbfgz", {}, [], r"unknown optimizer preset 'kbfgz'.*Did you mean 'kbfgs'"),
    ("kbfgs", {"lrr": 1}, [], r"unknown key 'lrr'; allowed keys in the top level: .*lr.*Did you mean 'lr'"),
    ("kbfgs", {}, ["g_side.dampng=dd"], r"unknown key 'g_side.dampng'; allowed keys in g_side \(secant_pairs\)"),
    ("kbfgs", {}, ["g_side.damping=ddv3"], r"g_side.damping.name = 'ddv3' is not a registered damping; allowed: dd, ddv2, none, powell"),
    ("kbfgs", {}, ["g_side.source=sometimes"], r"g_side.source = 'sometimes' is not allowed; allowed: one of 'extra_pass', 'next_iterate'"),
    ("kbfgs", {"momentum": 1.5}, [], r"momentum = 1.5 is out of range; allowed: float in \[0.0, 1.0\)"),
    ("kbfgs", {"damping": 0}, [], r"damping = 0.0 is out of range"),
    ("kbfgs", {"lr": "fast"}, [], r"lr = 'fast' has the wrong type; allowed: float"),
    ("kbfgs_l", {}, ["g_side.update.memory=0"], r"g_side.update.memory = 0 is out of range"),
    ("kbfgs", {}, ["g_side.update.memory=5"], r"unknown key 'g_side.update.memory'; allowed keys in g_side.update \(bfgs\): \(none\)"),
    ("kbfgs", {"layers": ["linear", "lstm"]}, [], r"layers: 'lstm' is not a registered layer_adapter"),
    ("kbfgs", {"factor_dtype": "float16"}, [], r"factor_dtype = 'float16' is not allowed; allowed: one of 'float32', 'float64'"),
    ("kfbfgs_cnn", {}, ["a_side.update=lbfgs"], r"a_side.init = 'batch_inverse' needs .*set a_side.init=identity"),
    ("kbfgs", {}, ["lr"], r"override 'lr' must look like key=value"),
    ("missing/file.yaml", {}, [], r"config file 'missing/file.yaml' does not exist"),
])
def test_bad_configs_fail_at_build_time_with_clear_messages(spec, over, dot, match):
    with pytest.raises(ConfigError, match=match):
        kfqn.build_optimizer(nn.Linear(2, 2), spec, dotlist=dot, **over)


def test_config_error_is_a_value_error_and_one_line():
    with pytest.raises(ValueError) as info:
        kfqn.build_optimizer(nn.Linear(2, 2), "kbfgs", g_side={"ema": 2})
    assert "\n" not in str(info.value) and "g_side.ema" in str(info.value)


def test_merge_rules():
    base = {"a": {"name": "x", "k": 1}, "b": 1}
    assert merge(base, {"a": {"k": 2}}) == {"a": {"name": "x", "k": 2}, "b": 1}
    assert merge(base, {"a": "y"}) == {"a": "y", "b": 1}
    assert merge(base, {"a": "x"}) == base
    assert merge({"a": "x"}, {"a": {"k": 1}}) == {"a": {"name": "x", "k": 1}}
    assert merge(base, {"a": {"name": "y", "j": 3}}) == {"a": {"name": "y", "j": 3}, "b": 1}


def test_options_of_a_default_component_without_its_name():
    """``a_side.inversion.host_reads=never`` where the preset leaves the inversion at its
    default: the options go to the default component (cholesky), not a missing-name error."""
    cfg = resolve_config("kbfgs", REG, dotlist=["a_side.inversion.host_reads=never"])
    assert cfg["a_side"]["inversion"] == {"name": "cholesky", "min_eig": 0.0, "host_reads": "never"}
    with pytest.raises(ConfigError, match="host_reads"):
        resolve_config("kbfgs", REG, dotlist=["a_side.inversion.host_reads=sometimes"])
