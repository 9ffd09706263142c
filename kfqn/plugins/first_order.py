"""First-order rules beyond momentum (docs/algorithms.md §4 baselines ``adam`` and ``rmsprop``): fallbacks
that, in presets without preconditioned layers, train every parameter."""
from kfqn.core.hookspecs import hookimpl
from kfqn.updates.adam import AdamFallback
from kfqn.updates.rmsprop import RMSpropFallback


@hookimpl
def kfqn_fallbacks() -> list:
    return [AdamFallback, RMSpropFallback]
