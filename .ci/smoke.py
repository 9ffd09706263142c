"""Smoke test of an installed kfqn (a wheel in a fresh environment), run from outside the
checkout by .ci/run: the package and its data come from site-packages, every registered preset
builds and takes steps on a tiny CNN, and the shipped experiment configs resolve by name."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

import kfqn
from kfqn.core.registry import default_registry
from kfqn.runner import config as C

checkout = Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else None
where = Path(kfqn.__file__).resolve()
assert "site-packages" in where.parts, f"kfqn imported from {where}, not from an installed wheel"
if checkout is not None:
    assert checkout not in where.parents, f"kfqn imported from the checkout: {where}"
assert Path(os.getcwd()).resolve() != checkout

for name in ("quickstart", "p2_autoencoders", "p1_cifar"):
    path = C.find_config(name)
    assert path.is_file() and "site-packages" in path.parts, path
    C.compose_run(C.base_config(path))

presets = default_registry().names("preset")
assert {"kbfgs", "kbfgs_l", "kfbfgs_cnn", "kfbfgs_l_cnn", "kfac", "adam"} <= set(presets), presets
torch.manual_seed(0)
x, y = torch.randn(16, 1, 6, 6), torch.randint(0, 3, (16,))
for preset in presets:
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(3 * 4 * 4, 3))
    opt = kfqn.build_optimizer(model, preset, lr=0.05)
    if getattr(opt, "needs_warm_start", False):
        with opt.warm_start():
            model(x)
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(3):
        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss

        loss = opt.step(closure)
        assert torch.isfinite(torch.as_tensor(loss)), (preset, loss)
    moved = any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert moved, f"{preset}: three steps left the parameters unchanged"
    assert all(torch.isfinite(p).all() for p in model.parameters()), preset
print(f"smoke: kfqn {kfqn.__version__} from {where.parent}; {len(presets)} presets build and "
      "step; shipped configs resolve")
