"""The kfqn optimizer: per-layer Kronecker-factored quasi-Newton steps (docs/algorithms.md §3-4).

For every preconditioned layer l (a module an adapter takes):

    G_l  = Mbar_l + tau Wbar_l                     (weight decay "inside")
    Mhat <- rho Mhat + (1 - rho) G_l               (or torch form; starts at 0 or at G_l)
    P_l  = -H_g Mhat H_a                            (G side, then A side)
    theta_l <- theta_l + alpha P_l

Other parameters take the fallback rule. Each layer's preconditioner
(:mod:`kfqn.preconditioners.base`: one object per layer that owns both factors) absorbs the
step's statistics (:mod:`kfqn.core.statistics`) around the step. A non-finite loss or gradient turns the whole step into a
no-op on the device (counted); a non-finite direction of one layer is rejected for that layer.
No ``.item()`` or other host synchronisation happens inside :meth:`step`.
"""
from __future__ import annotations

import contextlib
import math
import time
import warnings
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import Tensor, nn

from kfqn.core.assembly import ComponentBuilder
from kfqn.core.communicator import Communicator, ReducingAdapter, TorchDistributed
from kfqn.core.config import GROUP_KEYS, validate_param_group
from kfqn.core.errors import ConfigError, KfqnError, UnsupportedModuleError
from kfqn.core.finite import all_finite, all_finite_many, const, finite_scalar
from kfqn.core.flat_step import FlatBucket
from kfqn.core.momentum import initial_started, momentum_update_
from kfqn.core.placement import assign_owners, factor_cost
from kfqn.core.registry import Registry, default_registry
from kfqn.core.state_check import check_like, clone_tree
from kfqn.core.statistics import LayerStatistics, StepStatistics
from kfqn.curvature.base import LayerContext, StepInfo
from kfqn.layers.base import LayerAdapter
from kfqn.layers.capture import CaptureHooks

STATE_FORMAT = "kfqn-optimizer/2"
#: formats this version can no longer read, with the reason
OLD_FORMATS = {"kfqn-optimizer/1": "written before kfqn 0.2, whose layers kept separate A-side "
                                   "and G-side estimators instead of one preconditioner"}
#: modules whose parameters are meant for a first-order rule: never reported as unsupported
FIRST_ORDER_MODULES: tuple[type, ...] = (
    nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.Embedding, nn.EmbeddingBag,
    nn.PReLU,
)
#: config keys that may differ between a checkpoint and the optimizer loading it
HYPER_KEYS = ("name", "description", "lr", "momentum", "weight_decay", "damping", "placement")


@dataclass
class Layer:
    """One preconditioned module and its state."""

    name: str
    module: nn.Module
    adapter: LayerAdapter
    hooks: CaptureHooks
    #: the layer's preconditioner (:class:`kfqn.preconditioners.base.LayerPreconditioner`)
    precond: Any
    group: int
    momentum: Tensor
    started: Tensor
    dir_rejected: Tensor
    positions: int = 1
    #: its forward was captured at least once (host flag)
    captured: bool = False
    #: this rank holds its preconditioner (``placement: owner``: else a state-free ``meta`` copy
    #: that only evaluates ``batch_means``, and no momentum)
    owned: bool = True
    #: data-parallel: the ReducingAdapter its preconditioner sees (holds the pass's averages)
    reducer: Any = None
    extra: dict = field(default_factory=dict)


def _dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "float64": torch.float64}[name]


def _rng_state() -> tuple[Tensor, list[Tensor] | None]:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple[Tensor, list[Tensor] | None]) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state_all(state[1])


def _flat_tensors(tree: Any, prefix: str, out: dict[str, Tensor]) -> None:
    """The tensors of a state tree, keyed by their dotted path."""
    if isinstance(tree, Tensor):
        out[prefix] = tree
    elif isinstance(tree, dict):
        for k, v in tree.items():
            _flat_tensors(v, f"{prefix}.{k}", out)
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            _flat_tensors(v, f"{prefix}.{i}", out)


def _family(config: dict) -> str:
    """The preconditioner family of a config, with its estimators for ``kronecker``."""
    name = config["preconditioner"]["name"]
    if name == "kronecker":
        return f"kronecker: a_side={config['a_side']['name']}, g_side={config['g_side']['name']}"
    return name


def _describe(entry: Any) -> str:
    """A model-signature entry in words: [shape, dtype] of a parameter, or a module type."""
    if entry is None:
        return "absent"
    if isinstance(entry, (list, tuple)) and len(entry) == 2:
        return f"of shape {tuple(entry[0])} ({str(entry[1]).replace('torch.', '')})"
    return str(entry)


