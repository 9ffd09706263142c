"""Checks of a composed run config that need no data and no model: run before anything is
created or deleted on disk, so that a typo never costs a run directory.

:func:`preflight` checks the run name, the data set and model (registered, valid options), the
optimizer spec (everything :func:`kfqn.build_optimizer` validates), numbers the parameters'
dtype cannot hold, and sets the K-FAC G-side loss from the model's training loss (the Fisher of
another loss is a wrong curvature model: docs/algorithms.md, "K-FAC").
"""
from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from kfqn.core.errors import ConfigError
from kfqn.runner import config as cfgmod
from kfqn.runner.components import get_component, resolve_options

#: options (of K-FAC's preconditioner section) that say which loss the Fisher belongs to
FISHER_KEYS = ("loss", "loss_reduction", "mse_scale")


def _resolve_optimizer(spec: dict) -> dict:
    from kfqn.core.config import resolve_config
    from kfqn.core.registry import default_registry

    try:
        return resolve_config(spec, default_registry())
    except ConfigError as exc:
        raise ConfigError(f"optimizer: {' '.join(str(exc).split())}") from None


def derive_fisher_loss(cfg: DictConfig, model_comp: Any, model_opts: dict) -> None:
    """Set the optimizer's output loss (``preconditioner.loss`` of K-FAC, or ``g_side.loss`` of a
    G-side estimator that declares one; and its reduction / scale) from the model's training loss
    when the Fisher needs one (a sampled or exact Fisher) and the config leaves it unset; a
    config that sets a different loss is a :class:`ConfigError`."""
    resolved = _resolve_optimizer(cfgmod.to_dict(cfg.optimizer))
    section = next((k for k in ("preconditioner", "g_side")
                    if isinstance(resolved.get(k), dict) and "loss" in resolved[k]), None)
    if section is None or resolved[section].get("fisher") == "empirical":
        return
    fn = getattr(model_comp, "fisher_loss", None)
    want = fn(**model_opts) if callable(fn) else None
    if not want:
        return
    raw = OmegaConf.select(cfg, f"optimizer.{section}", default=None)
    given = cfgmod.to_dict(raw) if isinstance(raw, DictConfig) else (
        {"name": raw} if raw is not None else {})
    for key, value in want.items():
        if key in given and given[key] != value:
            loss_name = model_comp.loss_name(**model_opts)
            raise ConfigError(
                f"optimizer.{section}.{key} = {given[key]!r} but model {model_comp.name!r} "
                f"trains with the {loss_name} loss, whose Fisher needs {section}.{key} = "
                f"{value!r}; remove optimizer.{section}.{key} (the runner sets it from the "
                f"model) or set it to {value!r}")
    if "name" not in given:
        given = {"name": resolved[section]["name"], **given}
    OmegaConf.update(cfg, f"optimizer.{section}", {**given, **want}, merge=False)


def load_run_plugins(cfg: DictConfig) -> None:
    """Register the modules of the run config's ``plugins`` key (one line on failure)."""
    from kfqn.core.errors import RegistryError
    from kfqn.runner.registry import runner_registry

    mods = list(cfg.get("plugins") or [])
    if mods:
        try:
            runner_registry().load_plugins(mods)
        except RegistryError as exc:
            raise ConfigError(str(exc)) from None


def preflight(cfg: DictConfig) -> DictConfig:
    """Check ``cfg`` (a composed run config) as far as possible without data; returns it, with
    the K-FAC loss filled in. Raises :class:`ConfigError` in one line."""
    cfgmod.check_name(cfg.name)
    load_run_plugins(cfg)
    data_comp = get_component("dataset", cfg.data.name, "data.name")
    resolve_options(data_comp, cfgmod.to_dict(cfg.data.options), "data.options")
    model_comp = get_component("model", cfg.model.name, "model.name")
    model_opts = resolve_options(model_comp, cfgmod.to_dict(cfg.model.options), "model.options")
    derive_fisher_loss(cfg, model_comp, model_opts)
    resolved = _resolve_optimizer(cfgmod.to_dict(cfg.optimizer))
    big = torch.finfo(torch.float32).max
    for key in ("lr", "damping", "weight_decay"):
        value = resolved.get(key)
        if isinstance(value, (int, float)) and abs(value) > big:
            raise ConfigError(f"optimizer.{key} = {value!r} does not fit in float32 (the "
                              f"parameters' type; at most {big:.3g}); give a smaller value")
    return cfg


__all__ = ["preflight", "derive_fisher_loss", "load_run_plugins", "FISHER_KEYS"]
