"""Built-in components, registered through the same hooks a third-party plugin uses."""
from __future__ import annotations

from kfqn.plugins import (
    builtin_adapters,
    builtin_estimators,
    builtin_fallbacks,
    builtin_inversions,
    builtin_presets,
    builtin_updates,
    first_order,
    inversions_extra,
    kfac,
    runner_components,
    shampoo,
)

BUILTIN_PLUGINS = [
    builtin_adapters,
    builtin_updates,
    builtin_inversions,
    inversions_extra,
    builtin_estimators,
    builtin_fallbacks,
    kfac,
    shampoo,
    first_order,
    builtin_presets,
    runner_components,
]
