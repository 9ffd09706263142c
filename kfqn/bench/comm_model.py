"""The data-parallel communication of one optimizer step, as a formula of the layer dimensions.

With N > 1 ranks (a ``DistributedDataParallel`` model, :mod:`kfqn.core.communicator`) kfqn
averages layer statistics with blocking all-reduces, beside DDP's own gradient all-reduce. What
one step sends follows from the configuration and the layer shapes alone; this module writes it
down so that ``kfqn bench --nproc N`` (and ``tests/test_bench.py``) can check it against
``opt.comm.calls`` / ``opt.comm.bytes``, and ``kfqn bench --project`` can price it for models
and world sizes that were never run.

Notation, per preconditioned layer l: ``d_a`` (homogeneous input dimension: c_in k_h k_w (+1)),
``d_g`` (output dimension); ``s_x`` = bytes per element of the layer's activations (its weight
dtype, 4 for float32), ``s_f`` = bytes per element of ``factor_dtype``; L layers. The number of
positions |T| (conv output pixels) never enters: every statistic is a mean over batch *and*
positions before it is averaged. One all-reduce ("call") per ``comm.mean_many`` (or
``comm.mean``, ``comm.sum_``); its bytes are what the rank contributes (``numel *
element_size`` of the flat buffer, in the widest dtype of its parts).

Per step (steady state: after the first accepted step, warm start done), one all-reduce per
pass carries everything that pass averages (``KFQNOptimizer._reduce_round``: one flat buffer in
the widest dtype of its parts, s = that dtype's size):

* the closure's pass, every preset: the h and g means of every layer (2 d_g each) and the
  finite flag (1), plus every statistic the layers' preconditioners declare
  (``batch_means``):

  - ``a_side: ema_hessian_action`` (kbfgs, kbfgs_l): the batch A (d_a^2: the EMA's, and the
    first-batch start's) and the input mean v (d_a);
  - ``a_side: minibatch_hessian_action`` (kfbfgs_cnn, kfbfgs_l_cnn, kfbfgs_ll_cnn): v (d_a);
    the batch A (d_a^2) at the first-batch start and, under ``placement: owner``, every step
    (the owner forms y_a = A s_a from it);
  - ``preconditioner: kfac``: at every statistics step (``stats_every`` T1) A (d_a^2) and G
    (d_g^2, in ``factor_dtype``);
  - ``shampoo``: nothing (its statistics come from the gradient, which DDP has averaged);

* the extra pass (``g_side.source: extra_pass``: kbfgs, kbfgs_l, kfbfgs_cnn, kfbfgs_l_cnn): the
  h and g means at theta+ (2 sum d_g), one more call;
* after the move: ``minibatch_hessian_action`` under ``placement: replicated`` declares the
  Hessian action at s_a = H_a v (d_a; it needs the averaged v of the first round): it travels
  in the extra pass's round, or, without an extra pass (kfbfgs_ll_cnn), in a round of its own;
* outside the rounds: EKFAC's scaling S (d_g d_a) at its statistics and basis steps, one call
  per layer;
* ``placement: owner``: the owners' directions, sum d_g d_a numbers in ``factor_dtype``, one
  call (an all-reduce of a buffer with zeros where a rank does not own the layer);
* first-order presets (adam, sgd_m, rmsprop; no preconditioned layer): the flag alone, 4 bytes.

So, in float32 (every s = 4), bytes and calls per step (replicated; owner adds
4 sum d_g d_a bytes and 1 call, and for the minibatch presets 4 sum d_a^2 bytes less the
actions' 4 sum d_a, kfbfgs_ll_cnn's own round gone)::

    kbfgs, kbfgs_l        4 (4 sum d_g + 1 + sum (d_a^2 + d_a))        2 calls
    kfbfgs_cnn, _l_cnn    4 (4 sum d_g + 1 + 2 sum d_a)                2 calls
    kfbfgs_ll_cnn         4 (2 sum d_g + 1 + 2 sum d_a)                2 calls
    kfac                  4 (2 sum d_g + 1 + sum (d_a^2 + d_g^2) / T1) 1 call
    shampoo               4 (2 sum d_g + 1)                            1 call
    adam, sgd_m, rmsprop  4                                            1 call

against DDP's gradient all-reduce of sum_p numel(p) s_p bytes (every trainable parameter,
sum_l d_g d_a s_x for the preconditioned layers plus the rest, in ~25 MiB buckets).

:func:`step_collectives` lists the all-reduces of one given step from the optimizer's state
(so it also covers the first step, whose start-up statistics are extra, and K-FAC's cadences);
:func:`expected_comm` sums them over the next steps; :func:`per_step` gives the steady-state
average over a full cadence period. A preconditioner or estimator this module does not know
raises :class:`UnknownCommModel`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch import nn

#: DDP's default gradient bucket size (``bucket_cap_mb=25``)
DDP_BUCKET_BYTES = 25 * 2**20


class UnknownCommModel(ValueError):
    """A component whose communication this model does not describe."""


@dataclass(frozen=True)
class Collective:
    """One all-reduce: what it carries, for which layer (None: several), its size, the dtype
    it is sent in and, for a pass's round, its parts ((what, numel) of each statistic)."""

    what: str
    layer: str | None
    numel: int
    dtype: torch.dtype
    parts: tuple[tuple[str, int], ...] = ()

    @property
    def nbytes(self) -> int:
        return self.numel * _itemsize(self.dtype)


