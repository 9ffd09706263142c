"""Further inversion strategies: ``cholesky_lazy`` (retries only on failure, one host read)."""
from kfqn.core.hookspecs import hookimpl
from kfqn.inversion.cholesky import LazyCholeskyInversion


@hookimpl
def kfqn_inversions() -> list:
    return [LazyCholeskyInversion]
