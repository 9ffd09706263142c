"""Forward/backward hooks that record what a layer's curvature estimators need.

One :class:`CaptureHooks` per preconditioned module. The optimizer sets ``phase``:

* ``"current"`` (default): forward+backward at theta; records the input (a reference, no copy),
  the mean pre-activation and the mean per-sample pre-activation gradient;
* ``"trial"``: the same at the trial point theta+ (docs/algorithms.md §3, ``extra_pass``);
* ``"warm"``: forward-only warm start; the input is handed to ``on_warm`` and not kept;
* ``None``: hooks do nothing.

With ``keep_output`` the capture also keeps a reference to the module's output h (still attached
to the graph), so that the optimizer can run an extra backward to h, e.g. K-FAC's sampled-label
backward (docs/algorithms.md §4); its results go to ``Capture.sampled_grad_out``. While ``muted`` is set, the
gradient hook ignores gradients (such auxiliary backward passes must not overwrite ``g_mean``).

Nothing here synchronises with the device: means are computed as tensors.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from kfqn.layers.base import LayerAdapter


@dataclass
class Capture:
    """What one forward (+ backward) of one module left behind."""

    inp: Tensor | None = None
    h_mean: Tensor | None = None
    g_mean: Tensor | None = None
    grad_out: Tensor | None = None
    out: Tensor | None = None
    sampled_grad_out: Tensor | None = None
    batch: int = 0
    positions: int = 1
    calls: int = 0

    @property
    def complete(self) -> bool:
        """Forward and backward both seen."""
        return self.inp is not None and self.g_mean is not None


class CaptureHooks:
    """Registers the hooks on ``module`` and keeps one :class:`Capture` per phase."""

    def __init__(self, module: nn.Module, adapter: LayerAdapter, keep_grad_output: bool = False,
                 keep_output: bool = False):
        self.module = module
        self.adapter = adapter
        self.keep_grad_output = keep_grad_output
        self.keep_output = keep_output
        self.muted = False
        #: make the output a gradient leaf when nothing upstream requires grad (the optimizer's
        #: trial pass freezes the parameters: it needs dL/dh, not weight gradients)
        self.force_grad = False
        self.phase: str | None = "current"
        self.slots: dict[str, Capture] = {"current": Capture(), "trial": Capture()}
        self.on_warm: Callable[[Tensor], None] | None = None
        # under torch.compile the hook runs eagerly, between compiled graphs: traced, its side
        # effects (the statistics kept here) were replayed wrongly by the compiler
        self._handle = module.register_forward_hook(torch.compiler.disable(self._forward))

    def remove(self) -> None:
        self._handle.remove()

    def reset(self, phase: str) -> None:
        self._release(self.slots[phase])
        self.slots[phase] = Capture()

    @staticmethod
    def _release(cap: Capture) -> None:
        """Drop the capture's tensor references. The gradient hook on a kept output h refers to
        its capture, and the capture to h: a cycle through autograd's C++ graph that Python's
        garbage collector cannot see, which kept every step's h and its graph alive."""
        cap.inp = cap.out = cap.grad_out = cap.sampled_grad_out = None

    def _forward(self, module: nn.Module, inputs: tuple, output: Tensor) -> None:
        phase = self.phase
        if phase is None:
            return
        inp = inputs[0]
        if phase == "warm":
            if self.on_warm is not None:
                self.on_warm(inp.detach())
            return
        if not torch.is_grad_enabled() or not isinstance(output, Tensor):
            return
        if not output.requires_grad:
            if not (self.force_grad and output.grad_fn is None and output.is_floating_point()):
                return
            output.requires_grad_()
        with torch.no_grad():  # the means need no graph: no detach() ops (issue 11's op budget)
            h_mean = self.adapter.output_mean(output)
        cap = Capture(
            # kept as given (no detach op): every reader works under no_grad; the reference is
            # dropped when the step ends (reset)
            inp=inp,
            h_mean=h_mean,
            batch=inp.shape[0],
            positions=self.adapter.positions(inp),
            calls=self.slots[phase].calls + 1,
            out=output if self.keep_output else None,
        )
        self.slots[phase].out = None  # the replaced capture's half of the cycle (see _release)
        self.slots[phase] = cap
        adapter, keep = self.adapter, self.keep_grad_output

        def _grad_hook(grad: Tensor) -> None:
            if self.muted:
                return
            with torch.no_grad():
                cap.g_mean = adapter.grad_output_mean(grad)
            if keep:
                cap.grad_out = grad.detach()

        output.register_hook(_grad_hook)
