"""K-FAC's Fisher belongs to the training loss: the runner sets ``preconditioner.loss`` from the model
and refuses a config that names another loss; every shipped config gets it right."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kfqn.core.config import resolve_config
from kfqn.core.errors import ConfigError
from kfqn.core.registry import default_registry
from kfqn.curvature.output_losses import OutputLoss
from kfqn.runner import config as C
from kfqn.runner.components import get_component, resolve_options
from kfqn.runner.preflight import preflight


def _kfac_loss(cfg) -> OutputLoss | None:
    g = resolve_config(C.to_dict(cfg.optimizer), default_registry())["preconditioner"]
    if "loss" not in g or g.get("fisher") == "empirical":
        return None
    return OutputLoss(g["loss"], g["loss_reduction"], g["mse_scale"])


def _same_loss(cfg, seed: int = 0, batch: int = 5) -> None:
    """The K-FAC output loss and the model's training loss agree on random outputs."""
    model = get_component("model", cfg.model.name, "model.name")
    opts = resolve_options(model, C.to_dict(cfg.model.options), "model.options")
    kfac = _kfac_loss(cfg)
    assert kfac is not None
    g = torch.Generator().manual_seed(seed)
    if model.task == "reconstruction":
        x = torch.rand(batch, 12, generator=g)
        z = 3 * torch.randn(batch, 12, generator=g)
        y = torch.zeros(batch, dtype=torch.long)
        target = x
    else:
        x = torch.zeros(batch, 3)
        z = 3 * torch.randn(batch, 10, generator=g)
        y = torch.randint(0, 10, (batch,), generator=g)
        target = y
    torch.testing.assert_close(kfac.value(z, target), model.loss(z, x, y, **opts))


def _shipped_kfac_runs():
    for name in C.experiment_names():
        base = C.base_config(C.find_config(name))
        for task in list(base.get("tasks") or {}) or [None]:
            for preset in base.sweep.presets or [base.optimizer.preset]:
                if preset == "kfac":
                    yield pytest.param(name, task, preset, id=f"{name}-{task}-{preset}")


@pytest.mark.parametrize("name,task,preset", list(_shipped_kfac_runs()))
def test_every_shipped_kfac_run_uses_the_fisher_of_its_training_loss(name, task, preset):
    base = C.base_config(C.find_config(name))
    cfg = preflight(C.compose_run(base, task=task, preset=preset))
    _same_loss(cfg)


def test_the_shipped_configs_hold_kfac_runs_of_both_kinds():
    ids = [p.id for p in _shipped_kfac_runs()]
    assert any("p2_autoencoders" in i for i in ids) and any("p1_cifar" in i for i in ids)
    assert any("quickstart-curves" in i for i in ids) and any("quickstart-digits" in i for i in ids)


def _cfg(model: dict, g_side: dict | None = None, data: str = "digits"):
    opt = {"preset": "kfac"}
    if g_side is not None:
        opt["preconditioner"] = g_side
    return C.compose_run(C.base_config({"name": "t", "data": {"name": data}, "model": model,
                                        "optimizer": opt, "budget": {"steps": 1}}))


@settings(max_examples=25, deadline=None)
@given(loss=st.sampled_from(["sigmoid_ce", "half_squared", None]), seed=st.integers(0, 2**16),
       batch=st.integers(1, 7))
def test_the_kfac_loss_is_derived_from_the_model_when_unset(loss, seed, batch):
    model = {"name": "mlp_autoencoder"} if loss is None else \
        {"name": "mlp_autoencoder", "options": {"loss": loss}}
    cfg = preflight(_cfg(model))
    want = {"sigmoid_ce": "sigmoid_cross_entropy", "half_squared": "mse", None:
            "sigmoid_cross_entropy"}[loss]
    assert cfg.optimizer.preconditioner.loss == want
    _same_loss(cfg, seed, batch)


def test_a_classifier_keeps_cross_entropy_and_an_empirical_fisher_needs_no_loss():
    cfg = preflight(_cfg({"name": "digits_cnn"}))
    assert cfg.optimizer.preconditioner.loss == "cross_entropy"
    _same_loss(cfg)
    # the empirical Fisher takes the gradient of the real loss: nothing to derive or check
    cfg = preflight(_cfg({"name": "mlp_autoencoder"}, {"fisher": "empirical"}))
    assert "loss" not in cfg.optimizer.preconditioner


@pytest.mark.parametrize("g_side,key", [
    ({"loss": "cross_entropy"}, "loss"),
    ({"loss": "mse"}, "loss"),
    ({"loss": "sigmoid_cross_entropy", "loss_reduction": "mean"}, "loss_reduction"),
])
def test_a_config_naming_another_loss_is_one_line_error(g_side, key):
    with pytest.raises(ConfigError) as e:
        preflight(_cfg({"name": "mlp_autoencoder"}, g_side))
    msg = str(e.value)
    assert "\n" not in msg
    assert f"optimizer.preconditioner.{key}" in msg and "sigmoid_ce" in msg and "remove" in msg


def test_preflight_is_idempotent_and_keeps_other_g_side_keys():
    cfg = preflight(_cfg({"name": "mlp_autoencoder"}, {"inversion": "cholesky_lazy"}))
    once = C.to_dict(cfg)
    assert C.to_dict(preflight(cfg)) == once
    assert once["optimizer"]["preconditioner"]["inversion"] == "cholesky_lazy"
