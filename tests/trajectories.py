"""Each preset's 20-step trajectory on one fixed model: recorded before the preconditioner
redesign (tests/data/trajectories_before.pt, made at commit 8612757 with this file:
``git worktree add /tmp/before 8612757 && PYTHONPATH=/tmp/before python tests/trajectories.py``)
and compared bit for bit by tests/test_trajectories.py."""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
RECORD = HERE / "data" / "trajectories_before.pt"
STEPS = 20


def fixed_model() -> nn.Module:
    """Conv2d + BatchNorm + Conv2d + Linear (float64): every adapter and a fallback parameter."""
    torch.manual_seed(3)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Tanh(),
                         nn.Conv2d(4, 3, 3, stride=2), nn.Tanh(), nn.Flatten(),
                         nn.Linear(3 * 3 * 3, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def fixed_data(n: int = 48):
    g = torch.Generator().manual_seed(11)
    x = torch.randn(n, 2, 7, 7, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    return x, y


def trajectory(preset: str) -> list[torch.Tensor]:
    """The flat parameter vector after each of STEPS steps (batches of 16, warm start first),
    on one thread (BLAS sums in another order with more threads)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _trajectory(preset)
    finally:
        torch.set_num_threads(threads)


def _trajectory(preset: str) -> list[torch.Tensor]:
    import warnings

    import kfqn

    model = fixed_model()
    x, y = fixed_data()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = kfqn.build_optimizer(model, preset, factor_dtype="float64", lr=0.05)
    if opt.needs_warm_start:
        with opt.warm_start():
            for i in range(0, x.shape[0], 16):
                model(x[i:i + 16])
    out = []
    torch.manual_seed(5)
    for step in range(STEPS):
        s = (step * 16) % x.shape[0]
        xb, yb = x[s:s + 16], y[s:s + 16]

        def closure():
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(xb), yb)
            loss.backward()
            return loss
        opt.step(closure)
        out.append(torch.cat([p.detach().flatten() for p in model.parameters()]).clone())
    return out


def record(presets: list[str]) -> dict[str, list[torch.Tensor]]:
    return {p: trajectory(p) for p in presets}


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    from helpers import all_presets

    RECORD.parent.mkdir(exist_ok=True)
    torch.save(record(all_presets()), RECORD)
    print(f"wrote {RECORD}")