@dataclass(frozen=True)
class CommCount:
    """Calls and bytes (one rank's contribution) of a number of steps."""

    calls: float
    bytes: float

    def __add__(self, other: "CommCount") -> "CommCount":
        return CommCount(self.calls + other.calls, self.bytes + other.bytes)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _count(colls: Iterable[Collective]) -> CommCount:
    colls = list(colls)
    return CommCount(len(colls), sum(c.nbytes for c in colls))


def _layers(opt: Any) -> list[Any]:
    return list((getattr(opt, "layers", None) or {}).values())


def _act_dtype(layer: Any) -> torch.dtype:
    """The dtype of the layer's activations (inputs, h, g): its weight's (no autocast)."""
    return layer.module.weight.dtype


#: a statistic of a round: (what, numel, own dtype)
_Part = tuple[str, int, torch.dtype]


def _round(what: str, parts: list[_Part]) -> Collective:
    """One pass's all-reduce: every part in the widest of their dtypes (``mean_many``)."""
    dtype = torch.float32
    for _, _, dt in parts:
        dtype = torch.promote_types(dtype, dt)
    return Collective(what, None, sum(n for _, n, _ in parts), dtype,
                      tuple((w, n) for w, n, _ in parts))


def _captures(layers: list[Any], what: str) -> list[_Part]:
    """The h and g means of every layer, as the capture hooks recorded them."""
    return [(what, 2 * l.adapter.d_g, _act_dtype(l)) for l in layers]


def _owner(opt: Any) -> bool:
    cfg = getattr(opt, "config", {}) or {}
    return cfg.get("placement") == "owner" and getattr(opt.comm, "world_size", 1) > 1


def _kronecker(layer: Any, step: int, steady: bool,
               owner: bool) -> tuple[list[_Part], list[_Part]]:
    """(parts of the closure's round, parts declared for after the move) of a kronecker
    layer."""
    pre, name = layer.precond, layer.name
    d_a, dx = layer.adapter.d_a, _act_dtype(layer)
    a, g = pre.a, pre.g
    a_kind, g_kind = getattr(a, "name", type(a).__name__), getattr(g, "name", type(g).__name__)
    if g_kind != "secant_pairs":
        raise UnknownCommModel(f"g_side {g_kind!r}: no communication model")
    if a_kind == "ema_hessian_action":
        return [("A (batch, for the EMA)", d_a * d_a, dx), ("input mean v", d_a, dx)], []
    if a_kind == "minibatch_hessian_action":
        parts: list[_Part] = [("input mean v", d_a, dx)]
        start = (not steady and a.opts["init"] != "identity"
                 and (not layer.owned or not a.initialised or a._start.due()))
        if owner or start:
            parts.append(("A (batch)" if owner else "A (first batch)", d_a * d_a, dx))
            return parts, []
        return parts, [("Hessian action", d_a, dx)]
    raise UnknownCommModel(f"a_side {a_kind!r}: no communication model")


def _kfac(layer: Any, step: int, steady: bool,
          opt: Any) -> tuple[list[_Part], list[Collective]]:
    pre, name = layer.precond, layer.name
    d_a, d_g, dx, df = layer.adapter.d_a, layer.adapter.d_g, _act_dtype(layer), opt.factor_dtype
    parts: list[_Part] = []
    if pre.a.stats_due(step):
        parts.append(("A", d_a * d_a, dx))
    if pre.g.stats_due(step):
        parts.append(("G", d_g * d_g, df))
    calls = []
    if getattr(pre, "name", "") == "ekfac" and pre.opts["scaling"] == "refit" \
            and pre.opts["precondition"]:
        o, t1 = pre.opts, pre.opts["stats_every"]
        changed = (step < o["inverse_warmup"] or step % o["inverse_every"] == 0
                   or (not steady and pre.basis is None))
        if changed or step % t1 == 0:
            calls.append(Collective("S (EKFAC scaling)", name, d_g * d_a, df))
    return parts, calls


def step_collectives(opt: Any, step: int | None = None, steady: bool = False) -> list[Collective]:
    """The all-reduces that step ``step`` (default: the next one, ``opt._step_count``) of
    ``opt`` makes with more than one rank, every layer delivering statistics and every value
    finite. ``steady``: ignore one-off start-up work (first-batch factors)."""
    if not hasattr(opt, "layers"):   # torch.optim behind kfqn.bench.cases.FirstOrder
        return []
    step = opt._step_count if step is None else step
    layers = _layers(opt)
    owner = _owner(opt)
    parts = _captures(layers, "h, g means") + [("finite flag", 1, torch.float32)]
    moved: list[_Part] = []
    calls: list[Collective] = []
    for layer in layers:
        kind = getattr(layer.precond, "name", type(layer.precond).__name__)
        if kind == "kronecker":
            more, after = _kronecker(layer, step, steady, owner)
            moved += after
        elif kind in ("kfac", "ekfac"):
            more, own = _kfac(layer, step, steady, opt)
            calls += own
        elif kind == "shampoo":
            more = []
        else:
            raise UnknownCommModel(f"preconditioner {kind!r}: no communication model")
        parts += more
    out = [_round("closure's pass", parts)] + calls
    if owner and layers:
        out.append(Collective("directions (placement=owner)", None,
                              sum(l.adapter.d_g * l.adapter.d_a for l in layers),
                              opt.factor_dtype))
    if layers and any("trial" in l.precond.needs for l in layers):
        out.append(_round("extra pass", _captures(layers, "h, g means at theta+") + moved))
    elif moved:
        out.append(_round("after the move", moved))
    return out


