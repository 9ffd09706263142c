"""Built-in first-order fallback rules."""
from kfqn.core.hookspecs import hookimpl
from kfqn.updates.first_order import MomentumFallback


@hookimpl
def kfqn_fallbacks() -> list:
    return [MomentumFallback]
