"""Assembly: from a validated config and a model to a :class:`KFQNOptimizer`."""
from __future__ import annotations

from typing import Any, Iterable, Mapping

import torch
from torch import nn

from kfqn.core.config import resolve_config
from kfqn.core.registry import Registry, default_registry


class ComponentBuilder:
    """Instantiates registered components from validated config sections."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    @staticmethod
    def options(section: Mapping[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in section.items() if k != "name"}

    def factor(self, section: Mapping[str, Any], dim: int, dtype: torch.dtype,
               device: torch.device) -> Any:
        cls = self.registry.get("factor_update", section["name"])
        return cls(dim, dtype, device, **self.options(section))

    def component(self, kind: str, section: Mapping[str, Any]) -> Any:
        cls = self.registry.get(kind, section["name"])
        return cls(**self.options(section))

    def preconditioner(self, config: Mapping[str, Any], ctx: Any) -> Any:
        """The layer preconditioner the config's ``preconditioner`` section names."""
        section = config["preconditioner"]
        cls = self.registry.get("preconditioner", section["name"])
        return cls(ctx, self.options(section), config)

    def estimator(self, kind: str, section: Mapping[str, Any], ctx: Any) -> Any:
        cls = self.registry.get(kind, section["name"])
        return cls(ctx, self.options(section))


def build_optimizer(model: nn.Module, spec: Any = "kbfgs", *,
                    param_groups: Iterable[dict] | None = None,
                    dotlist: Iterable[str] | None = None,
                    registry: Registry | None = None,
                    comm: Any = None,
                    loss: Any = None,
                    **overrides: Any):
    """Build a kfqn optimizer for ``model``.

    ``spec``: a preset name (``kfqn.components('preset')``), a YAML path, or a mapping (which may
    start from a preset with ``preset: NAME``). ``overrides``: top-level keys such as
    ``lr=0.3`` or nested mappings such as ``g_side={'damping': 'ddv2'}``; ``dotlist``:
    command-line style ``['g_side.update=lbfgs']``. ``param_groups``: optional torch-style
    groups (each module's weight and bias must share a group); default: every trainable
    parameter of ``model`` in one group.

    ``loss``: the training loss, given once (:class:`kfqn.OutputLoss`, a name such as
    ``"cross_entropy"``, or ``{"kind": "mse", "mse_scale": 0.5}``): a Fisher that needs a loss
    (K-FAC's sampled or exact Fisher) takes it, and ``opt.closure(x, y)`` computes it; a config
    that names another loss is a :class:`~kfqn.ConfigError`.

    Data-parallel training: pass the ``DistributedDataParallel``-wrapped model (statistics are
    then averaged over its process group, so every rank holds the same factors), or the plain
    module and ``comm=group`` (a ``torch.distributed`` process group, or a
    :class:`kfqn.core.communicator.Communicator`) when the gradients are averaged some other
    way. ``placement="owner"`` keeps each layer's factors on one rank (README, Data-parallel
    training).
    """
    from kfqn.core.optimizer import KFQNOptimizer

    reg = registry or default_registry()
    cfg = resolve_config(spec, reg, overrides, dotlist)
    out_loss = None
    if loss is not None:
        from kfqn.curvature.output_losses import OutputLoss

        out_loss = OutputLoss.of(loss)
        cfg = _with_loss(cfg, out_loss, spec, overrides, dotlist, reg)
    return KFQNOptimizer(model, cfg, registry=reg, param_groups=param_groups, comm=comm,
                         loss=out_loss)


def _with_loss(cfg: dict, loss: Any, spec: Any, overrides: Mapping[str, Any] | None,
               dotlist: Iterable[str] | None, reg: Registry) -> dict:
    """``cfg`` with the loss options of the section whose Fisher needs a loss set from
    ``loss``; an option the caller set explicitly to another value is an error."""
    from kfqn.core.config import dotlist_to_mapping, to_plain, validate
    from kfqn.core.errors import ConfigError

    section = next((k for k in ("preconditioner", "g_side")
                    if isinstance(cfg.get(k), dict) and "loss" in cfg[k]), None)
    if section is None:
        return cfg
    given: dict = {}
    for source in (spec if isinstance(spec, Mapping) else {}, overrides or {},
                   dotlist_to_mapping(list(dotlist)) if dotlist else {}):
        sec = to_plain(source).get(section) if isinstance(source, Mapping) else None
        if isinstance(sec, Mapping):
            given.update(sec)
    want = loss.options()
    for key, value in want.items():
        if key in given and given[key] != value:
            raise ConfigError(f"{section}.{key} = {given[key]!r} but the loss given to "
                              f"build_optimizer has {key} = {value!r}; give the loss once")
    if cfg[section].get("fisher") == "empirical":
        return cfg
    out = dict(cfg)
    out[section] = {**cfg[section], **want}
    return validate(out, reg)
