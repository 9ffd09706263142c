"""First-order rule for parameters outside preconditioned layers (docs/algorithms.md §3).

``momentum``: the same momentum direction, momentum form, weight decay and learning rate as the
preconditioned layers, without preconditioning. Non-finite steps leave parameters and buffers
unchanged (selected on the device).

Speed (shared by every fallback rule, see :class:`Fallback`): parameters that torch's fused
optimizer kernels take (float32/float64, dense and contiguous, ``torch._fused_adam_``,
``_fused_adamw_`` and ``_fused_sgd_`` on this device) are updated by those kernels, one pass over
each tensor in place and no temporaries, as in ``torch.optim.Adam(fused=True)``. Skipping a step
stays on the device and branch-free:

* the kernels' own ``found_inf`` flag leaves a skipped parameter and its state bit for bit
  untouched; ``ok`` false skips every parameter. The flag holds for a whole call, so each
  parameter has its own call (on CUDA one launch per parameter, which costs more than
  torch.optim's few multi-tensor launches for many small parameters);
* whether a parameter's step could be non-finite is decided *before* it is taken, from the
  2-norms of gradient and parameter (one ``torch._foreach_norm`` over both) and bounds of the
  state's 2-norms that the rule carries along (:meth:`Fallback.track`: the triangle inequality
  after a fused step, exact norms after anything else). A 2-norm bounds every |element|, so
  bounds of every new state element and direction element below ``finfo(dtype).max / 16``
  prove them finite, and the step is taken whole (the carried bounds' own rounding, a factor
  of about 1 + 4 eps / (1 - beta), stays far inside that 16). Beyond that (in float32, gradient
  norms around 1e18 and more) the parameter's step and state update are skipped, also where
  the exact path might still have found a finite direction: conservative. The bounds are loose
  on purpose: a few vector operations per step, whatever the number of parameters. State
  changed in place from outside (through ``state_dict()``'s tensors) is not seen by the carried
  bounds; load it with ``load_state_dict``.

Everything else (other dtypes or layouts, an eps too small for the bound, centred RMSprop,
momentum 0, a torch without the kernels) takes the exact path: the new state and the direction
are computed out of place, and a direction with a non-finite element skips that parameter.
``Fallback.fast_path = False`` forces the exact path (the tests compare both).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from kfqn.core.components import Component
from kfqn.core.momentum import initial_started, momentum_update

Entry = tuple[str, nn.Parameter, dict]

#: dtypes of the fused path (its overflow bound is written for IEEE single and double)
FAST_DTYPES = (torch.float32, torch.float64)
#: an eps below this takes the exact path: the bound |direction| <= |numerator| / eps would skip
#: steps with large but harmless gradients
MIN_FAST_EPS = 1.0e-16


def limit(dtype: torch.dtype) -> float:
    """Largest bound of a state or direction element that the fused path accepts."""
    return torch.finfo(dtype).max / 16


def fast_layout(p: Tensor, g: Tensor, state: Sequence[Tensor]) -> bool:
    """Whether parameter, gradient and state (made by the rule: same dtype and device as ``p``)
    are laid out as the fused kernels read them."""
    return (p.dtype in FAST_DTYPES and g.dtype == p.dtype and g.layout == torch.strided
            and g.device == p.device and p.is_contiguous() and g.is_contiguous()
            and all(s.is_contiguous() for s in state))


@functools.lru_cache(maxsize=None)
def fused_kernels(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether this torch has the fused Adam, AdamW and SGD kernels (with ``found_inf``) and
    ``_foreach_norm`` for ``dtype`` on ``device`` (CPU: torch >= 2.4). Probed once, on
    one-element tensors, with the skip flag set."""
    try:
        x = [torch.zeros(1, dtype=dtype, device=device) for _ in range(4)]
        step = torch.ones((), dtype=torch.float32, device=device)
        skip = torch.ones((), dtype=torch.float32, device=device)
        for kernel in (torch._fused_adam_, torch._fused_adamw_):
            kernel([x[0]], [x[1]], [x[2]], [x[3]], [], [step], lr=0.1, beta1=0.9, beta2=0.9,
                   weight_decay=0.1, eps=1e-8, amsgrad=False, maximize=False, grad_scale=None,
                   found_inf=skip)
        for first in (True, False):
            torch._fused_sgd_([x[0]], [x[1]], [x[2]], weight_decay=0.1, momentum=0.9, lr=0.1,
                              dampening=0.0, nesterov=False, maximize=False,
                              is_first_step=first, grad_scale=None, found_inf=skip)
        torch._fused_sgd_([x[0]], [x[1]], [], weight_decay=0.1, momentum=0.0, lr=0.1,
                          dampening=0.0, nesterov=False, maximize=False, is_first_step=False,
                          grad_scale=None, found_inf=skip)
        torch._foreach_norm(x, 2)
    except (AttributeError, RuntimeError, TypeError, NotImplementedError, ValueError):
        return False
    return True


