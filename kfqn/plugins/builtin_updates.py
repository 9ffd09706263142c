"""Built-in factor update rules and damping rules."""
from kfqn.core.hookspecs import hookimpl
from kfqn.updates.bfgs import BFGSFactor
from kfqn.updates.damping import DDV2Damping, DoubleDamping, NoDamping, PowellDamping
from kfqn.updates.identity import IdentityFactor
from kfqn.updates.lbfgs import LBFGSFactor


@hookimpl
def kfqn_factor_updates() -> list:
    return [BFGSFactor, LBFGSFactor, IdentityFactor]


@hookimpl
def kfqn_dampings() -> list:
    return [NoDamping, PowellDamping, DoubleDamping, DDV2Damping]
