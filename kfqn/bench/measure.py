"""Timing and memory measurement: warm-up, round-robin timed rounds, allocation records."""
from __future__ import annotations

import contextlib
import gc
import math
import os
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from kfqn.bench.cases import Case, make_batches
from kfqn.bench.suite import MethodSpec, ModelSpec


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class AllocationMeter:
    """Net and peak growth of allocated memory over a block.

    CPU: a ``torch.profiler`` memory record (allocation events summed in time order).
    CUDA: ``memory_allocated`` / ``max_memory_allocated``. ``method`` says which, or why not.
    """

    def __init__(self, device: torch.device, enabled: bool = True) -> None:
        self.device, self.enabled = device, enabled
        self.net = self.peak = 0
        self.method = "off" if not enabled else (
            "cuda_max_memory_allocated" if device.type == "cuda" else "torch_profiler")
        self._prof: Any = None
        self._start = 0

    def __enter__(self) -> "AllocationMeter":
        if not self.enabled:
            return self
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            from torch.profiler import ProfilerActivity, profile

            self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            self._prof.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if not self.enabled:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.net = torch.cuda.memory_allocated(self.device) - self._start
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._start
            return
        try:
            self._prof.__exit__(*exc)
            events = sorted((e.start_ns(), e.nbytes())
                            for e in self._prof.profiler.kineto_results.events()
                            if e.name() == "[memory]")
        except Exception as err:  # private profiler API: report, do not fail the bench
            self.method = f"unavailable ({type(err).__name__})"
            return
        total = peak = 0
        for _, nbytes in events:
            total += nbytes
            peak = max(peak, total)
        self.net, self.peak = total, peak


@contextlib.contextmanager
def _quiet_fd2() -> Any:
    """Silence C-level stderr (the profiler's start/stop and allocator notes) for a moment."""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


@dataclass
class Result:
    """Raw measurements of one case."""

    case: Case
    times: list[float] = field(default_factory=list)
    phases: list[dict[str, float]] = field(default_factory=list)
    first_step_s: float = math.nan
    resident_bytes: int | None = None
    transient_bytes: int | None = None
    memory_method: str = "off"
    error: str | None = None
    #: CUDA: None = not checked; "" = one step ran under torch.cuda.set_sync_debug_mode("error")
    #: without a host synchronisation; else where the first one happened
    host_sync: str | None = None
    #: dispatched-op counts (``--ops``, a :class:`kfqn.bench.ops.OpsResult`), None if not counted
    ops: Any = None


def _innermost_frame(exc: BaseException) -> str:
    """'file:line in function' of the deepest traceback frame inside kfqn (else the deepest)."""
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if "/kfqn/" in f.filename.replace("\\", "/")
            and "/kfqn/bench/" not in f.filename.replace("\\", "/")]
    f = (ours or frames)[-1]
    return f"{Path(f.filename).name}:{f.lineno} in {f.name}"


def check_host_sync(case: Case, x: Tensor, y: Tensor) -> str:
    """One step of ``case`` with CUDA's sync debug mode set to error: "" when it never read
    back from the device, else where the first synchronising call was made."""
    torch.cuda.synchronize()
    try:
        torch.cuda.set_sync_debug_mode("error")
        case.step(x, y)
        return ""
    except RuntimeError as exc:
        if "synchroniz" not in str(exc):
            raise
        return _innermost_frame(exc)
    finally:
        torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()


def _guard(result: Result, fn: Callable[[], Any]) -> None:
    """Run ``fn``; a failing method is recorded with its error and left out afterwards."""
    if result.error is not None:
        return
    try:
        fn()
    except Exception as exc:  # one broken preset must not sink the whole benchmark
        result.error = f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:300]


