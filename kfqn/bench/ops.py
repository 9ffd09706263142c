"""Dispatched-op counts of one optimizer step (``kfqn bench --ops``).

Every call of ``__torch_dispatch__`` under a :class:`OpCounter` is one op: the aten operators
that reach the dispatcher after CompositeImplicit decompositions (``a @ b + c`` on matrices is
``aten.mm`` and ``aten.add``: 2 ops), plus the few non-aten operators that dispatch as well
(``profiler._record_function_enter_new`` of ``torch.optim``'s step). On a GPU each is (at least)
one kernel launch; on the CPU each pays the dispatcher's fixed cost, which dominates for small
layers.

One step ``opt.step(closure)`` is split into

* **closure ops**: what the closure's own forward and backward dispatched, counted while a
  closure call is running (the extra pass of a preset with a trial point calls it twice), minus
  the ops issued there by kfqn's own code (the capture hooks of the preconditioned layers, which
  run inside the model's forward and backward): those are the optimizer's;
* **optimizer ops** = step ops - closure ops: everything else, hooks included.

``closure_alone`` is the brief form of the same: the closure run by itself, capture hooks off,
under the same mode; ``closure_alone * closure_calls`` overestimates a trial-pass preset's closure
ops, because the optimizer freezes the parameters for the extra pass (no weight-gradient
products, see ``Optimizer._trial_pass``).

Which kfqn code issued an op is read from the Python stack (``sites``: the innermost kfqn
function; ``entries``: the function that ``Optimizer.step`` called, or the capture hook). This
walks the stack once per op; it is only done when asked (``--ops-verbose``) and inside closures.
"""
from __future__ import annotations

import statistics
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from types import CodeType, FrameType
from typing import Any, Callable, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_KFQN = str(Path(__file__).resolve().parents[1]) + "/"
#: kfqn code that is not the optimizer: the models and losses of the runner, the bench itself
_NOT_OPTIMIZER = tuple(_KFQN + d + "/" for d in ("runner", "bench", "testing"))
_STEP_FILE = _KFQN + "core/optimizer.py"


def _optimizer_file(filename: str) -> bool:
    """``filename`` is kfqn optimizer code (core, curvature, preconditioners, updates, layers,
    inversion, ...), not a model or the bench."""
    return filename.startswith(_KFQN) and not filename.startswith(_NOT_OPTIMIZER)


def _where(frame: FrameType) -> str:
    return f"{frame.f_code.co_filename[len(_KFQN):]}:{frame.f_code.co_name}"


class OpCounter(TorchDispatchMode):
    """Counts every ``__torch_dispatch__`` call; splits them into the closure's own ops and the
    rest when the closure is wrapped by :meth:`wrap`.

    ``sites=True`` also attributes every op outside the closure's own work to the kfqn function
    that issued it (``sites``, ``entries``); ``names`` always counts the ops by operator name.
    """

    def __init__(self, sites: bool = False) -> None:
        super().__init__()
        self.total = 0
        self.closure = 0
        self.closure_calls = 0
        self.names: Counter[str] = Counter()          # all ops by name
        self.closure_names: Counter[str] = Counter()  # the closure's own ops by name
        self.sites: Counter[str] = Counter()
        self.entries: Counter[str] = Counter()
        self.want_sites = sites
        self._depth = 0
        self._wrapper: CodeType | None = None

    @property
    def optimizer(self) -> int:
        return self.total - self.closure

    def optimizer_names(self) -> Counter[str]:
        return self.names - self.closure_names

    def wrap(self, closure: Callable[[], Any]) -> Callable[[], Any]:
        """``closure`` with its calls marked: ops dispatched while it runs are closure ops
        unless kfqn optimizer code (a capture hook) issued them."""
        def counted_closure() -> Any:
            self.closure_calls += 1
            self._depth += 1
            try:
                return closure()
            finally:
                self._depth -= 1

        self._wrapper = counted_closure.__code__
        return counted_closure

    def _kfqn_frames(self) -> list[FrameType]:
        """kfqn optimizer frames on the stack, innermost first, up to the wrapped closure."""
        out = []
        f: FrameType | None = sys._getframe(2)
        wrapper = self._wrapper
        while f is not None and f.f_code is not wrapper:
            if _optimizer_file(f.f_code.co_filename):
                out.append(f)
            f = f.f_back
        return out

    def __torch_dispatch__(self, func: Any, types: Any, args: Sequence = (),
                           kwargs: dict | None = None) -> Any:
        name = str(getattr(func, "overloadpacket", func))
        self.total += 1
        self.names[name] += 1
        if self._depth or self.want_sites:
            frames = self._kfqn_frames()
            if self._depth and not frames:
                self.closure += 1
                self.closure_names[name] += 1
            elif self.want_sites:
                self._attribute(frames)
        return func(*args, **(kwargs or {}))

    def _attribute(self, frames: list[FrameType]) -> None:
        if not frames:
            self.sites["(outside kfqn)"] += 1
            self.entries["(outside kfqn)"] += 1
            return
        self.sites[_where(frames[0])] += 1
        # the function Optimizer.step called (or the hook, inside a closure)
        entry = frames[-1]
        if entry.f_code.co_filename == _STEP_FILE and entry.f_code.co_name == "step" \
                and len(frames) > 1:
            entry = frames[-2]
        self.entries[_where(entry)] += 1


