"""Factor memory per rank under ``placement: owner`` (issue 13), measured in one process.

For each preset and N, the optimizer is built N times, once as each rank r of N (a stand-in
communicator that only tells the rank; nothing is reduced), and takes two steps on the same
random batch, so that lazily allocated factors (K-FAC, Shampoo) exist. The figure is the largest
rank's preconditioner state (``LayerPreconditioner.state_bytes`` of the layers it owns) over
the replicated state of one rank (every layer). With size-balanced owners it is at least
max(1/N, the largest layer's share): a layer is never split.

    python benchmarks/owner_memory.py                  # the 8-layer MNIST autoencoder
    python benchmarks/owner_memory.py --ranks 2 4 8 --presets kbfgs kfac
"""
from __future__ import annotations

import argparse
import warnings

import torch
from torch import nn

import kfqn
from kfqn.core.communicator import Communicator


class RankView(Communicator):
    """Rank ``rank`` of ``world_size``, without a process group (construction and local steps)."""

    def __init__(self, rank: int, world_size: int) -> None:
        self.rank, self.world_size = rank, world_size


def autoencoder() -> nn.Module:
    torch.manual_seed(0)
    dims = [784, 1000, 500, 250, 30, 250, 500, 1000, 784]
    layers: list[nn.Module] = []
    for a, b in zip(dims, dims[1:]):
        layers += [nn.Linear(a, b), nn.Sigmoid()]
    return nn.Sequential(*layers[:-1])


def factor_bytes(preset: str, comm: Communicator | None, x: torch.Tensor) -> tuple[int, int]:
    """(bytes this rank holds, bytes of the largest layer) after two steps."""
    net = autoencoder()
    spec = {"preset": preset} if comm is None else {"preset": preset, "placement": "owner"}
    opt = kfqn.build_optimizer(net, spec, comm=comm)
    for _ in range(2):
        def closure():
            opt.zero_grad()
            loss = nn.functional.mse_loss(torch.sigmoid(net(x)), x)
            loss.backward()
            return loss
        opt.step(closure)
    sizes = {n: l.precond.state_bytes() for n, l in opt.layers.items() if l.owned}
    return sum(sizes.values()), max(sizes.values(), default=0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", nargs="+", default=["kbfgs", "kfbfgs_l_cnn", "kfac", "shampoo"])
    ap.add_argument("--ranks", nargs="+", type=int, default=[2, 4, 8])
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    x = torch.rand(args.batch, 784, generator=torch.Generator().manual_seed(1))
    head = " | ".join(f"{n} ranks: largest rank / replicated (bound)" for n in args.ranks)
    print(f"| preset | replicated factor MB per rank | {head} |")
    print("|---|---|" + "---|" * len(args.ranks))
    for preset in args.presets:
        full, largest = factor_bytes(preset, None, x)
        cells = []
        for n in args.ranks:
            worst = max(factor_bytes(preset, RankView(r, n), x)[0] for r in range(n))
            cells.append(f"{worst / full:.3f} ({max(1 / n, largest / full):.3f})")
        print(f"| {preset} | {full / 2**20:.1f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