def kernel_steps(t: Tensor, bias_correction: bool) -> list[Tensor]:
    """The fused kernels' per-parameter step counts for the accepted-step counts ``t`` (a long
    vector): t + 1 as float32 with bias correction, else :func:`no_bias_correction_step`."""
    if bias_correction:
        return list((t + 1).to(torch.float32).unbind(0))
    return [no_bias_correction_step(t.device)] * t.numel()


@functools.lru_cache(maxsize=None)
def no_bias_correction_step(device: torch.device) -> Tensor:
    """A step count for the fused kernels at which beta^t = 0 for every beta < 1: their bias
    corrections 1 - beta^t are then 1 (off)."""
    return torch.full((), 1.0e30, dtype=torch.float32, device=device)


def norms(*lists: Sequence[Tensor]) -> list[Tensor]:
    """For each list, the 2-norms of its tensors as one vector (one ``_foreach_norm`` call for
    all lists). A 2-norm bounds every |element|; it is inf or NaN where an element is (or where
    the squares overflow, which the bounds then treat as too large)."""
    flat = [t for ts in lists for t in ts]
    return list(torch.stack(torch._foreach_norm(flat, 2)).split([len(ts) for ts in lists]))


def admissible(ok: Tensor, bounds: Sequence[Tensor], dtype: torch.dtype) -> Tensor:
    """Per parameter: ``ok`` and every bound at most :func:`limit` (inf and NaN fail)."""
    worst = torch.stack(bounds).amax(0)
    return (worst <= limit(dtype)) & ok.to(worst.device)


def skip_flags(run: Tensor) -> tuple[Tensor, ...]:
    """One 0-dim float32 ``found_inf`` per parameter: 1 where a kernel leaves it untouched."""
    return torch.where(run, 0.0, 1.0).to(torch.float32).unbind(0)


class Fallback(Component):
    """Base: updates a list of (name, parameter, param_group) entries."""

    #: take the fused kernels where they apply (False: the exact path for every parameter)
    fast_path = True

    def __init__(self, entries: list[tuple[str, nn.Parameter, dict]], config: Mapping[str, Any],
                 options: Mapping[str, Any]) -> None:
        self.entries = entries
        self.config = config
        self.opts = dict(options)

    def split(self, rule_fits: Callable[[dict], bool], state: Callable[[str], Sequence[Tensor]]
              ) -> tuple[list[list[Entry]], list[Entry]]:
        """Entries with a gradient: buckets for the fused path (one per param group, device and
        dtype) and the rest, for the exact path. ``rule_fits(group)``: the rule's settings for
        that group fit the fused path; ``state(name)``: the parameter's state tensors."""
        buckets: dict[tuple, list[Entry]] = {}
        exact: list[Entry] = []
        fits: dict[int, bool] = {}
        for entry in self.entries:
            name, p, group = entry
            g = p.grad
            if g is None:
                continue
            key = id(group)
            if key not in fits:
                fits[key] = self.fast_path and rule_fits(group)
            if (fits[key] and fast_layout(p, g, state(name))
                    and fused_kernels(p.device, p.dtype)):
                buckets.setdefault((key, p.device, p.dtype), []).append(entry)
            else:
                exact.append(entry)
        return list(buckets.values()), exact

    def track(self, state: Mapping[str, dict[str, Tensor]]) -> None:
        """Carry a bound of the 2-norm of each of these state tensors (kind -> name -> tensor:
        the rule's own dicts, which it keeps updating)."""
        self.tracked = dict(state)
        self.bounds: dict[str, dict[str, Tensor]] = {kind: {} for kind in self.tracked}

    def forget_bounds(self, names: Sequence[str]) -> None:
        """These parameters' state changed outside the fused path (exact path, checkpoint): their
        bounds are recomputed, as exact norms, when next needed."""
        for bounds in self.bounds.values():
            for name in names:
                bounds.pop(name, None)

    def state_bounds(self, kind: str, names: Sequence[str]) -> Tensor:
        """The carried bounds of the 2-norms of one kind of state, as a vector."""
        bounds, tensors = self.bounds[kind], self.tracked[kind]
        return torch.stack([bounds[n] if n in bounds else torch.linalg.vector_norm(tensors[n])
                            for n in names])

    def keep_bounds(self, kind: str, names: Sequence[str], old: Tensor, new: Tensor,
                    run: Tensor) -> None:
        """After a fused step: ``new`` where it ran, ``old`` where it was skipped."""
        for name, bound in zip(names, torch.where(run, new, old).unbind(0)):
            self.bounds[kind][name] = bound

    @torch.no_grad()
    def step(self, ok: Tensor) -> None:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def load_state_dict(self, state: dict[str, Any]) -> None:
        raise NotImplementedError