def count_call(fn: Callable[[], Any], sites: bool = False) -> OpCounter:
    """The ops ``fn()`` dispatches."""
    with OpCounter(sites) as counter:
        fn()
    return counter


@dataclass
class StepOps:
    """The op counts of one step."""

    total: int
    closure: int
    closure_calls: int
    names: Counter = field(default_factory=Counter)       # optimizer ops by operator
    sites: Counter = field(default_factory=Counter)       # optimizer ops by kfqn function
    entries: Counter = field(default_factory=Counter)     # optimizer ops by step phase

    @property
    def optimizer(self) -> int:
        return self.total - self.closure


def count_step(opt: Any, closure: Callable[[], Any], sites: bool = False) -> StepOps:
    """The ops of ``opt.step(closure)``, split into the closure's and the optimizer's."""
    counter = OpCounter(sites)
    wrapped = counter.wrap(closure)
    with counter:
        opt.step(wrapped)
    return StepOps(counter.total, counter.closure, counter.closure_calls,
                   counter.optimizer_names(), counter.sites, counter.entries)


def count_closure_alone(opt: Any, closure: Callable[[], Any]) -> int:
    """The ops of ``closure()`` run by itself, kfqn's capture hooks switched off."""
    hooks = [layer.hooks for layer in getattr(opt, "layers", {}).values()
             if getattr(layer, "hooks", None) is not None]
    phases = [h.phase for h in hooks]
    for h in hooks:
        h.phase = None
    try:
        with torch.enable_grad():
            return count_call(closure).total
    finally:
        for h, phase in zip(hooks, phases):
            h.phase = phase


def preconditioned_layers(opt: Any) -> int:
    """Number of layers with a preconditioner (``len(opt.layers)``; 0 for torch.optim)."""
    return len(getattr(opt, "layers", {}) or {})


def needs_trial(opt: Any) -> bool:
    """A preset whose preconditioner re-evaluates the closure at a trial point."""
    return any("trial" in getattr(layer.precond, "needs", ())
               for layer in (getattr(opt, "layers", {}) or {}).values())


#: the record fields of :meth:`OpsResult.record` (besides the ``ops_top_*`` lists)
OPS_FIELDS = ("ops_warm_steps", "ops_counted_steps", "ops_step", "ops_step_max", "ops_closure",
              "ops_closure_calls", "ops_closure_alone", "ops_optimizer", "ops_optimizer_max",
              "ops_layers", "ops_param_tensors", "ops_per_layer", "ops_per_layer_max",
              "ops_per_layer_alone_est", "ops_per_param_tensor", "ops_error")


@dataclass
class OpsResult:
    """Op counts of one case: ``steps`` counted steps after ``warm`` uncounted ones."""

    warm: int
    steps: list[StepOps]
    closure_alone: int
    layers: int
    param_tensors: int
    needs_trial: bool
    error: str | None = None

    def median_step(self) -> StepOps:
        """The counted step whose total is the lower median (a real step, not an average)."""
        totals = [s.total for s in self.steps]
        return self.steps[totals.index(statistics.median_low(totals))]

    def max_step(self) -> StepOps:
        return max(self.steps, key=lambda s: s.optimizer)

    def record(self, top: int = 0) -> dict:
        """The ``ops_*`` fields of a bench record (all None but the error when it failed)."""
        if self.error is not None or not self.steps:
            return {k: None for k in OPS_FIELDS} | {"ops_error": self.error or "no steps counted"}
        rep, big = self.median_step(), self.max_step()
        calls = rep.closure_calls
        per = lambda n, d: None if not d else n / d  # noqa: E731
        rec: dict[str, Any] = {
            "ops_warm_steps": self.warm, "ops_counted_steps": len(self.steps),
            "ops_step": rep.total, "ops_step_max": max(s.total for s in self.steps),
            "ops_closure": rep.closure, "ops_closure_calls": calls,
            "ops_closure_alone": self.closure_alone,
            "ops_optimizer": rep.optimizer, "ops_optimizer_max": big.optimizer,
            "ops_layers": self.layers, "ops_param_tensors": self.param_tensors,
            "ops_per_layer": per(rep.optimizer, self.layers),
            "ops_per_layer_max": per(big.optimizer, self.layers),
            # the brief's estimate: closure alone times the closure calls of a step
            "ops_per_layer_alone_est": per(rep.total - self.closure_alone * calls, self.layers),
            "ops_per_param_tensor": per(rep.optimizer, self.param_tensors),
            "ops_error": self.error,
        }
        if top:
            rec["ops_top_names"] = rep.names.most_common(top)
            rec["ops_top_sites"] = rep.sites.most_common(top)
            rec["ops_top_entries"] = rep.entries.most_common(top)
        return rec
