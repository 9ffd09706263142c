"""First-order rules for parameters outside preconditioned layers (docs/algorithms.md §3).

``momentum`` (here), ``adam`` and ``rmsprop``: each holds the parameters given to it as
(name, parameter, param_group) entries and takes the param group's lr, momentum and
weight_decay at every step (LR schedulers act on the kfqn optimizer's param groups).

The step goes through ``torch.optim``: ``momentum`` is ``torch.optim.SGD``, ``adam`` is
``torch.optim.Adam`` / ``AdamW``, each with ``fused=True`` where this torch has the fused
kernels for the device and dtype (probed once); torch's RMSprop has neither the EMA momentum
form nor a fused kernel, so ``rmsprop`` is a short ``torch._foreach_*`` implementation.

Skipped steps, on the device and branch-free, without a host read. One flag decides the whole
step:

    skip = ~ok | ~(largest 2-norm of a gradient <= bound)     (one ``_foreach_norm`` per bucket)

A 2-norm bounds every |element|; it is NaN or inf where an element is, and inf where the
squares overflow, all of which fail the comparison. ``bound`` (per rule, param group and dtype:
:meth:`Fallback.bound`) keeps every state element and the step of an accepted step finite: the
squares of the gradient (Adam's and RMSprop's v) below ``finfo.max``, and the step below it too
(see each rule). A finite gradient beyond the bound (float32, Adam: about 3e18) skips the
whole step: it would make v infinite (which freezes the parameter) or the step overflow. The
bounds assume parameters and states well inside the dtype's range (the rule's own steps keep
them there); they leave a factor 32 of room for weight decay and rounding. The fused kernels
take the flag as ``found_inf`` (``torch.amp.GradScaler``'s mechanism): a skipped step leaves
parameters, moments and torch's step counts bit for bit unchanged. Without the fused kernels
(``use_fused``, a torch before 2.4 on CPU, torch 2.13's CPU SGD for float16 and bfloat16:
:func:`fused_supported`) the plain torch.optim step runs and every tensor
it touched is put back where the flag is set (Adam's CPU step counts: one device read).

Not torch's own first steps: torch.optim's fused SGD takes its first step while no parameter
has a buffer yet (and leaves uninitialised buffers when that step is skipped, or fails when a
parameter without a gradient then gets one), so the rule always gives SGD its buffers.

State (checkpoint, keyed by parameter name) is the rule's own tensors, shared with the
torch.optim state (updated in place; loading copies into them). Counters (accepted steps t,
momentum ``started``) are one device vector per rule, saved per name as 0-dim tensors.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import Tensor, nn

from kfqn.core.components import Component
from kfqn.core.momentum import initial_started

Entry = tuple[str, nn.Parameter, dict]

#: room left below ``finfo(dtype).max`` by the bounds (weight decay inside the gradient,
#: rounding, the parameter itself)
HEADROOM = 32.0


def limit(dtype: torch.dtype) -> float:
    """Largest state or step element the bounds allow."""
    return torch.finfo(dtype).max / HEADROOM


def eps_for(eps: float, dtype: torch.dtype) -> float:
    """eps as used for parameters of ``dtype``: at least the dtype's smallest normal number (so
    that eps = 0 never gives 0 / 0, and a float16 step stays inside float16's range)."""
    return max(float(eps), torch.finfo(dtype).tiny)


@functools.lru_cache(maxsize=None)
def fused_supported(cls: type, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``cls(..., fused=True)`` steps ``dtype`` parameters on ``device``, takes
    ``found_inf`` and agrees with torch's plain step. Probed once, as the rules use it (SGD given
    its buffer): 67 elements (vector body and tail), a skipped step, then two steps. (torch
    2.13's CPU fused SGD is wrong for float16 and bfloat16: buffers of inf, elements not
    updated; CPU needs torch >= 2.4.)"""
    out = []
    try:
        for fused in (True, False):
            p = torch.linspace(-1.0, 1.0, 67, device=device).to(dtype).requires_grad_()
            kw = {"momentum": 0.5} if issubclass(cls, torch.optim.SGD) else {"eps": 1e-3}
            opt = cls([p], lr=0.1, **kw, **({"fused": True} if fused else {"foreach": False}))
            if issubclass(cls, torch.optim.SGD):
                opt.state[p]["momentum_buffer"] = torch.zeros_like(p)
            for skip in (1.0, 0.0, 0.0):
                p.grad = torch.linspace(0.5, 1.5, 67, device=device).to(dtype)
                p.grad[1::2] *= -1.0
                if fused:
                    opt.found_inf = torch.full((), skip, device=device)
                if fused or not skip:
                    opt.step()
            out.append(p.detach().to("cpu", torch.float64))
    except (RuntimeError, TypeError, ValueError, NotImplementedError, AssertionError):
        return False
    return bool(torch.allclose(out[0], out[1], rtol=0.0, atol=1e-2))


def full(value: float, like: Tensor) -> Tensor:
    """A 0-dim tensor of ``like``'s dtype and device (filled on the device, no copy)."""
    return torch.full((), value, dtype=like.dtype, device=like.device)