def expected_comm(opt: Any, steps: int = 1) -> CommCount:
    """Calls and bytes of the next ``steps`` steps (the first from the current state, the
    others in steady state)."""
    k0 = getattr(opt, "_step_count", 0)
    total = CommCount(0, 0)
    for i in range(steps):
        total = total + _count(step_collectives(opt, k0 + i, steady=i > 0))
    return total


def cadence_period(opt: Any) -> int:
    """Steps after which the communication pattern repeats (K-FAC's T1, EKFAC's T2)."""
    period = 1
    for layer in _layers(opt):
        o = getattr(layer.precond, "opts", {}) or {}
        for key in ("stats_every", "inverse_every"):
            if isinstance(o.get(key), int):
                period = math.lcm(period, o[key])
    return period


def per_step(opt: Any) -> CommCount:
    """Steady-state calls and bytes per step, averaged over one cadence period (after every
    warm-up)."""
    period = cadence_period(opt)
    warm = max([int((getattr(l.precond, "opts", {}) or {}).get("inverse_warmup", 0) or 0)
                for l in _layers(opt)] + [0])
    base = period * (warm // period + 1)
    total = CommCount(0, 0)
    for k in range(base, base + period):
        total = total + _count(step_collectives(opt, k, steady=True))
    return CommCount(total.calls / period, total.bytes / period)


class CountingComm:
    """A stand-in for :class:`~kfqn.core.communicator.TorchDistributed` in one process: it
    pretends to be rank 0 of ``world_size`` ranks whose statistics all equal its own, counting
    the all-reduces (``calls``, ``bytes``) exactly as ``TorchDistributed`` does, without a
    process group. ``build_optimizer(model, spec, comm=CountingComm())``."""

    rank = 0

    def __init__(self, world_size: int = 2) -> None:
        from kfqn.core.communicator import TorchDistributed

        self.world_size = world_size
        self.calls = 0
        self.bytes = 0
        self._impl = TorchDistributed.__new__(TorchDistributed)
        self._impl.world_size = world_size
        self._impl._all_reduce = self._all_reduce

    def _all_reduce(self, flat: torch.Tensor) -> None:
        self.calls += 1
        self.bytes += flat.numel() * flat.element_size()
        flat.mul_(self.world_size)   # the sum of world_size equal contributions

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        return self.mean_many([t])[0]

    def mean_many(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        from kfqn.core.communicator import TorchDistributed

        return TorchDistributed.mean_many(self._impl, tensors)

    def sum_(self, flat: torch.Tensor) -> torch.Tensor:
        """Counted; the other ranks' shares are not simulated (placement=owner directions)."""
        self.calls += 1
        self.bytes += flat.numel() * flat.element_size()
        return flat

    def gather_objects(self, obj: Any) -> list[Any]:
        return [obj]


def grad_bytes(model: nn.Module) -> int:
    """DDP's gradient all-reduce per step: every trainable parameter's bytes."""
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def grad_calls(model: nn.Module, bucket_bytes: int = DDP_BUCKET_BYTES) -> int:
    """DDP's all-reduce calls per step, approximately: one per ~25 MiB bucket."""
    return max(1, math.ceil(grad_bytes(model) / bucket_bytes))


def layer_dims(opt: Any) -> list[tuple[str, int, int]]:
    """(name, d_a, d_g) of every preconditioned layer."""
    return [(l.name, l.adapter.d_a, l.adapter.d_g) for l in _layers(opt)]


def breakdown(opt: Any) -> dict[str, CommCount]:
    """Steady-state calls and bytes per step by statistic (summed over layers), averaged over
    a cadence period."""
    period = cadence_period(opt)
    warm = max([int((getattr(l.precond, "opts", {}) or {}).get("inverse_warmup", 0) or 0)
                for l in _layers(opt)] + [0])
    base = period * (warm // period + 1)
    out: dict[str, CommCount] = {}
    for k in range(base, base + period):
        for c in step_collectives(opt, k, steady=True):
            # a round's call is counted once, under its name; its bytes under each part
            out[c.what] = out.get(c.what, CommCount(0, 0)) + CommCount(1 / period, 0)
            size = _itemsize(c.dtype)
            for what, n in (c.parts or ((c.what, c.numel),)):
                out[what] = out.get(what, CommCount(0, 0)) + CommCount(0, n * size / period)
    return out
