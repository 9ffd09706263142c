"""Issue 10, item 6: every numeric option rejects non-finite values with one line naming the key
and the allowed values (library, dotlist, YAML, CLI, param groups)."""
from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kfqn
from kfqn.core.components import Option
from kfqn.core.config import TOP_LEVEL, validate_param_group
from kfqn.core.errors import ConfigError
from kfqn.core.registry import default_registry

BAD = [float("nan"), float("inf"), float("-inf")]


def _model():
    return torch.nn.Sequential(torch.nn.Linear(3, 2))


@pytest.mark.parametrize("value", BAD, ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("key", ["lr", "damping", "momentum", "weight_decay"])
def test_top_level_numeric_options_reject_non_finite(key, value):
    with pytest.raises(ConfigError) as err:
        kfqn.build_optimizer(_model(), "kbfgs", **{key: value})
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"{key} = ") and "allowed:" in msg


def _float_options():
    """(path, Option) of every float option of every registered component and the top level."""
    reg = default_registry()
    out = [(k, o) for k, o in TOP_LEVEL.items() if isinstance(o, Option) and o.type is float]
    for kind in ("factor_update", "damping", "inversion", "a_estimator", "g_estimator",
                 "fallback"):
        for name in reg.names(kind):
            for k, o in getattr(reg.get(kind, name), "options", {}).items():
                if isinstance(o, Option) and o.type is not None and float in (
                        o.type if isinstance(o.type, tuple) else (o.type,)):
                    out.append((f"{kind}:{name}.{k}", o))
    return out


@pytest.mark.parametrize("path,opt", _float_options(), ids=lambda v: v if isinstance(v, str) else "")
def test_every_float_option_rejects_non_finite(path, opt):
    for value in BAD:
        with pytest.raises(ConfigError, match="is not a finite number; allowed: "):
            opt.validate(path, value)
    if opt.default is not None:
        assert opt.validate(path, opt.default) == opt.default


@settings(max_examples=50, deadline=None)
@given(st.floats(allow_nan=True, allow_infinity=True))
def test_damping_accepts_exactly_the_finite_positive_floats(x):
    ok = math.isfinite(x) and x > 0
    try:
        TOP_LEVEL["damping"].validate("damping", x)
        accepted = True
    except ConfigError as e:
        accepted = False
        assert "damping" in str(e) and "allowed: float in (0.0, inf)" in str(e)
    assert accepted == ok


@pytest.mark.parametrize("text", [".nan", ".inf", "-.inf"])
def test_dotlist_non_finite_is_rejected(text):
    with pytest.raises(ConfigError, match=r"^g_side\.norm_gate_eps = .* allowed"):
        kfqn.build_optimizer(_model(), "kbfgs", dotlist=[f"g_side.norm_gate_eps={text}"])
    with pytest.raises(ConfigError, match=r"^damping = "):
        kfqn.build_optimizer(_model(), "kbfgs", dotlist=[f"damping={text}"])


@pytest.mark.parametrize("key", ["lr", "damping", "momentum", "weight_decay"])
def test_param_group_values_are_validated(key):
    with pytest.raises(ConfigError, match=rf"^param_groups\[1\]\.{key} = nan is not a finite"):
        validate_param_group(1, {"params": [], key: float("nan")})
    assert validate_param_group(0, {"params": [], key: 0.5})[key] == 0.5
    assert validate_param_group(0, {"params": [], key: torch.tensor(0.5)})[key] == 0.5


def test_cli_rejects_nan_damping(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "kfqn", "train", "quickstart", "optimizer.damping=.nan",
         "budget.steps=1", f"logging.root={tmp_path}"],
        capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr
    lines = [l for l in out.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and "damping" in lines[0] and "allowed" in lines[0], out.stderr
