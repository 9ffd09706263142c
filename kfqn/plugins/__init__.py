"""Where the built-in components come from.

Every component is registered next to its definition (:func:`kfqn.register`); the built-ins
are the classes registered in the modules of the component packages below, found by walking
them, so a new built-in is one new file. Presets are the YAML files of the package folder
``kfqn/presets`` (:mod:`kfqn.plugins.builtin_presets`).
"""
from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType

#: packages whose modules define the built-in components
COMPONENT_PACKAGES = ("kfqn.layers", "kfqn.preconditioners", "kfqn.curvature", "kfqn.updates",
                      "kfqn.inversion")
#: modules that offer components through hooks rather than registered classes
HOOK_MODULES = ("kfqn.plugins.builtin_fallbacks", "kfqn.plugins.builtin_presets")


def builtin_modules() -> list[ModuleType]:
    """Every module of :data:`COMPONENT_PACKAGES` (sorted by name), then :data:`HOOK_MODULES`."""
    modules = []
    for package in COMPONENT_PACKAGES:
        pkg = importlib.import_module(package)
        modules.append(pkg)
        for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
            modules.append(importlib.import_module(f"{package}.{info.name}"))
    return modules + [importlib.import_module(m) for m in HOOK_MODULES]