def bench_model(spec: ModelSpec, methods: Sequence[MethodSpec], suite: dict,
                device: torch.device, warmup: int, repeats: int, seed: int = 0,
                memory: bool = True, log: Callable[[str], None] = print, ops_steps: int = 0,
                ops_warm: int = 3, ops_sites: bool = False) -> list[Result]:
    """Build every method on ``spec``, warm up, time round-robin, then measure memory; with
    ``ops_steps`` > 0 count the dispatched ops of that many steps (:func:`measure_ops`)."""
    batches = make_batches(spec, device, seed)
    results: list[Result] = []
    for method in methods:  # build, warm start and first (cold) step, one method at a time
        case = Case(spec, method, suite, device, seed)
        res = Result(case)
        results.append(res)
        grads = case.param_bytes()
        meter = AllocationMeter(device, memory)

        def first() -> None:
            with _quiet_fd2() if memory else contextlib.nullcontext(), meter:
                case.build_optimizer(batches)
                _sync(device)
                t0 = time.perf_counter()
                case.step(*batches[0])
                _sync(device)
                res.first_step_s = time.perf_counter() - t0
            res.memory_method = meter.method
            if memory and not meter.method.startswith("unavailable"):
                res.resident_bytes = max(0, meter.net - grads)

        _guard(res, first)
        log(f"  {spec.key}/{method.label} [{device.type}]: first step "
            + (f"{res.first_step_s * 1e3:.0f} ms" if res.error is None else f"FAILED: {res.error}"))
    live = lambda: [r for r in results if r.error is None]  # noqa: E731
    for i in range(warmup):
        for r in live():
            _guard(r, lambda r=r: r.case.step(*batches[(i + 1) % len(batches)]))
    gc.collect()
    gc_was = gc.isenabled()
    gc.disable()
    try:
        for k in range(repeats):
            order = live()
            order = order[k % len(order):] + order[:k % len(order)] if order else order
            x, y = batches[k % len(batches)]
            for r in order:
                def timed(r: Result = r) -> None:
                    _sync(device)
                    t0 = time.perf_counter()
                    phases = r.case.step(x, y)
                    _sync(device)
                    r.times.append(time.perf_counter() - t0)
                    r.phases.append(phases)
                _guard(r, timed)
    finally:
        if gc_was:
            gc.enable()
    if device.type == "cuda":
        for r in live():
            def sync_check(r: Result = r) -> None:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # "sync debug mode is a prototype feature"
                    r.host_sync = check_host_sync(r.case, *batches[0])
            _guard(r, sync_check)
    if memory:
        for r in live():
            meter = AllocationMeter(device)

            def transient(r: Result = r, meter: AllocationMeter = meter) -> None:
                with _quiet_fd2(), meter:
                    r.case.step(*batches[0])
                r.transient_bytes = max(0, meter.peak)

            _guard(r, transient)
    if ops_steps > 0:
        for r in live():
            measure_ops(r, batches, ops_warm, ops_steps, ops_sites)
            o = r.ops
            log(f"  {spec.key}/{r.case.method.label} [{device.type}]: "
                + (f"ops FAILED: {o.error}" if o.error else
                   f"{o.median_step().total} ops/step, {o.median_step().optimizer} optimizer ops"))
    return results


def measure_ops(result: Result, batches: Sequence[tuple[Tensor, Tensor]], warm: int = 3,
                steps: int = 20, sites: bool = False) -> None:
    """Dispatched-op counts of ``result``'s case into ``result.ops``: uncounted steps until the
    case has taken ``warm`` (the first steps do one-off work: warm starts, first inversions),
    then ``steps`` counted ones (inversion cadences show in their maximum), then the closure
    alone. A failure is kept in ``result.ops.error`` and does not touch the timing record."""
    from kfqn.bench.ops import (OpsResult, count_closure_alone, needs_trial,
                                preconditioned_layers)

    case = result.case
    out = OpsResult(warm, [], 0, preconditioned_layers(case.opt), case.param_tensors(),
                    needs_trial(case.opt))
    result.ops = out
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            k = 0
            while case.steps_taken < warm:
                case.step(*batches[k % len(batches)])
                k += 1
            out.warm = case.steps_taken   # steps taken before the first counted one
            for i in range(steps):
                out.steps.append(case.count_step(*batches[i % len(batches)], sites=sites))
            out.closure_alone = count_closure_alone(case.opt, case.closure(*batches[0]))
    except Exception as exc:  # one broken preset must not sink the whole benchmark
        out.error = f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:300]
