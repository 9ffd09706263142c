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
                    **overrides: Any):
    """Build a kfqn optimizer for ``model``.

    ``spec``: a preset name (``kfqn.components('preset')``), a YAML path, or a mapping (which may
    start from a preset with ``preset: NAME``). ``overrides``: top-level keys such as
    ``lr=0.3`` or nested mappings such as ``g_side={'damping': 'ddv2'}``; ``dotlist``:
    command-line style ``['g_side.update=lbfgs']``. ``param_groups``: optional torch-style
    groups (each module's weight and bias must share a group); default: every trainable
    parameter of ``model`` in one group.

    Data-parallel training: pass the ``DistributedDataParallel``-wrapped model (statistics are
    then averaged over its process group, so every rank holds the same factors), or the plain
    module and ``comm=kfqn.core.communicator.TorchDistributed(group)`` when the gradients are
    averaged some other way.
    """
    from kfqn.core.optimizer import KFQNOptimizer

    reg = registry or default_registry()
    cfg = resolve_config(spec, reg, overrides, dotlist)
    return KFQNOptimizer(model, cfg, registry=reg, param_groups=param_groups, comm=comm)