class MomentumFallback(Fallback):
    name = "momentum"
    description = "plain momentum direction with the group's lr, momentum and weight decay"

    def __init__(self, entries, config, options) -> None:
        super().__init__(entries, config, options)
        self.buf: dict[str, Tensor] = {}
        self.started: dict[str, Tensor] = {}
        for name, p, _ in entries:
            self.buf[name] = torch.zeros_like(p)
            self.started[name] = initial_started(config, p.device)
        self.track({"buf": self.buf})

    @torch.no_grad()
    def step(self, ok: Tensor) -> None:
        buckets, exact = self.split(lambda group: 0.0 < float(group["momentum"]) < 1.0,
                                    lambda name: (self.buf[name],))
        for bucket in buckets:
            self._step_fused(bucket, ok)
        self._step_exact(exact, ok)

    def _step_fused(self, bucket: list[Entry], ok: Tensor) -> None:
        """``_fused_sgd_`` per parameter. 'torch' form: one call (a buffer that has not started
        is zero, so rho * 0 + g = g). 'ema' form: two, the first accepted step (buffer = g)
        and later ones; the skip flags let exactly one of them (or neither) run."""
        names, ps = [n for n, _, _ in bucket], [p for _, p, _ in bucket]
        group = bucket[0][2]
        rho, wd, lr = float(group["momentum"]), float(group["weight_decay"]), float(group["lr"])
        ema = self.config["momentum_form"] == "ema"
        coef = 1.0 - rho if ema else 1.0
        wd_in, wd_out = (wd, 0.0) if self.config["weight_decay_mode"] == "inside" else (0.0, wd)
        grads, bufs = [p.grad for p in ps], [self.buf[n] for n in names]
        g_n, p_n = norms(grads, ps if wd else [])
        b_n = self.state_bounds("buf", names)
        g_b = torch.add(g_n, p_n, alpha=wd_in) if wd_in else g_n   # |g + tau theta|
        b_b = torch.add(b_n * rho, g_b, alpha=max(coef, 1.0))     # |new buffer|, also a start
        d_b = torch.add(b_b, p_n, alpha=wd_out) if wd_out else b_b
        run = admissible(ok, [g_b, b_b, d_b], ps[0].dtype)
        self.keep_bounds("buf", names, b_n, b_b, run)
        started = torch.stack([self.started[n] for n in names])
        if wd_out:  # theta (1 - lr tau), then theta - lr buffer: theta + lr (-buffer - tau theta)
            keep = torch.where(run, 1.0 - lr * wd_out, 1.0).to(ps[0].dtype)
            torch._foreach_mul_(ps, list(keep.unbind(0)))
        if ema:
            calls = [(True, skip_flags(run & ~started)), (False, skip_flags(run & started))]
        else:
            calls = [(False, skip_flags(run))]
        for is_first, skips in calls:
            for p, g, buf, skip in zip(ps, grads, bufs, skips):
                torch._fused_sgd_([p], [g], [buf], weight_decay=wd_in, momentum=rho, lr=lr,
                                  dampening=1.0 - coef, nesterov=False, maximize=False,
                                  is_first_step=is_first, grad_scale=None, found_inf=skip)
        for n, s in zip(names, (started | run).unbind(0)):
            self.started[n] = s

    def _step_exact(self, entries: list[Entry], ok: Tensor) -> None:
        form = self.config["momentum_form"]
        inside = self.config["weight_decay_mode"] == "inside"
        for name, p, group in entries:
            wd = group["weight_decay"]
            grad = p.grad + wd * p if (inside and wd) else p.grad
            self.buf[name] = momentum_update(self.buf[name], grad, self.started[name],
                                             group["momentum"], form, ok)
            self.started[name] = self.started[name] | ok
            direction = -self.buf[name]
            if wd and not inside:
                direction = direction - wd * p
            good = ok & torch.isfinite(direction).all()
            p.add_(torch.where(good, direction, torch.zeros_like(direction)), alpha=group["lr"])
        self.forget_bounds([name for name, _, _ in entries])

    def state_dict(self) -> dict[str, Any]:
        return {"buf": dict(self.buf), "started": dict(self.started)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, _, _ in self.entries:
            if name not in state["buf"]:
                raise KeyError(name)
            self.buf[name] = state["buf"][name].to(self.buf[name]).clone()
            self.started[name] = state["started"][name].to(self.started[name].device).clone()
        self.forget_bounds([name for name, _, _ in self.entries])
