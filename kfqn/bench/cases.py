"""One method training its own copy of one model: build, warm start, step, measure state.

kfqn presets are built with :func:`kfqn.build_optimizer`; a first-order baseline without a
registered preset runs ``torch.optim`` behind :class:`FirstOrder`, which gives it the same
``step(closure)`` / ``last_phase_times`` / ``state_bytes()`` interface.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

from kfqn.bench.suite import MethodSpec, ModelSpec
from kfqn.core.errors import ConfigError


def _tensor_bytes(tensors: Iterable[Any]) -> int:
    seen: set[int] = set()
    total = 0
    for t in tensors:
        if isinstance(t, Tensor) and t.numel():
            key = t.untyped_storage().data_ptr()
            if key not in seen:
                seen.add(key)
                total += t.untyped_storage().nbytes()
    return total


class FirstOrder:
    """A torch optimizer behind the kfqn interface: ``step(closure)``, ``last_phase_times``
    (forward_backward and update) and ``state_bytes()``."""

    def __init__(self, opt: torch.optim.Optimizer) -> None:
        self.opt = opt
        self.last_phase_times: dict[str, float] = {}

    def step(self, closure: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        done: list[float] = []

        def timed() -> Any:
            loss = closure()
            done.append(time.perf_counter())
            return loss

        loss = self.opt.step(timed)
        t2 = time.perf_counter()
        t1 = done[0] if done else t0
        self.last_phase_times = {"forward_backward": t1 - t0, "update": t2 - t1, "total": t2 - t0}
        return loss

    def zero_grad(self) -> None:
        self.opt.zero_grad(set_to_none=True)

    def state_bytes(self) -> int:
        return _tensor_bytes(v for s in self.opt.state.values() for v in s.values())


def _model_component(name: str) -> Any:
    from kfqn.core.errors import RegistryError
    from kfqn.runner.registry import runner_registry

    try:
        cls = runner_registry().get("model", name)
    except RegistryError as exc:
        raise ConfigError(f"suite model: {exc}") from None
    return cls() if isinstance(cls, type) else cls


def _model_options(comp: Any, given: dict) -> dict:
    table = getattr(comp, "options", {}) or {}
    unknown = [k for k in given if k not in table]
    if unknown:
        raise ConfigError(f"model {comp.name!r} has no option {unknown[0]!r}; its options: "
                          + (", ".join(table) or "(none)"))
    return {k: opt.validate(k, given.get(k, opt.default)) for k, opt in table.items()}


class Case:
    """One method training its own copy of one model: build, warm start, step, measure."""

    def __init__(self, spec: ModelSpec, method: MethodSpec, suite: dict, device: torch.device,
                 seed: int) -> None:
        self.spec, self.method, self.device = spec, method, device
        self.comp = _model_component(spec.model)
        self.options = _model_options(self.comp, spec.options)
        torch.manual_seed(seed)
        self.model: nn.Module = self.comp.build(spec.input_shape, spec.num_classes,
                                                **self.options).to(device)
        self.opt: Any = None
        self.impl = ""
        self.warm_start_s = 0.0
        self.suite = suite
        self.steps_taken = 0

    def build_optimizer(self, batches: Sequence[tuple[Tensor, Tensor]]) -> None:
        """Build the optimizer; kfqn presets that want it get their forward-only warm start."""
        import kfqn
        from kfqn.core.registry import default_registry

        m = self.method
        presets = default_registry().names("preset")
        name = m.preset or (m.baseline if m.baseline in presets and not m.force_torch else None)
        if name is not None:
            self.opt = kfqn.build_optimizer(self.model, name, dotlist=list(m.dotlist))
            self.impl = "kfqn"
            if getattr(self.opt, "needs_warm_start", False):
                t0 = time.perf_counter()
                with self.opt.warm_start():
                    for x, _ in batches:
                        self.model(x)
                self.warm_start_s = time.perf_counter() - t0
            return
        cfg = dict(self.suite.get("baselines", {}).get(m.baseline) or {})
        cls_name = cfg.pop("class", None)
        if cls_name is None or not hasattr(torch.optim, cls_name):
            raise ConfigError(f"baseline {m.baseline!r} has no preset and no torch.optim class "
                              f"in the suite's baselines (got class={cls_name!r})")
        if "betas" in cfg:
            cfg["betas"] = tuple(cfg["betas"])
        self.opt = FirstOrder(getattr(torch.optim, cls_name)(self.model.parameters(), **cfg))
        self.impl = f"torch.optim.{cls_name}"

    def closure(self, x: Tensor, y: Tensor) -> Callable[[], Tensor]:
        def closure() -> Tensor:
            self.opt.zero_grad()
            loss = self.comp.loss(self.model(x), x, y, **self.options)
            loss.backward()
            return loss
        return closure

    def step(self, x: Tensor, y: Tensor) -> dict[str, float]:
        """One optimizer step on (x, y); the phase times it reported (seconds)."""
        self.opt.step(self.closure(x, y))
        self.steps_taken += 1
        return dict(getattr(self.opt, "last_phase_times", {}) or {})

    def count_step(self, x: Tensor, y: Tensor, sites: bool = False) -> Any:
        """One optimizer step on (x, y) under an op counter (:func:`kfqn.bench.ops.count_step`)."""
        from kfqn.bench.ops import count_step

        ops = count_step(self.opt, self.closure(x, y), sites)
        self.steps_taken += 1
        return ops

    def param_tensors(self) -> int:
        """Number of trainable parameter tensors."""
        return sum(1 for p in self.model.parameters() if p.requires_grad)

    def state_bytes(self) -> int:
        if hasattr(self.opt, "state_bytes"):
            return int(self.opt.state_bytes())
        return _tensor_bytes(v for s in self.opt.state.values() for v in s.values())

    def param_bytes(self) -> int:
        return _tensor_bytes(self.model.parameters())


def make_batches(spec: ModelSpec, device: torch.device, seed: int,
                 count: int = 2) -> list[tuple[Tensor, Tensor]]:
    """``count`` fixed-seed synthetic batches (see ``benchmarks/suite.yaml``)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        shape = (spec.batch, *spec.input_shape)
        if spec.num_classes:
            x = torch.randn(shape, generator=g)
            y = torch.randint(0, spec.num_classes, (spec.batch,), generator=g)
        else:
            x = torch.rand(shape, generator=g)
            y = torch.zeros(spec.batch, dtype=torch.long)
        out.append((x.to(device), y.to(device)))
    return out
