"""Built-in inversion strategies."""
from kfqn.core.hookspecs import hookimpl
from kfqn.inversion.spd import CholeskyInversion, EighInversion


@hookimpl
def kfqn_inversions() -> list:
    return [CholeskyInversion, EighInversion]
