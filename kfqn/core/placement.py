"""Where each layer's factor work runs under data parallelism (config key ``placement``;
docs/algorithms.md §8).

* ``replicated`` (default): every rank keeps every layer's factors and repeats their updates and
  inversions on the same averaged statistics; the ranks stay identical without further
  communication.
* ``owner``: each layer's preconditioner lives on one rank, its *owner*. Every rank still forms
  its share of the layer's batch statistics (the preconditioner's ``batch_means``, evaluated on a
  state-free copy on the ``meta`` device), all of them averaged in the one call of the pass; only
  the owner updates the factors, inverts them and forms the direction. The directions are then
  exchanged with one all-reduce of a flat buffer in which each rank wrote the layers it owns
  (zeros elsewhere: a sum adds nothing else), and every rank moves every parameter. Factor
  memory and factor work per rank fall to about 1/N of the replicated figure.

The assignment is size-balanced: layers in decreasing order of their factor size
(d_a^2 + d_g^2 numbers, the memory and, roughly, the work of their updates) each go to the
rank with the least assigned so far (lowest rank on a tie) -- the longest-processing-time rule,
within 4/3 of the best balance. It depends only on the layer shapes and N, so every rank
computes the same one and a checkpoint (which holds every layer, gathered from the owners) can
be loaded under any N and either placement.
"""
from __future__ import annotations

PLACEMENTS = ("replicated", "owner")


def factor_cost(d_a: int, d_g: int) -> int:
    """The size of a layer's two factors, in numbers: the balancing weight."""
    return d_a * d_a + d_g * d_g


def assign_owners(costs: dict[str, int], world_size: int) -> dict[str, int]:
    """layer name -> owning rank: largest cost first, each to the least-loaded rank."""
    load = [0] * world_size
    owner: dict[str, int] = {}
    position = {name: i for i, name in enumerate(costs)}
    for name in sorted(costs, key=lambda n: (-costs[n], position[n])):
        rank = min(range(world_size), key=lambda r: (load[r], r))
        owner[name] = rank
        load[rank] += costs[name]
    return {name: owner[name] for name in costs}
