"""Experiment configs: overrides, composition order, validation messages, interpolation."""
from __future__ import annotations

from pathlib import Path

import pytest

from kfqn.core.errors import ConfigError
from kfqn.runner import config as C

ROOT = Path(__file__).resolve().parents[2]


def base(tmp_path, **extra):
    cfg = {
        "name": "exp",
        "data": {"name": "digits", "root": str(tmp_path)},
        "model": {"name": "digits_cnn"},
        "optimizer": {"preset": "kbfgs", "weight_decay": 1e-4},
        "budget": {"epochs": 1},
        "presets": {"kbfgs": {"lr": 0.3, "damping": 0.3}, "kbfgs_l": {"lr": 0.2}},
    }
    cfg.update(extra)
    return cfg


def test_parse_overrides_types():
    got = dict(C.parse_overrides(["a.b=1", "c=0.5", "d=[1,2]", "e=null", "f=true", "g=kbfgs",
                                  "h=1e-5"]))
    assert got == {"a.b": 1, "c": 0.5, "d": [1, 2], "e": None, "f": True, "g": "kbfgs",
                   "h": 1e-5}


@pytest.mark.parametrize("bad", ["lr", "=3", "a..b=1", "a b=2"])
def test_bad_override_syntax(bad):
    with pytest.raises(ConfigError, match="is not key=value"):
        C.parse_overrides([bad])


def test_composition_order(tmp_path):
    b = C.base_config(base(tmp_path))
    run = C.compose_run(b)
    assert run.optimizer.lr == 0.3 and run.optimizer.weight_decay == 1e-4  # preset < file
    run = C.compose_run(b, preset="kbfgs_l")
    assert run.optimizer.preset == "kbfgs_l" and run.optimizer.lr == 0.2
    assert "damping" not in run.optimizer
    run = C.compose_run(b, grid_point=[("optimizer.lr", 0.05)])
    assert run.optimizer.lr == 0.05  # grid beats per-preset
    ov = C.parse_overrides(["optimizer.lr=0.01"])
    run = C.compose_run(C.base_config(base(tmp_path), ov), ov, grid_point=[("optimizer.lr", 0.05)])
    assert run.optimizer.lr == 0.01  # the command line beats everything
    for key in ("tasks", "presets", "sweep"):
        assert key not in run


def test_tasks_merge_and_reset_component_options(tmp_path):
    cfg = base(tmp_path, data={"name": "curves", "root": str(tmp_path),
                               "options": {"n_train": 100}},
               tasks={"dig": {"data": {"name": "digits", "options": {"test_fraction": 0.5}},
                              "budget": {"epochs": 3}}})
    b = C.base_config(cfg)
    run = C.compose_run(b, task="dig")
    assert run.data.name == "digits" and dict(run.data.options) == {"test_fraction": 0.5}
    assert run.budget.epochs == 3 and run.task == "dig"
    with pytest.raises(ConfigError, match="task 'dgi' is not in tasks; tasks: dig. Did you mean 'dig'"):
        C.compose_run(b, task="dgi")
    ov = C.parse_overrides(["data.name=digits"])  # options of curves do not carry over
    assert dict(C.compose_run(C.base_config(cfg, ov), ov).data.options) == {}


def test_unknown_key_is_named_with_suggestion(tmp_path):
    ov = C.parse_overrides(["budget.epoch=3"])
    with pytest.raises(ConfigError, match=r"unknown config key 'budget.epoch'; known keys of "
                                          r"budget: epochs, .* Did you mean 'epochs'"):
        C.compose_run(C.base_config(base(tmp_path), ov), ov)


def test_value_errors_name_key_and_allowed_values(tmp_path):
    ov = C.parse_overrides(["data.batch_size=0"])
    with pytest.raises(ConfigError, match=r"data.batch_size = 0 is out of range; allowed: int in"):
        C.compose_run(C.base_config(base(tmp_path), ov), ov)
    ov = C.parse_overrides(["device=tpu"])
    with pytest.raises(ConfigError, match=r"device = 'tpu' is not allowed; allowed: one of 'cpu', 'cuda'"):
        C.compose_run(C.base_config(base(tmp_path), ov), ov)


def test_missing_budget_and_preset(tmp_path):
    cfg = base(tmp_path)
    cfg["budget"] = {}
    with pytest.raises(ConfigError, match="no budget"):
        C.compose_run(C.base_config(cfg))
    cfg = base(tmp_path)
    cfg["optimizer"] = {}
    with pytest.raises(ConfigError, match="optimizer.preset is not set"):
        C.compose_run(C.base_config(cfg))


def test_interpolation_is_resolved_and_saved(tmp_path):
    cfg = base(tmp_path, logging={"run_dir": "${logging.root}/${name}-s${seed}"})
    run = C.compose_run(C.base_config(cfg), seed=4)
    assert run.logging.run_dir == "runs/exp-s4"
    path = C.save(run, tmp_path / "c.yaml")
    assert "${" not in path.read_text()
    bad = base(tmp_path, logging={"run_dir": "${nope}"})
    with pytest.raises(ConfigError, match="cannot resolve"):
        C.compose_run(C.base_config(bad))


def test_data_root_defaults_to_env(tmp_path, monkeypatch):
    cfg = base(tmp_path)
    del cfg["data"]["root"]
    monkeypatch.setenv("KFQN_DATA", str(tmp_path / "d"))
    assert C.compose_run(C.base_config(cfg)).data.root == str(tmp_path / "d")
    monkeypatch.delenv("KFQN_DATA")
    assert C.compose_run(C.base_config(cfg)).data.root == "~/.cache/kfqn"


def test_broken_yaml_is_one_clear_error(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="cannot parse"):
        C.load_file(p)
    with pytest.raises(ConfigError, match="not found"):
        C.find_config(tmp_path / "missing.yaml")


def test_shipped_experiment_configs_compose_and_resolve_anywhere(tmp_path, monkeypatch):
    """Every shipped config, every task x preset, composes and passes preflight; names resolve
    from any working directory (package data)."""
    from kfqn.runner.preflight import preflight

    monkeypatch.chdir(tmp_path)
    names = C.experiment_names()
    assert {"quickstart", "p2_autoencoders", "p1_cifar"} <= set(names)
    count = 0
    for name in names:
        path = C.find_config(name)
        assert path.is_file() and path.suffix == ".yaml"
        b = C.base_config(path)
        tasks = list(b.get("tasks") or {}) or [None]
        for task in tasks:
            for preset in (b.sweep.presets or [b.optimizer.preset]):
                preflight(C.compose_run(b, task=task, preset=preset))
                count += 1
    assert count >= 2 * 7 + 2 * 5 + 4 * 6
