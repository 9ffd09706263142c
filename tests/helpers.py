"""Small models and problems shared by the optimizer tests."""
from __future__ import annotations

import warnings
from typing import Callable

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

QN_PRESETS = ["kbfgs", "kbfgs_l", "kfbfgs_cnn", "kfbfgs_l_cnn"]


def all_presets() -> list[str]:
    """Every registered preset, sorted."""
    import kfqn

    return sorted(name for kind, name, _ in kfqn.components() if kind == "preset")


def load_benchmark(name: str):
    """The script ``benchmarks/<name>.py`` as a module (the suite runs bounded versions of the
    benchmarks' stress figures)."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def small_cnn(seed: int = 1, dropout: float = 0.0) -> nn.Module:
    """Conv + BatchNorm + strided conv + Linear head on 3x8x8 inputs, 4 classes."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = [
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 6, 3, stride=2), nn.ReLU(), nn.Flatten(),
    ]
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(6 * 3 * 3, 4))
    return nn.Sequential(*layers)


def teacher_data(n: int = 256, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 8, 8, generator=g)
    w = torch.randn(3 * 8 * 8, 4, generator=g)
    return x, (x.flatten(1) @ w).argmax(1)


def make_closure(opt, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable:
    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss
    return closure


def batches(x: torch.Tensor, y: torch.Tensor, size: int):
    i = 0
    while True:
        s = (i * size) % x.shape[0]
        yield x[s:s + size], y[s:s + size]
        i += 1


def quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def tensor_paths(tree, prefix: str = ""):
    """(path "/a/0/b", tensor) for every tensor in a nested dict / list / tuple."""
    if isinstance(tree, torch.Tensor):
        yield prefix, tree
    elif isinstance(tree, dict):
        for k, v in tree.items():
            yield from tensor_paths(v, f"{prefix}/{k}")
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            yield from tensor_paths(v, f"{prefix}/{i}")


def tensors_of(tree):
    """Every tensor in a nested dict / list / tuple."""
    return [t for _, t in tensor_paths(tree)]


def flat_state(obj, prefix: str = "") -> dict:
    """Every tensor (cloned) and plain value of a nested state dict, by path ("/a/0/b")."""
    out = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(flat_state(v, f"{prefix}/{k}"))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out.update(flat_state(v, f"{prefix}/{i}"))
    elif isinstance(obj, torch.Tensor):
        out[prefix] = obj.detach().clone()
    else:
        out[prefix] = obj
    return out


def assert_resumes_exactly(opt, model, twin, build, data, steps: int = 3) -> None:
    """A fresh optimizer ``build(twin)`` loaded from ``opt``'s checkpoint (``twin`` a copy of
    ``model``'s weights) takes the same next ``steps`` steps on ``data``, bit for bit."""
    twin.load_state_dict(model.state_dict())
    opt2 = build(twin)
    opt2.load_state_dict(opt.state_dict())
    for _ in range(steps):
        xb, yb = next(data)
        opt.step(make_closure(opt, model, xb, yb))
        opt2.step(make_closure(opt2, twin, xb, yb))
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)



class OpCount(TorchDispatchMode):
    """Counts dispatched aten ops while active (``with OpCount() as c: ...; c.n``), as
    ``kfqn bench --ops`` does."""

    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))
