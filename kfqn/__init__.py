"""kfqn: Kronecker-factored quasi-Newton optimizers for PyTorch, assembled from plugins.

>>> import kfqn
>>> opt = kfqn.build_optimizer(model, "kbfgs", lr=0.3, damping=0.3)   # doctest: +SKIP
>>> opt.step(closure)                                                  # doctest: +SKIP
"""
from kfqn.core.assembly import build_optimizer
from kfqn.core.components import Component, Option, Preset, register
from kfqn.core.errors import ConfigError, KfqnError, RegistryError, UnsupportedModuleError
from kfqn.core.hookspecs import hookimpl, hookspec
from kfqn.core.optimizer import KFQNOptimizer
from kfqn.core.registry import (
    components,
    default_registry,
    format_components,
    register_plugin,
    unregister_plugin,
)
from kfqn.core.sections import Sub
from kfqn.curvature.output_losses import OutputLoss

__version__ = "0.2.0"

__all__ = [
    "build_optimizer", "KFQNOptimizer", "register", "register_plugin", "unregister_plugin",
    "components", "format_components", "default_registry", "hookimpl", "hookspec", "Component", "Option",
    "Preset", "Sub", "OutputLoss", "ConfigError", "KfqnError", "RegistryError",
    "UnsupportedModuleError",
]
