"""Each preset's 20-step trajectory on fixed models, recorded and compared by
tests/test_trajectories.py:

* ``RECORD`` (tests/data/trajectories_before.pt): the BatchNorm model, before the preconditioner
  redesign, made at commit 8612757 with this file
  (``git worktree add /tmp/before 8612757 && PYTHONPATH=/tmp/before python tests/trajectories.py``);
* ``RECORD_PLAIN`` (tests/data/trajectories_plain_75c2893.pt): the model without BatchNorm, at
  75c2893 (the redesign with per-layer products and BLAS dot products, before the layers' vectors
  were joined for the op budget): ``PYTHONPATH=/tmp/old python tests/trajectories.py plain``;
* ``RECORD_NOW`` (tests/data/trajectories_batched.pt): the BatchNorm model with the batched
  code (``python tests/trajectories.py now``), the bit-for-bit guard of later changes."""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
RECORD = HERE / "data" / "trajectories_before.pt"
RECORD_PLAIN = HERE / "data" / "trajectories_plain_75c2893.pt"
RECORD_NOW = HERE / "data" / "trajectories_batched.pt"
STEPS = 20


def fixed_model() -> nn.Module:
    """Conv2d + BatchNorm + Conv2d + Linear (float64): every adapter and a fallback parameter."""
    torch.manual_seed(3)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Tanh(),
                         nn.Conv2d(4, 3, 3, stride=2), nn.Tanh(), nn.Flatten(),
                         nn.Linear(3 * 3 * 3, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def plain_model() -> nn.Module:
    """The same layers without BatchNorm: in fixed_model the first convolution's mean output
    is normalised away, so its G-side pairs are rounding noise (s^T y about 1e-27) and the
    trajectory follows that noise; here every pair carries signal."""
    torch.manual_seed(3)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.Tanh(),
                         nn.Conv2d(4, 3, 3, stride=2), nn.Tanh(), nn.Flatten(),
                         nn.Linear(3 * 3 * 3, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def fixed_data(n: int = 48):
    g = torch.Generator().manual_seed(11)
    x = torch.randn(n, 2, 7, 7, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    return x, y


def trajectory(preset: str, plain: bool = False) -> list[torch.Tensor]:
    """The flat parameter vector after each of STEPS steps (batches of 16, warm start first),
    on one thread (BLAS sums in another order with more threads); ``plain``: on
    :func:`plain_model`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _trajectory(preset, plain)
    finally:
        torch.set_num_threads(threads)


def _trajectory(preset: str, plain: bool) -> list[torch.Tensor]:
    import warnings

    import kfqn

    model = plain_model() if plain else fixed_model()
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


def record(presets: list[str], plain: bool = False) -> dict[str, list[torch.Tensor]]:
    return {p: trajectory(p, plain) for p in presets}


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    from helpers import all_presets

    kind = sys.argv[1] if len(sys.argv) > 1 else "before"
    path = {"before": RECORD, "plain": RECORD_PLAIN, "now": RECORD_NOW}[kind]
    path.parent.mkdir(exist_ok=True)
    torch.save(record(all_presets(), plain=kind == "plain"), path)
    print(f"wrote {path}")