def pick(flag: Tensor, on: float, off: float, like: Tensor) -> Tensor:
    """``on`` where ``flag`` else ``off``, in ``like``'s dtype (exactly: no float32 detour)."""
    return torch.where(flag.to(like.device), full(on, like), full(off, like))


class Fallback(Component):
    """Base: the entries' buckets (param group, dtype, device), the skip flag, the counters,
    and the torch.optim optimizer of a rule that has one."""

    #: take torch's fused kernels where they exist (False: the plain torch.optim step, put
    #: back where skipped; the tests compare both)
    use_fused = True

    def __init__(self, entries: list[Entry], config: Mapping[str, Any],
                 options: Mapping[str, Any]) -> None:
        self.entries = entries
        self.config = config
        self.opts = dict(options)
        self.names = [n for n, _, _ in entries]
        self.device = entries[0][1].device if entries else torch.device("cpu")
        for name, p, _ in entries:
            if not p.is_floating_point():
                raise TypeError(f"first-order fallback {self.name!r}: parameter {name!r} is "
                                f"{p.dtype}; only real floating-point parameters are supported")
        buckets: dict[tuple, tuple[dict, torch.dtype, list[int]]] = {}
        for i, (_, p, group) in enumerate(entries):
            buckets.setdefault((id(group), p.dtype, p.device), (group, p.dtype, []))[2].append(i)
        #: (param group, dtype, entry indices): one torch.optim param group each
        self.buckets = list(buckets.values())
        self._present: dict[tuple[bool, ...], tuple[list[list[int]], Tensor | None]] = {}
        self.opt: torch.optim.Optimizer | None = None
        self.fused = True

    # -- the rule ------------------------------------------------------------------------------
    def bound(self, group: dict, dtype: torch.dtype) -> float:
        """Largest |gradient element| whose step keeps state and parameters finite."""
        raise NotImplementedError

    def settings(self, group: dict, dtype: torch.dtype) -> dict[str, Any]:
        """The torch.optim param group's hyper-parameters for this kfqn param group."""
        raise NotImplementedError

    # -- shared machinery ----------------------------------------------------------------------
    def counter(self, initial: Tensor) -> Tensor:
        """One counter per entry, on the device (``initial``: a 0-dim value)."""
        return initial.to(self.device).expand(len(self.entries)).clone()

    def present(self) -> tuple[list[list[int]], Tensor | None]:
        """Per bucket, the indices of entries with a gradient; and their mask over all entries
        (None: every entry has one). Cached per pattern: no host-to-device copy per step."""
        key = tuple(p.grad is not None for _, p, _ in self.entries)
        if key not in self._present:
            idx = [[i for i in b if key[i]] for _, _, b in self.buckets]
            mask = None if all(key) else torch.tensor(key, device=self.device)
            self._present[key] = (idx, mask)
        return self._present[key]

    def skip_flag(self, ok: Tensor, present: list[list[int]]) -> Tensor:
        """0-dim bool on the device: ``ok`` is false, or a gradient element is non-finite or
        beyond its bucket's :meth:`bound`."""
        skip = ~ok.to(self.device)
        for (group, dtype, _), idx in zip(self.buckets, present):
            if idx:
                grads = [self.entries[i][1].grad for i in idx]
                norms = torch.stack(torch._foreach_norm(grads, 2))   # >= every |element|
                skip = skip | ~(norms.max() <= self.bound(group, dtype)).to(self.device)
        return skip

    def make_optimizer(self, cls: type, state: Callable[[str, Tensor], dict[str, Tensor]]
                       ) -> None:
        """``cls`` over the entries, one param group per bucket, its state set to the rule's
        tensors (``state(name, parameter)``), fused where every bucket allows it."""
        if not self.entries:
            return
        self.fused = self.use_fused and all(
            fused_supported(cls, self.entries[b[0]][1].device, dtype)
            for _, dtype, b in self.buckets)
        groups = [{"params": [self.entries[i][1] for i in b], **self.settings(group, dtype)}
                  for group, dtype, b in self.buckets]
        kw = {"fused": True} if self.fused else {"foreach": False}
        self.opt = cls(groups, **kw)
        for name, p, _ in self.entries:
            self.opt.state[p] = state(name, p)

    def torch_step(self, skip: Tensor) -> None:
        """The torch.optim step with the group settings of now, skipped where ``skip``."""
        for tg, (group, dtype, _) in zip(self.opt.param_groups, self.buckets):
            tg.update(self.settings(group, dtype))
        if self.fused:
            self.opt.found_inf = skip.to(torch.float32)
            self.opt.step()
            return
        touched = [p for _, p, _ in self.entries if p.grad is not None]
        touched += [t for p in touched for t in self.opt.state[p].values()
                    if isinstance(t, Tensor)]
        saved = [t.clone() for t in touched]
        self.opt.step()
        for t, s in zip(touched, saved):
            t.copy_(torch.where(skip.to(t.device), s, t))

    def count(self, counter: Tensor, run: Tensor, mask: Tensor | None) -> None:
        """counter += run (or |= run) for the entries that had a gradient."""
        add = run if mask is None else run & mask
        if counter.dtype == torch.bool:
            counter |= add
        else:
            counter += add

    def counter_state(self, counter: Tensor) -> dict[str, Tensor]:
        """Per name, a 0-dim view of the counter (updated in place, as every state tensor)."""
        return dict(zip(self.names, counter.unbind(0)))

    def load_counter(self, counter: Tensor, saved: Mapping[str, Any]) -> None:
        counter.copy_(torch.stack([torch.as_tensor(saved[n]).to(counter) for n in self.names])
                      if self.names else counter)

    @staticmethod
    def load_tensors(mine: Mapping[str, Tensor], saved: Mapping[str, Tensor],
                     names: Iterable[str]) -> None:
        """Copy a checkpoint's tensors into the rule's own (in place: torch.optim holds them)."""
        for name in names:
            if name not in saved:
                raise KeyError(name)
            if tuple(saved[name].shape) != tuple(mine[name].shape):
                raise ValueError(f"{name}: shape {tuple(saved[name].shape)} in the checkpoint, "
                                 f"{tuple(mine[name].shape)} here")
            mine[name].copy_(saved[name])

    @staticmethod
    def nbytes(*states: Mapping[str, Tensor]) -> int:
        return sum(t.numel() * t.element_size() for d in states for t in d.values())

    @torch.no_grad()
    def step(self, ok: Tensor) -> None:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def load_state_dict(self, state: dict[str, Any]) -> None:
        raise NotImplementedError


