"""Worker of tests/test_distributed.py: one rank of a gloo process group (CPU)."""
from __future__ import annotations

import copy
import os
import warnings
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

STEPS = 5
RESUME_AT = 3
BATCH = 24


def model() -> nn.Module:
    """Conv2d + Linear without BatchNorm (BatchNorm's batch statistics are per rank)."""
    torch.manual_seed(7)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Conv2d(3, 4, 3, stride=2),
                         nn.Tanh(), nn.Flatten(), nn.Linear(4 * 3 * 3, 6), nn.Tanh(),
                         nn.Linear(6, 3)).double()


def data():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(STEPS * BATCH, 2, 7, 7, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (STEPS * BATCH,), generator=g)
    return x, y


def spec(preset: str, placement: str = "replicated") -> dict:
    return {"preset": preset, "factor_dtype": "float64", "lr": 0.05, "placement": placement}


def train(net, opt, x, y, steps, start=0, rank=0, world=1, before=None, after=None):
    """``steps`` steps on batches start.., each rank on its slice of the global batch;
    ``before(k)`` / ``after()`` run in the closure before the forward / after the backward."""
    local = BATCH // world
    for k in range(start, start + steps):
        xb = x[k * BATCH:(k + 1) * BATCH][rank * local:(rank + 1) * local]
        yb = y[k * BATCH:(k + 1) * BATCH][rank * local:(rank + 1) * local]

        def closure():
            if before is not None:
                before(k)
            opt.zero_grad()
            loss = nn.functional.cross_entropy(net(xb), yb)
            loss.backward()
            if after is not None:
                after()
            return loss
        opt.step(closure)


def warm(opt, net, x, rank=0, world=1):
    if opt.needs_warm_start:
        local = BATCH // world
        with opt.warm_start():
            for k in range(2):
                net(x[k * BATCH:(k + 1) * BATCH][rank * local:(rank + 1) * local])


def flat(net) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in net.parameters()])


def _init(rank: int, world: int, folder: str) -> None:
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank,
                            world_size=world, timeout=timedelta(seconds=60))


def run(rank: int, world: int, folder: str, presets: list[str],
        placements: tuple[str, ...] = ("replicated", "owner")) -> None:
    import kfqn

    _init(rank, world, folder)
    try:
        x, y = data()
        out = {}
        for preset in presets:
            for placement in placements:
                net = model()
                ddp = nn.parallel.DistributedDataParallel(net)
                opt = kfqn.build_optimizer(ddp, spec(preset, placement))
                warm(opt, ddp, x, rank, world)
                train(ddp, opt, x, y, 1, 0, rank, world)
                calls = opt.comm.calls
                train(ddp, opt, x, y, RESUME_AT - 1, 1, rank, world)
                per_step = (opt.comm.calls - calls) / (RESUME_AT - 1)
                state = copy.deepcopy(opt.state_dict())  # as torch.save would keep it
                weights = {k: v.clone() for k, v in net.state_dict().items()}
                train(ddp, opt, x, y, STEPS - RESUME_AT, RESUME_AT, rank, world)
                # resume under N ranks (the other placement too): a fresh model and optimizer
                other = placements[(placements.index(placement) + 1) % len(placements)]
                resumed = {}
                for again in dict.fromkeys((placement, other)):
                    net2 = model()
                    net2.load_state_dict(weights)
                    ddp2 = nn.parallel.DistributedDataParallel(net2)
                    opt2 = kfqn.build_optimizer(ddp2, spec(preset, again))
                    opt2.load_state_dict(state)
                    train(ddp2, opt2, x, y, STEPS - RESUME_AT, RESUME_AT, rank, world)
                    resumed[again] = flat(net2)
                out[preset, placement] = {
                    "final": flat(net), "resumed": resumed, "state": state,
                    "weights": weights, "calls_per_step": per_step, "calls": opt.comm.calls,
                    "bytes": opt.comm.bytes, "state_bytes": opt.state_bytes(),
                    "owned": [n for n, l in opt.layers.items() if l.owned]}
        # the plain module and the process group (gradients averaged by the closure, no DDP)
        net = model()
        opt = kfqn.build_optimizer(net, spec("kbfgs"), comm=dist.group.WORLD)
        warm(opt, net, x, rank, world)

        def average_grads():
            for p in net.parameters():
                if p.grad is not None:   # None in the extra pass (parameters frozen)
                    dist.all_reduce(p.grad)
                    p.grad /= world
        train(net, opt, x, y, STEPS, 0, rank, world, after=average_grads)
        out["plain module + process group"] = flat(net)
        torch.save(out, os.path.join(folder, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_failing(rank: int, world: int, folder: str) -> None:
    """Rank 1's closure raises at step 2; the other ranks are then inside a collective."""
    import kfqn

    _init(rank, world, folder)
    try:
        x, y = data()
        net = model()
        ddp = nn.parallel.DistributedDataParallel(net)
        opt = kfqn.build_optimizer(ddp, spec("kbfgs", "owner"))

        def fail(k):
            if rank == 1 and k == 2:
                raise RuntimeError(f"data loader failed on rank {rank} at step {k}")
        train(ddp, opt, x, y, STEPS, 0, rank, world, before=fail)
        open(os.path.join(folder, f"finished{rank}"), "w").close()
    finally:
        dist.destroy_process_group()
