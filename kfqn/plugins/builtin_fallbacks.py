"""Built-in first-order fallback rules (momentum, Adam, RMSprop)."""
from kfqn.core.hookspecs import hookimpl
from kfqn.updates.adam import AdamFallback
from kfqn.updates.first_order import MomentumFallback
from kfqn.updates.rmsprop import RMSpropFallback


@hookimpl
def kfqn_fallbacks() -> list:
    return [MomentumFallback, AdamFallback, RMSpropFallback]