def _children_used_without_forward(model: nn.Module) -> dict[str, str]:
    """Modules whose parent reads their parameters directly, so that their own forward (and the
    capture hooks on it) never runs: ``nn.MultiheadAttention.out_proj``. Name -> reason."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            child = f"{name}.out_proj" if name else "out_proj"
            out[child] = ("nn.MultiheadAttention uses out_proj.weight and out_proj.bias directly, "
                          "so out_proj's forward never runs and no statistics can be captured")
    return out


class KFQNOptimizer(torch.optim.Optimizer):
    """A Kronecker-factored quasi-Newton optimizer assembled from registered components.

    Build it with :func:`kfqn.build_optimizer`. ``step(closure)``: the closure zeroes the
    gradients, runs forward and backward on one minibatch and returns the (mean-reduced,
    unregularised) loss, like ``torch.optim.LBFGS``; presets with ``g_side.source=extra_pass``
    call it a second time at the trial point, with the parameters frozen (their ``.grad`` is
    None in that call; ``trial_pass_grads=all`` keeps them trainable there).
    """

    def __init__(self, model: nn.Module, config: dict, registry: Registry | None = None,
                 param_groups: Iterable[dict] | None = None, comm: Any = None,
                 loss: Any = None) -> None:
        #: the training loss given to build_optimizer (an OutputLoss), or None
        self.loss = loss
        #: the model as the caller runs it (DDP / compiled wrapper included)
        self._called = model
        # a DistributedDataParallel model: statistics are averaged over its process group, the
        # extra pass runs under no_sync(), hooks and names go to the module it wraps
        self._ddp = model if isinstance(model, nn.parallel.DistributedDataParallel) else None
        if self._ddp is not None:
            model = model.module
            if comm is None:
                comm = TorchDistributed(self._ddp.process_group)
        if comm is not None and not hasattr(comm, "mean_many"):  # a torch ProcessGroup
            comm = TorchDistributed(comm)
        self.comm = comm if comm is not None else Communicator()
        # a torch.compile'd model: hooks and names go to the module it wraps (names then match the
        # eager model's, so checkpoints move between the two); the capture hooks run eagerly
        self.model = model = getattr(model, "_orig_mod", model)
        self.config = config
        self.registry = registry or default_registry()
        self.builder = ComponentBuilder(self.registry)
        defaults = {k: config[k] for k in ("lr", "momentum", "weight_decay", "damping")}
        if param_groups is None:
            params = [p for p in model.parameters() if p.requires_grad]
            if not params:
                raise ConfigError("the model has no trainable parameters (requires_grad=True)")
            groups: list[dict] = [{"params": params}]
        else:
            groups = [validate_param_group(i, g) for i, g in enumerate(param_groups)]
        super().__init__(groups, defaults)
        self.factor_dtype = _dtype(config["factor_dtype"])
        self._step_count = 0
        self._warm_started = False
        self._warned_no_warm = False
        self.last_phase_times: dict[str, float] = {}
        self.unsupported: dict[str, str] = {}
        self.layers: dict[str, Layer] = {}
        self._build_layers()
        self._build_buckets()
        self._sampling_layers = [l for l in self.layers.values()
                                 if "sampled_grads" in l.precond.needs]
        if self._sampling_layers and not any(l.owned for l in self._sampling_layers):
            raise ConfigError(
                f"placement=owner: rank {self.comm.rank} of {self.comm.world_size} owns none of "
                f"the {len(self._sampling_layers)} layers whose preconditioner draws the "
                "Fisher's labels, so it cannot draw its share; use placement=replicated or "
                "fewer ranks than layers")
        self._output_hook = (
            model.register_forward_hook(torch.compiler.disable(self._on_model_output))
            if self._sampling_layers else None)
        self.nonfinite_steps = torch.zeros((), dtype=torch.long, device=self._device())
        self._needs_trial = any("trial" in l.precond.needs for l in self.layers.values())

    # -- construction ------------------------------------------------------------------------
    def _device(self) -> torch.device:
        return self.param_groups[0]["params"][0].device

    def _build_layers(self) -> None:
        group_of: dict[int, int] = {}
        for gi, group in enumerate(self.param_groups):
            for p in group["params"]:
                group_of[id(p)] = gi
        model_params = {id(p) for p in self.model.parameters()}
        for p in group_of:
            if p not in model_params:
                raise ConfigError("a parameter in param_groups does not belong to the model")
        wanted = self.config["layers"]
        if wanted is None:  # every registered adapter, in registration order
            adapters = [r.obj for r in self.registry.tables()["layer_adapter"].values()]
        else:
            adapters = [self.registry.get("layer_adapter", n) for n in wanted]
        names = {id(p): n for n, p in self.model.named_parameters()}
        owners: dict[int, int] = {}
        for _, module in self.model.named_modules():
            for p in module.parameters(recurse=False):
                owners[id(p)] = owners.get(id(p), 0) + 1
        claimed: set[int] = set()
        blocks: list[tuple[str, nn.Module, LayerAdapter, int]] = []
        bypassed = _children_used_without_forward(self.model)
        for mname, module in self.model.named_modules():
            own = [p for p in module.parameters(recurse=False) if id(p) in group_of]
            if not own:
                continue
            matching = [a for a in adapters if a.matches(module)]
            # the first adapter that takes the module; else the first match says why not
            adapter_cls = next((a for a in matching if a.unsupported_reason(module) is None),
                               matching[0] if matching else None)
            reason = None
            if mname in bypassed:
                reason = bypassed[mname]
            elif adapter_cls is None:
                if isinstance(module, FIRST_ORDER_MODULES):
                    continue
                reason = (f"no layer adapter for {type(module).__name__} (layers: "
                          f"{', '.join(a.name for a in adapters) or 'none'})")
            else:
                reason = adapter_cls.unsupported_reason(module)
                adapter = adapter_cls(module)
                if reason is None:
                    ps = adapter.params()
                    if any(id(p) not in group_of for p in ps):
                        reason = "only some of its parameters are trainable / in param_groups"
                    elif len({group_of[id(p)] for p in ps}) != 1:
                        reason = "its weight and bias are in different param groups"
                    elif any(owners[id(p)] > 1 for p in ps):
                        reason = "its parameters are shared with another module"
            if reason is not None:
                self._unsupported(mname or type(module).__name__, module, reason)
                continue
            for bname, block in adapter.blocks(mname):
                blocks.append((bname, module, block, group_of[id(module.weight)]))
            claimed.update(id(p) for p in adapter.params())
        owners = self._owners(blocks)
        for bname, module, block, group in blocks:
            self._add_layer(bname, module, block, group, owners[bname] == self.comm.rank)
        entries = []
        for gi, group in enumerate(self.param_groups):
            for p in group["params"]:
                if id(p) not in claimed:
                    entries.append((names[id(p)], p, group))
        self.fallback = self._make_fallback(entries)
        self.fallback_params = [n for n, _, _ in entries]
        #: fallbacks of layers released at a step (:meth:`_release_uncaptured`), with their names
        self._late_fallbacks: list[tuple[list[str], Any]] = []

    def _make_fallback(self, entries: list) -> Any:
        fb = self.config["fallback"]
        return self.registry.get("fallback", fb["name"])(entries, self.config,
                                                         self.builder.options(fb))

    def _fallbacks(self) -> list[Any]:
        return [self.fallback] + [fb for _, fb in self._late_fallbacks]

    def _release_uncaptured(self) -> None:
        """Layers whose parameters have gradients although their forward never ran (and was
        never captured) in any closure so far: another module used their weights directly
        (e.g. a custom attention reading ``proj.weight``). Preconditioning them would leave them
        frozen, so they go to the first-order fallback, named in a warning (or an error with
        ``unsupported: error``). Host-side checks only."""
        lost = [l for l in self.layers.values()
                if not l.captured and l.hooks.slots["current"].calls == 0
                and any(p.grad is not None for p in l.adapter.params())]
        if lost:
            self._release([l.name for l in lost],
                          "its parameters received gradients but its forward never ran in the "
                          "closure (another module uses its weights directly), so no statistics "
                          "could be captured")

    def _release(self, names: list[str], reason: str) -> None:
        entries = self._entries_of(names)
        for name in names:
            layer = self.layers.pop(name)
            self._unsupported(name, layer.module, reason)
            layer.hooks.remove()
        self._late_fallbacks.append((list(names), self._make_fallback(entries)))
        self.fallback_params += [n for n, _, _ in entries]
        self._sampling_layers = [l for l in self._sampling_layers if l.name in self.layers]
        self._needs_trial = any("trial" in l.precond.needs for l in self.layers.values())
        self._build_buckets()

    def _build_buckets(self) -> None:
        """The direction state of the layers this rank owns in flat buffers, one
        :class:`~kfqn.core.flat_step.FlatBucket` per param group and device (the layers'
        ``momentum``, ``started``, ``dir_rejected`` become views of them)."""
        groups: dict[tuple, list[Layer]] = {}
        for layer in self.layers.values():
            if layer.owned:
                key = (layer.group, layer.momentum.device)
                groups.setdefault(key, []).append(layer)
        self._buckets = [FlatBucket(members, self.factor_dtype, dev)
                         for (_, dev), members in groups.items()]

    def _unsupported(self, name: str, module: nn.Module, reason: str) -> None:
        policy = self.config["unsupported"]
        msg = (f"module {name!r} ({type(module).__name__}) is not preconditioned: {reason}. "
               "Its parameters use the first-order fallback.")
        if policy == "error":
            raise UnsupportedModuleError(
                msg.replace("Its parameters use the first-order fallback.",
                            "Set unsupported=fallback (or warn) to train it with the first-order "
                            "fallback, or change the model."))
        if policy == "warn":
            warnings.warn(msg, stacklevel=4)
        self.unsupported[name] = reason

    @property
    def _owner_mode(self) -> bool:
        """``placement: owner`` with more than one rank (kfqn.core.placement)."""
        return self.config["placement"] == "owner" and self.comm.world_size > 1

    def _owners(self, blocks: list) -> dict[str, int]:
        """layer name -> the rank that holds its preconditioner (this rank when replicated)."""
        if not self._owner_mode:
            return {b[0]: self.comm.rank for b in blocks}
        return assign_owners({b[0]: factor_cost(b[2].d_a, b[2].d_g) for b in blocks},
                             self.comm.world_size)

    def _add_layer(self, name: str, module: nn.Module, adapter: LayerAdapter, group: int,
                   owned: bool = True) -> None:
        dev = module.weight.device
        placement = self.config["placement"] if self.comm.world_size > 1 else "replicated"
        if owned:
            seen = adapter if self.comm.world_size == 1 else ReducingAdapter(
                adapter, self.comm, name, strict=self._owner_mode)
            ctx = LayerContext(name, seen, self.factor_dtype, dev, self.builder, self.comm,
                               placement)
            precond = self.builder.preconditioner(self.config, ctx)
        else:  # another rank owns it: a state-free copy that evaluates its batch_means
            ctx = LayerContext(name, adapter, self.factor_dtype, torch.device("meta"),
                               self.builder, self.comm, placement)
            try:
                precond = self.builder.preconditioner(self.config, ctx)
            except Exception as exc:
                raise ConfigError(
                    f"placement=owner: preconditioner {self.config['preconditioner']['name']!r} "
                    f"cannot be built on the meta device for the layers this rank does not own "
                    f"({type(exc).__name__}: {exc}); use placement=replicated") from None
        if self._owner_mode and not precond.supports_owner_placement():
            raise ConfigError(
                f"placement=owner is not supported by this configuration's preconditioner "
                f"({_family(self.config)}): it does not declare every statistic it averages "
                "over the ranks (batch_means); use placement=replicated")
        hooks = CaptureHooks(module, adapter, keep_grad_output="grad_outputs" in precond.needs,
                             keep_output="sampled_grads" in precond.needs)
        mdev = dev if owned else torch.device("meta")
        zeros = torch.zeros((adapter.d_g, adapter.d_a), dtype=self.factor_dtype, device=mdev)
        flag = initial_started(self.config, dev)
        count = torch.zeros((), dtype=torch.long, device=dev)
        self.layers[name] = Layer(name, module, adapter, hooks, precond, group, zeros, flag,
                                  count, owned=owned,
                                  reducer=ctx.adapter if isinstance(ctx.adapter, ReducingAdapter)
                                  else None)

    def closure(self, x: Any, y: Any) -> Callable[[], Tensor]:
        """The closure for ``step``: zero the gradients, loss = ``self.loss(model(x), y)``,
        backward, return the loss -- with the loss given to build_optimizer, the one the
        Fisher belongs to."""
        if self.loss is None:
            raise KfqnError("opt.closure needs the training loss: build the optimizer with "
                            "build_optimizer(model, spec, loss=...)")
        model, loss_fn = self._called, self.loss

        def closure() -> Tensor:
            self.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            return loss
        return closure

    def add_param_group(self, param_group: dict) -> None:  # noqa: D102
        if hasattr(self, "layers"):
            raise KfqnError("kfqn optimizers are bound to their model's layers; build a new "
                            "optimizer (build_optimizer(..., param_groups=[...])) instead of "
                            "add_param_group")
        super().add_param_group(param_group)

    def remove_hooks(self) -> None:
        """Detach all capture hooks from the model."""
        for layer in self.layers.values():
            layer.hooks.remove()
        if self._output_hook is not None:
            self._output_hook.remove()
            self._output_hook = None

    # -- reporting -----------------------------------------------------------------------------
    @property
    def preconditioned_modules(self) -> list[str]:
        """Names of the modules this optimizer preconditions."""
        return list(self.layers)

    def describe(self) -> str:
        """A few lines: preset, preconditioned modules, fallback parameters, unsupported ones."""
        lines = [f"kfqn optimizer {self.config['name']!r}: {len(self.layers)} preconditioned "
                 f"module(s), {len(self.fallback_params)} fallback parameter(s)"]
        for name, layer in self.layers.items():
            where = ""
            if self._owner_mode:
                where = " (factors on this rank)" if layer.owned else " (factors on another rank)"
            lines.append(f"  {name}: {type(layer.module).__name__} d_a={layer.adapter.d_a} "
                         f"d_g={layer.adapter.d_g}{where}")
        if self.fallback_params:
            lines.append(f"  fallback ({self.config['fallback']['name']}): "
                         + ", ".join(self.fallback_params))
        for name, reason in self.unsupported.items():
            lines.append(f"  not preconditioned: {name}: {reason}")
        return "\n".join(lines)

    @property
    def needs_warm_start(self) -> bool:
        """Whether :meth:`warm_start` should be run before training."""
        return not self._warm_started and any(l.precond.needs_warm_start for l in self.layers.values())

    def _lambdas(self, layer: Layer) -> tuple[float, float]:
        """(lambda_A, mu2) for a layer: sqrt(lambda) each, or the |T| split for conv layers."""
        lam = float(self.param_groups[layer.group]["damping"])
        t = layer.positions
        if t > 1 and self.config["conv_damping_split"] == "sqrt_T":
            return math.sqrt(lam * t), math.sqrt(lam / t)
        return math.sqrt(lam), math.sqrt(lam)

    # -- warm start ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def warm_start(self) -> Iterator["KFQNOptimizer"]:
        """Forward-only pass that initialises A factors (docs/algorithms.md §3)::

            with opt.warm_start():
                for x, _ in loader:
                    model(x)

        Runs under ``torch.no_grad``; BatchNorm running statistics are restored afterwards.
        """
        targets = [l for l in self.layers.values() if l.precond.needs_warm_start]
        bn = self._save_running_stats()
        for layer in self.layers.values():
            layer.hooks.phase = "warm" if layer in targets else None
            if layer in targets:
                def cb(inp: Tensor, layer: Layer = layer) -> None:
                    layer.positions = layer.adapter.positions(inp)
                    if self.comm.world_size > 1:
                        self._reduce_warm_batch(layer, inp)
                    if layer.owned:
                        layer.precond.warm_accumulate(inp)
                layer.hooks.on_warm = cb
        try:
            with torch.no_grad():
                yield self
        finally:
            for layer in self.layers.values():
                layer.hooks.phase = "current"
                layer.hooks.on_warm = None
            self._restore_running_stats(bn)
        for layer in targets:
            if layer.owned:
                layer.precond.warm_finish(self._lambdas(layer)[0])
            if layer.reducer is not None:
                layer.reducer.memo = {}
        self._warm_started = True

    def _reduce_warm_batch(self, layer: Layer, inp: Tensor) -> None:
        """Data-parallel warm start: the statistics the layer declared for a warm-start batch,
        averaged over the ranks (one call per layer and batch; every rank runs the same forward,
        so the calls line up)."""
        plan = layer.precond.batch_means("warm", self._step_count)
        if not plan:
            return
        cap = SimpleNamespace(inp=inp)
        reduced = self.comm.mean_many([local(layer.adapter, cap) for local in plan.values()])
        if layer.reducer is not None:
            layer.reducer.memo = dict(zip(plan, reduced))

    # -- model state around the trial pass -----------------------------------------------------
    def _save_running_stats(self) -> list[tuple[Tensor, Tensor]]:
        saved = []
        for module in self.model.modules():
            if getattr(module, "track_running_stats", False):
                for buf in module.buffers(recurse=False):
                    saved.append((buf, buf.clone()))
        return saved

    @staticmethod
    def _restore_running_stats(saved: list[tuple[Tensor, Tensor]]) -> None:
        with torch.no_grad():
            for buf, copy in saved:
                buf.copy_(copy)

    def _all_params(self) -> list[Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def _trial_pass(self, closure: Callable[[], Any], rng_before: Any, rng_after: Any) -> None:
        """Closure at theta+ on the same minibatch; leaves grads, BN statistics and RNG as found.

        Only h and dL/dh of the preconditioned layers are needed at theta+, so every parameter
        is frozen (``requires_grad=False``) for this pass and the capture hooks make the layer
        outputs the gradient leaves: the backward skips all weight-gradient products, about a
        third of a forward-backward's work. The closure must then not read parameter gradients
        (they are None during this pass); config ``trial_pass_grads: all`` runs it unchanged."""
        params = self._all_params()
        grads = [p.grad for p in params]
        outputs_only = self.config.get("trial_pass_grads", "layer_outputs") == "layer_outputs"
        frozen = [p for p in self.model.parameters() if p.requires_grad] if outputs_only else []
        for p in params:
            p.grad = None
        for p in frozen:
            p.requires_grad_(False)
        bn = self._save_running_stats()
        _set_rng_state(rng_before)
        for layer in self.layers.values():
            layer.hooks.reset("trial")
            layer.hooks.phase = "trial"
            layer.hooks.force_grad = outputs_only
        try:
            sync_off = self._ddp.no_sync() if self._ddp is not None else contextlib.nullcontext()
            with torch.enable_grad(), sync_off:
                closure()
        except (TypeError, AttributeError, RuntimeError) as err:
            if not outputs_only:
                raise
            raise KfqnError(
                f"the closure failed in the extra pass at theta+ ({type(err).__name__}: {err}). "
                "In that pass the parameters are frozen and their .grad is None "
                "(trial_pass_grads=layer_outputs); if the closure reads parameter gradients or "
                "differentiates with respect to them, set trial_pass_grads=all") from err
        finally:
            for layer in self.layers.values():
                layer.hooks.phase = "current"
                layer.hooks.force_grad = False
            for p in frozen:
                p.requires_grad_(True)
            for p, g in zip(params, grads):
                p.grad = g
            self._restore_running_stats(bn)
            _set_rng_state(rng_after)

    # -- auxiliary backward from the model output (G estimators with needs_sampled_grads) --------
    def _on_model_output(self, module: nn.Module, inputs: tuple, output: Any) -> None:
        """Forward hook on the root model: before the user's backward, backpropagate the
        cotangents the G estimators ask for (``output_cotangents``; e.g. the gradient of the loss
        at labels sampled from the model, docs/algorithms.md §4 K-FAC) from the model output to every captured
        layer output h, into ``Capture.sampled_grad_out`` (R, *h.shape). Capture hooks are muted
        meanwhile, so the true-label quantities come from the user's backward alone."""
        if (not self._sampling_layers or not torch.is_grad_enabled()
                or not isinstance(output, Tensor) or not output.requires_grad):
            return  # e.g. evaluation; the estimators explain a missing result in prepare
        # one config: the first layer's preconditioner speaks for all (the first one this rank
        # holds, under placement=owner; every layer counts the same accepted steps)
        owner = next((l.precond for l in self._sampling_layers if l.owned), None)
        if owner is None:   # placement=owner, this rank's sampling layers all released
            raise KfqnError(
                f"placement=owner: rank {self.comm.rank} no longer owns a layer that draws the "
                "Fisher's labels (its layers were released to the fallback); use "
                "placement=replicated")
        if not owner.wants_sampled_grads(self._step_count):
            return
        layers = [l for l in self._sampling_layers
                  if l.hooks.phase == "current" and l.hooks.slots["current"].out is not None]
        if not layers:
            return
        with torch.no_grad():
            cotangents = owner.output_cotangents(output.detach())
        outs = [l.hooks.slots["current"].out for l in layers]
        for layer in self.layers.values():
            layer.hooks.muted = True
        try:
            grads = [torch.autograd.grad(output, outs, grad_outputs=v, retain_graph=True,
                                         allow_unused=True) for v in cotangents]
        finally:
            for layer in self.layers.values():
                layer.hooks.muted = False
        for i, layer in enumerate(layers):
            per = [g[i] for g in grads]
            layer.hooks.slots["current"].sampled_grad_out = (
                None if any(g is None for g in per) else torch.stack([g.detach() for g in per]))

    # -- the step --------------------------------------------------------------------------------
    def _covered_buckets(self, active: list[Layer]) -> list[FlatBucket]:
        """The buckets whose every layer is active this step (the batched direction path)."""
        if self._owner_mode:
            return []
        ids = {id(l) for l in active}
        return [bucket for bucket in self._buckets if bucket.covers(ids)]

    def _finite_flag(self, loss: Tensor | None, covered: list[FlatBucket] = ()) -> Tensor:
        """Device bool: the loss and every gradient are finite (:mod:`kfqn.core.finite`); the
        gradients of the ``covered`` buckets' layers through their gathered work buffers (one
        sum for all of them)."""
        dev = self._device()
        seen = {id(t) for b in covered for t in b.targets}
        rest = [p.grad for p in self._all_params() if p.grad is not None and id(p) not in seen]
        if covered and not rest:  # every gradient in the work buffers: one sum each, plus loss
            total = covered[0].work.sum()
            for bucket in covered[1:]:
                total = total + bucket.work.sum()
            if loss is not None:
                total = total + torch.as_tensor(loss, device=dev)
            return finite_scalar(total)
        checks = [b.work for b in covered] + rest
        if loss is not None:
            checks.append(torch.as_tensor(loss, device=dev).detach())
        return all_finite_many(checks, dev)

    def _collect_statistics(self) -> tuple[list[Layer], StepStatistics]:
        """The layers that delivered statistics this step, and those statistics: the one place
        where a step's layer statistics come together (:mod:`kfqn.core.statistics`)."""
        self._release_uncaptured()
        active = []
        stats = StepStatistics()
        for layer in self.layers.values():
            cap = layer.hooks.slots["current"]
            if cap.calls > 1:
                raise KfqnError(
                    f"module {layer.name!r} ran {cap.calls} forward passes since the last step; "
                    "kfqn needs exactly one forward and backward per step (weight sharing, "
                    "repeated calls and gradient accumulation are not supported)")
            if cap.calls:
                layer.captured = True
            if cap.complete and layer.module.weight.grad is not None:
                layer.positions = cap.positions
                active.append(layer)
                stats[layer.name] = LayerStatistics(cap)
        return active, stats

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # noqa: C901
        """One optimisation step. See the class docstring for the closure contract."""
        if closure is None and self._needs_trial:
            raise KfqnError(
                f"preset {self.config['name']!r} uses g_side.source=extra_pass, which re-evaluates "
                "the minibatch at the trial point: call step(closure) with a closure that zeroes "
                "grads, runs forward and backward and returns the loss, or set "
                "g_side.source=next_iterate")
        times: dict[str, float] = {}
        t0 = time.perf_counter()
        loss = None
        rng_before = rng_after = None
        if closure is not None:
            for layer in self.layers.values():
                layer.hooks.reset("current")
            rng_before = _rng_state()
            with torch.enable_grad():
                loss = closure()
            rng_after = _rng_state()
        t1 = time.perf_counter()
        times["forward_backward"] = t1 - t0
        active, statistics = self._collect_statistics()
        if active and self.needs_warm_start and not self._warned_no_warm:
            key = ("a_side.warm_start" if "a_side" in self.config
                   else "preconditioner.warm_start")
            warnings.warn(
                f"{self.config['name']}: A factors start from the first batch because "
                "opt.warm_start() was not run before training (docs/algorithms.md §3 warm "
                f"start); set {key}=false to make this the intended behaviour", stacklevel=2)
            self._warned_no_warm = True
        with torch.no_grad():
            covered = self._covered_buckets(active)
            for bucket in covered:  # the homogeneous gradients, into the flat work buffers
                bucket.gather_grads()
            ok = self._finite_flag(loss, covered)
            if self.comm.world_size > 1:
                ok = self._reduce_round(active, "current", ok)
            self.nonfinite_steps.add_(~ok)
            infos: dict[str, StepInfo] = {}
            for layer in active:
                lam_a, mu2 = self._lambdas(layer)
                info = StepInfo(ok, self._step_count, lam_a, mu2)
                infos[layer.name] = info
            self._by_family("prepare", active, statistics, infos)
            t2 = time.perf_counter()
            times["factor_updates"] = t2 - t1
            self._precondition_and_move(active, ok, covered)
            t3 = time.perf_counter()
            times["precondition"] = t3 - t2
            for fallback in self._fallbacks():
                fallback.step(ok)
            t4 = time.perf_counter()
            times["fallback"] = t4 - t3
            trial_next = bool(self._needs_trial and active and closure is not None)
            # data-parallel: the statistics declared for after the move ('moved', e.g. the
            # Hessian action at s_a = H_a v) travel in the extra pass's round when there is one,
            # and after_move runs after it (the extra pass does not read the factors)
            deferred = self.comm.world_size > 1 and trial_next
            if not deferred:
                if self.comm.world_size > 1:
                    self._reduce_round(active, "moved")
                self._after_move(active, statistics, infos)
            t5 = time.perf_counter()
            times["factor_updates"] += t5 - t4
        if trial_next:
            self._trial_pass(closure, rng_before, rng_after)
            t6 = time.perf_counter()
            times["extra_pass"] = t6 - t5
            t5 = t6
            with torch.no_grad():
                if deferred:
                    self._reduce_round(active, "trial", also="moved")
                    self._after_move(active, statistics, infos)
                for layer in active:
                    statistics[layer.name].trial = layer.hooks.slots["trial"]
                self._by_family("after_trial", active, statistics, infos)
        with torch.no_grad():
            self._by_family("end_step", active, statistics, infos)
        for layer in self.layers.values():  # drop references to activations
            layer.hooks.reset("current")
            layer.hooks.reset("trial")
            if layer.reducer is not None:
                layer.reducer.memo = {}
        times["factor_updates"] += time.perf_counter() - t5
        times["total"] = time.perf_counter() - t0
        self.last_phase_times = times
        self._step_count += 1
        return loss

    def _after_move(self, active: list[Layer], statistics: StepStatistics,
                    infos: dict[str, StepInfo]) -> None:
        self._by_family("after_move", active, statistics, infos)

    @staticmethod
    def _by_family(hook: str, active: list[Layer], statistics: StepStatistics,
                   infos: dict[str, StepInfo]) -> None:
        """``<hook>_group`` of each preconditioner class, once, with every layer of that class
        this rank holds (in layer order): a family may batch its per-layer work across the
        layers (:meth:`LayerPreconditioner.prepare_group`)."""
        groups: dict[type, list[Layer]] = {}
        for layer in active:
            if layer.owned:
                groups.setdefault(type(layer.precond), []).append(layer)
        for cls, members in groups.items():
            getattr(cls, f"{hook}_group")([l.precond for l in members],
                                          [statistics[l.name] for l in members],
                                          [infos[l.name] for l in members])

    def _reduce_round(self, active: list[Layer], phase: str, ok: Tensor | None = None,
                      also: str | None = None) -> Tensor | None:
        """Data-parallel: the one all-reduce of a pass ('current', 'trial'; 'moved': after the
        move, or ``also`` with the trial pass). It averages the h and g means the capture
        hooks recorded, every statistic the layers' preconditioners declared for the phase
        (``batch_means``; evaluated by every rank for every layer, owned or not; 'moved' ones
        by the owners, from the current capture) and the non-finite flag; the preconditioners
        then read their averages from their ReducingAdapter's memo (kept until the step ends).
        Returns the global flag (true only if true on every rank). No call when there is
        nothing to average (the same on every rank)."""
        cur = [l.hooks.slots["current"] for l in active]
        caps = [l.hooks.slots[phase] for l in active] if phase != "moved" else []
        tensors: list[Tensor] = []
        where: list[tuple[Any, str]] = []
        for cap in caps:
            for key in ("h_mean", "g_mean"):
                if getattr(cap, key) is not None:
                    tensors.append(getattr(cap, key))
                    where.append((cap, key))
        declared: list[tuple[Layer, str]] = []
        for ph in (phase, also) if also else (phase,):
            for layer, cap in zip(active, caps if ph != "moved" else cur):
                for key, local in layer.precond.batch_means(ph, self._step_count).items():
                    tensors.append(local(layer.adapter, cap))
                    declared.append((layer, key))
        if ok is not None:
            tensors.append((~ok).to(torch.float32).reshape(1))
        if not tensors:
            return None if ok is None else ok
        reduced = self.comm.mean_many(tensors)
        for (cap, key), t in zip(where, reduced):
            setattr(cap, key, t)
        for (layer, key), t in zip(declared, reduced[len(where):]):
            if layer.reducer is not None:
                layer.reducer.memo[key] = t
        return None if ok is None else reduced[-1][0] == 0

    def _precondition_and_move(self, active: list[Layer], ok: Tensor,
                               covered: list[FlatBucket] = ()) -> None:
        """Momentum, direction and move of the active layers: batched per param group
        (:class:`~kfqn.core.flat_step.FlatBucket`) when all of a group's layers are active and
        the parameters have the factor dtype; else layer by layer, on the same state."""
        form = self.config["momentum_form"]
        inside = self.config["weight_decay_mode"] == "inside"
        done: set[int] = set()
        for bucket in covered:
            group = self.param_groups[bucket.layers[0].group]
            rho = float(group["momentum"])
            bucket.step(ok, float(group["lr"]), rho, (1.0 - rho) if form == "ema" else 1.0,
                        float(group["weight_decay"]), inside,
                        [l.precond.precondition_t_into for l in bucket.layers])
            done.update(id(l) for l in bucket.layers)
        rest = [l for l in active if id(l) not in done]
        self._precondition_and_move_layers(rest, ok)

    def _precondition_and_move_layers(self, active: list[Layer], ok: Tensor) -> None:
        """The same as :class:`~kfqn.core.flat_step.FlatBucket`'s step, one layer at a time
        (and under ``placement: owner``, with the directions exchanged before the move)."""
        form = self.config["momentum_form"]
        inside = self.config["weight_decay_mode"] == "inside"
        dt = self.factor_dtype
        directions: dict[str, Tensor] = {}
        for layer in active:
            if not layer.owned:
                continue
            group = self.param_groups[layer.group]
            wd = float(group["weight_decay"])
            grad = layer.adapter.homogeneous_grad().to(dt)
            wbar = layer.adapter.homogeneous_weight().to(dt) if wd else None
            if wbar is not None and inside:
                grad = grad.add(wbar, alpha=wd)
            momentum_update_(layer.momentum, grad, layer.started, float(group["momentum"]),
                             form, ok)
            layer.started |= ok
            # the step is -lr * (H_g Mhat H_a [+ tau Wbar outside]), zero if not finite;
            # computed transposed, (d_a, d_g), where the BLAS products run faster (apply_t)
            precond = layer.precond.precondition_t(layer.momentum.T).T
            if wbar is not None and not inside:
                precond = precond.add(wbar, alpha=wd)
            good = ok & all_finite(precond)
            layer.dir_rejected.add_(ok > good)                # ok and not good
            precond = torch.where(good, precond, const(0.0, dt, precond.device))
            if self._owner_mode:
                directions[layer.name] = precond
            else:
                self._move(layer, precond)
        if self._owner_mode and active:
            directions = self._exchange_directions(active, directions)
            for layer in active:
                self._move(layer, directions[layer.name])

    def _move(self, layer: Layer, direction: Tensor) -> None:
        """theta <- theta - lr * P for the layer's parameters."""
        lr = float(self.param_groups[layer.group]["lr"])
        for p, d in zip(layer.adapter.targets(), layer.adapter.split(direction)):
            p.add_(d.to(p.dtype), alpha=-lr)

    def _exchange_directions(self, active: list[Layer],
                             own: dict[str, Tensor]) -> dict[str, Tensor]:
        """``placement: owner``: every layer's direction on every rank, with one all-reduce of a
        flat buffer in which each rank wrote the layers it owns (zeros elsewhere, so the sum is
        the owner's values exactly)."""
        sizes = [l.adapter.d_g * l.adapter.d_a for l in active]
        flat = torch.zeros(sum(sizes), dtype=self.factor_dtype, device=self._device())
        offset = 0
        for layer, n in zip(active, sizes):
            if layer.name in own:
                flat[offset:offset + n].copy_(own[layer.name].reshape(-1))
            offset += n
        self.comm.sum_(flat)
        out, offset = {}, 0
        for layer, n in zip(active, sizes):
            out[layer.name] = flat[offset:offset + n].view(layer.adapter.d_g, layer.adapter.d_a)
            offset += n
        return out

    # -- analysis ------------------------------------------------------------------------------
    def stats(self) -> dict[str, dict[str, float]]:
        """Per-layer figures of the last step (host values; call outside the step).

        Keys per layer: ``sy``/``sy_raw`` (damped/undamped s^T y of the G pair), damping
        activations, ``g_rejected``/``a_rejected`` (cumulative rejected factor updates),
        ``dir_rejected`` (cumulative rejected directions), ``H_a_norm``/``H_g_norm`` (Frobenius).
        Key ``_global``: ``step`` and ``nonfinite_steps``.
        """
        out: dict[str, dict[str, float]] = {}
        for name, layer in self.layers.items():
            if not layer.owned:  # placement=owner: the rank that owns it reports it
                continue
            row = {k: float(v) for k, v in layer.precond.stats().items()}
            row["dir_rejected"] = float(layer.dir_rejected)
            for key, mat in self._factor_dict(layer).items():
                if key.startswith("H_"):
                    row[f"{key}_norm"] = float(torch.linalg.matrix_norm(mat))
            out[name] = row
        out["_global"] = {"step": float(self._step_count),
                          "nonfinite_steps": float(self.nonfinite_steps)}
        return out

    @staticmethod
    def _factor_dict(layer: Layer) -> dict[str, Tensor]:
        return layer.precond.factors()

    def factors(self) -> dict[str, dict[str, Tensor]]:
        """Per-layer dense factors: H_a, H_g, and A (and G) where the method keeps them."""
        return {name: self._factor_dict(layer) for name, layer in self.layers.items()
                if layer.owned}

    def state_bytes(self) -> int:
        """Bytes of optimizer state: factors, pair buffers, momentum of every parameter."""
        total = 0
        for layer in self.layers.values():
            if not layer.owned:  # placement=owner: held by another rank
                continue
            total += layer.precond.state_bytes()
            total += layer.momentum.numel() * layer.momentum.element_size()
        for fallback in self._fallbacks():
            fallback_bytes = getattr(fallback, "state_bytes", None)
            if fallback_bytes is not None:
                total += fallback_bytes()
            else:
                for t in fallback.state_dict().get("buf", {}).values():
                    total += t.numel() * t.element_size()
        return total

    # -- torch.optim's per-parameter state ----------------------------------------------------
    @property
    def state(self) -> dict[Tensor, dict[str, Tensor]]:
        """torch.optim's ``opt.state``: parameter -> its state tensors, here a live view of the
        tensors kfqn updates in place (the same objects, not copies): for a preconditioned
        layer's parameters ``momentum``, ``started``, ``dir_rejected`` and its preconditioner's
        state under ``precond.<path>`` (a grouped conv's parameters carry every block's, keys
        prefixed ``<block>/``); for fallback parameters the rule's tensors (``buf``, ``m``,
        ``v``, ...). Under ``placement: owner`` only the layers this rank owns. A layer's
        factors are not per-parameter quantities: the weight's and the bias's entries are the
        same tensors. Checkpoints go through :meth:`state_dict` (keyed by names)."""
        view: dict[Tensor, dict[str, Tensor]] = {}
        blocks: dict[int, int] = {}
        for layer in self.layers.values():
            for p in layer.adapter.params():
                blocks[id(p)] = blocks.get(id(p), 0) + 1
        for layer in self.layers.values():
            if not layer.owned:
                continue
            entry = {"momentum": layer.momentum, "started": layer.started,
                     "dir_rejected": layer.dir_rejected}
            _flat_tensors(layer.precond.state_dict(), "precond", entry)
            for p in layer.adapter.params():
                prefix = f"{layer.name}/" if blocks[id(p)] > 1 else ""
                view.setdefault(p, {}).update({prefix + k: v for k, v in entry.items()})
        params = {n: p for n, p in self.model.named_parameters()}
        for fallback in self._fallbacks():
            for kind, per_name in fallback.state_dict().items():
                if isinstance(per_name, dict):
                    for name, t in per_name.items():
                        if name in params and isinstance(t, Tensor):
                            view.setdefault(params[name], {})[kind] = t
        return view

    @state.setter
    def state(self, value: Any) -> None:
        """torch.optim.Optimizer.__init__ assigns an empty dict; kfqn's state lives elsewhere."""

    # -- checkpoints ---------------------------------------------------------------------------
    def _model_signature(self) -> dict[str, Any]:
        """What the checkpoint was written for: every trainable parameter's shape and dtype, and
        the type of every preconditioned module (a conv kernel 3x3 and 1x9 have the same factor
        sizes; this tells them apart)."""
        return {"params": {n: [list(p.shape), str(p.dtype)]
                           for n, p in self.model.named_parameters() if p.requires_grad},
                "modules": {n: type(l.module).__name__ for n, l in self.layers.items()}}

    def state_dict(self) -> dict[str, Any]:
        """Checkpoint keyed by module and parameter names (portable to a fresh model).

        Under ``placement: owner`` every rank must call it (a collective): each layer's entry
        comes from the rank that owns it, and every rank returns the whole checkpoint, which
        loads under any number of ranks and either placement."""
        out = self._state_dict()
        if self._owner_mode:
            mine = {n: clone_tree(e, "cpu") for n, e in out["layers"].items() if self.layers[n].owned}
            gathered: dict[str, Any] = {}
            for part in self.comm.gather_objects(mine):
                gathered.update(part)
            out["layers"] = {n: (out["layers"][n] if self.layers[n].owned else gathered[n])
                             for n in out["layers"]}
        return out

    def _state_dict(self) -> dict[str, Any]:
        """:meth:`state_dict` of this rank alone: under ``placement: owner`` the layers it does
        not own hold their ``meta`` copies' state (shapes and dtypes only; for checks)."""
        pnames = {id(p): n for n, p in self.model.named_parameters()}
        groups = []
        for g in self.param_groups:
            entry = {k: v for k, v in g.items() if k != "params"}
            entry["param_names"] = [pnames[id(p)] for p in g["params"]]
            groups.append(entry)
        layers = {}
        for name, layer in self.layers.items():
            layers[name] = {"precond": layer.precond.state_dict(),
                            "momentum": layer.momentum, "started": layer.started,
                            "dir_rejected": layer.dir_rejected}
        return {"format": STATE_FORMAT, "config": self.config, "step": self._step_count,
                "warm_started": self._warm_started, "param_groups": groups, "layers": layers,
                "fallback": self.fallback.state_dict(), "nonfinite_steps": self.nonfinite_steps,
                "released": [[names, fb.state_dict()] for names, fb in self._late_fallbacks],
                "unsupported": dict(self.unsupported), "model": self._model_signature()}

    def _check_checkpoint(self, state_dict: Any) -> None:
        """Everything :meth:`load_state_dict` checks before it changes anything (one line)."""
        fmt = state_dict.get("format") if isinstance(state_dict, dict) else None
        if fmt in OLD_FORMATS:
            raise KfqnError(f"this checkpoint has format {fmt!r} ({OLD_FORMATS[fmt]}); this kfqn "
                            f"reads {STATE_FORMAT!r}. Restart the run from the model weights "
                            "with a new optimizer, or load it with the kfqn that wrote it; "
                            "nothing was loaded")
        if not isinstance(state_dict, dict) or fmt != STATE_FORMAT:
            raise KfqnError(f"not a kfqn optimizer checkpoint (expected format {STATE_FORMAT!r})")
        theirs, ours = state_dict.get("config"), self.config
        if not isinstance(theirs, dict):
            raise KfqnError("checkpoint does not fit this optimizer: state.config is missing; "
                            "nothing was loaded")
        diff = sorted(k for k in set(theirs) | set(ours)
                      if k not in HYPER_KEYS and theirs.get(k) != ours.get(k))
        if diff:
            raise KfqnError(f"checkpoint was written by a differently configured optimizer; keys "
                            f"that differ: {', '.join(diff)}. Build the optimizer with the "
                            "checkpoint's config (state_dict()['config']).")
        sig, mine = state_dict.get("model"), self._model_signature()
        if isinstance(sig, dict):
            for kind in ("params", "modules"):
                got, want = sig.get(kind, {}), mine[kind]
                released = {n for names, _ in state_dict.get("released", []) for n in names}
                for name in sorted(set(got) | set(want)):
                    if kind == "modules" and name in released:
                        continue
                    if got.get(name) != want.get(name):
                        raise KfqnError(
                            f"checkpoint does not fit this model: {kind[:-1]} {name!r} is "
                            f"{_describe(got.get(name))} in the checkpoint, "
                            f"{_describe(want.get(name))} here; nothing was loaded")
        layers = state_dict.get("layers")
        if not isinstance(layers, dict):
            raise KfqnError("checkpoint does not fit this optimizer: state.layers is missing; "
                            "nothing was loaded")
        released = [names for names, _ in state_dict.get("released", [])]
        mine_released = [names for names, _ in self._late_fallbacks]
        will_release = [n for names in released if names not in mine_released for n in names]
        unknown = [n for n in will_release if n not in self.layers]
        expected_layers = set(self.layers) - set(will_release)
        missing = sorted(expected_layers - set(layers))
        extra = sorted(set(layers) - expected_layers) + unknown
        if missing or extra:
            raise KfqnError(f"checkpoint layers do not match this model: missing {missing}, "
                            f"unexpected {extra}; nothing was loaded")
        pnames = {id(p): n for n, p in self.model.named_parameters()}
        saved_groups = state_dict.get("param_groups")
        if not isinstance(saved_groups, list) or len(saved_groups) != len(self.param_groups):
            raise KfqnError("checkpoint has a different number of param groups; nothing was "
                            "loaded")
        for i, (g, saved) in enumerate(zip(self.param_groups, saved_groups)):
            if not isinstance(saved, dict) or \
                    [pnames[id(p)] for p in g["params"]] != saved.get("param_names"):
                raise KfqnError(f"checkpoint param_groups[{i}] holds different parameters; "
                                "nothing was loaded")
            for key in GROUP_KEYS:
                if key in saved:
                    validate_param_group(i, {key: saved[key]})
        expected = self._state_dict()
        for name in will_release:
            expected["layers"].pop(name)
        expected["released"] = []
        for names, _ in state_dict.get("released", []):
            mine_fb = next((fb for n, fb in self._late_fallbacks if n == names), None)
            if mine_fb is None:
                mine_fb = self._make_fallback(self._entries_of(names))
            expected["released"].append([names, mine_fb.state_dict()])
        check_like(expected, state_dict)

    def _entries_of(self, layer_names: list[str]) -> list:
        """(name, parameter, group) of the parameters of these layers, each once (the blocks of
        one module share its parameters)."""
        pnames = {id(p): n for n, p in self.model.named_parameters()}
        out, seen = [], set()
        for n in layer_names:
            for p in self.layers[n].adapter.params():
                if id(p) not in seen:
                    seen.add(id(p))
                    out.append((pnames[id(p)], p, self.param_groups[self.layers[n].group]))
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a checkpoint from :meth:`state_dict`.

        Every tensor is checked first (shape, dtype, the parameter and module it belongs to):
        a mismatch raises one :class:`KfqnError` line naming the first one, and nothing is
        loaded; a failure while loading rolls back to the state before. As in ``torch.optim``,
        the checkpoint's hyper-parameters (lr, momentum, weight_decay, damping of each param
        group) replace those this optimizer was built with, so that a resumed run continues
        exactly; a warning names each one that differs (set them after loading to change them).
        """
        self._check_checkpoint(state_dict)
        for i, (g, saved) in enumerate(zip(self.param_groups, state_dict["param_groups"])):
            changed = [f"{k}={saved[k]!r} (was {g[k]!r})" for k in GROUP_KEYS
                       if k in saved and k in g and saved[k] != g[k]]
            if changed:
                warnings.warn(f"load_state_dict: param_groups[{i}] takes the checkpoint's "
                              f"{', '.join(changed)}; set them after loading to change them",
                              stacklevel=2)
        for names, _ in state_dict.get("released", []):
            if all(n in self.layers for n in names):
                self._release(names, state_dict.get("unsupported", {}).get(
                    names[0], "released by the checkpoint's optimizer"))
        snapshot = clone_tree(self._state_dict())
        try:
            self._load_checked(state_dict)
        except Exception as exc:
            self._load_checked(snapshot)
            raise KfqnError(f"checkpoint could not be loaded ({type(exc).__name__}: {exc}); "
                            "the optimizer state is as it was") from None

    def _load_checked(self, state_dict: dict[str, Any]) -> None:
        for g, saved in zip(self.param_groups, state_dict["param_groups"]):
            for k, v in saved.items():
                if k != "param_names":
                    g[k] = v
        for name, layer in self.layers.items():
            if not layer.owned:  # placement=owner: its owner loads it
                continue
            s = state_dict["layers"][name]
            layer.precond.load_state_dict(s["precond"])
            # into the flat buffers' views (shapes checked by _check_checkpoint)
            layer.momentum.copy_(s["momentum"])
            layer.started.copy_(s["started"])
            layer.dir_rejected.copy_(s["dir_rejected"])
        self.fallback.load_state_dict(state_dict["fallback"])
        for (_, fb), (_, state) in zip(self._late_fallbacks, state_dict.get("released", [])):
            fb.load_state_dict(state)
        self._step_count = int(state_dict["step"])
        self._warm_started = bool(state_dict["warm_started"])
        self.nonfinite_steps = state_dict["nonfinite_steps"].to(self._device()).clone()