class MomentumFallback(Fallback):
    """``torch.optim.SGD``: buffer b <- rho b + c G (G = grad + tau theta with weight decay
    inside), theta <- theta - lr b, with c = 1 - rho ('ema': SGD's dampening = rho) or 1
    ('torch': dampening 0). ``momentum_init: zero``: b starts at zero and counts as started
    (SGD's buffer is given, so SGD never takes its own first step); ``first``: the first
    accepted step sets b = G. In the 'torch' form that is rho * 0 + G = G exactly; in the 'ema'
    form b is set to G before the step (where not started), so b_1 = rho G + (1 - rho) G, G up
    to one rounding. Weight decay outside: theta <- theta (1 - lr tau) first, then SGD's step.
    Momentum 0: SGD keeps no buffer, b stays as it was.

    Bound: |b| <= c B / (1 - rho) and the step lr |b| below :func:`limit`."""

    name = "momentum"
    description = "plain momentum direction with the group's lr, momentum and weight decay"

    def __init__(self, entries, config, options) -> None:
        super().__init__(entries, config, options)
        self.ema = config["momentum_form"] == "ema"
        self.inside = config["weight_decay_mode"] == "inside"
        self.first = config.get("momentum_init", "zero") == "first"
        self.buf: dict[str, Tensor] = {n: torch.zeros_like(p) for n, p, _ in entries}
        self.started = self.counter(initial_started(config, self.device))
        self.make_optimizer(torch.optim.SGD, lambda n, p: {"momentum_buffer": self.buf[n]})

    def settings(self, group: dict, dtype: torch.dtype) -> dict[str, Any]:
        rho, wd = float(group["momentum"]), float(group["weight_decay"])
        return {"lr": float(group["lr"]), "momentum": rho,
                "dampening": 1.0 - (1.0 - rho) if self.ema else 0.0,
                "weight_decay": wd if self.inside else 0.0}

    def bound(self, group: dict, dtype: torch.dtype) -> float:
        rho = float(group["momentum"])
        growth = 1.0 if self.ema else 1.0 / (1.0 - rho)   # |b| <= growth * max |G|
        return limit(dtype) / (growth * max(float(group["lr"]), 1.0))

    @torch.no_grad()
    def step(self, ok: Tensor) -> None:
        present, mask = self.present()
        if not any(present):
            return
        skip = self.skip_flag(ok, present)
        run = ~skip
        for (group, _, _), idx in zip(self.buckets, present):
            lr, wd = float(group["lr"]), float(group["weight_decay"])
            ps = [self.entries[i][1] for i in idx]
            if wd and not self.inside and ps:
                torch._foreach_mul_(ps, pick(run, 1.0 - lr * wd, 1.0, ps[0]))
            if self.first and self.ema and float(group["momentum"]):
                for i in idx:
                    name, p, _ = self.entries[i]
                    g = p.grad + wd * p if (wd and self.inside) else p.grad
                    keep = (self.started[i] | skip).to(p.device)
                    self.buf[name].copy_(torch.where(keep, self.buf[name], g))
        self.torch_step(skip)
        self.count(self.started, run, mask)

    def state_dict(self) -> dict[str, Any]:
        return {"buf": dict(self.buf), "started": self.counter_state(self.started)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.load_tensors(self.buf, state["buf"], self.names)
        self.load_counter(self.started, state["started"])

    def state_bytes(self) -> int:
        """Bytes of the momentum buffers."""
        return self.nbytes(self.buf)
