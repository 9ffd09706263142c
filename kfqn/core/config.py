"""Optimizer configuration: loading presets, merging overrides, validating every key.

A config is a nested mapping. Top-level keys are listed in :data:`TOP_LEVEL`; ``a_side``,
``g_side`` and ``fallback`` (and their nested ``update`` / ``damping`` / ``inversion``) are
component sections ``{name: <registered name>, <that component's options>}``, or just the name.
``preset: NAME`` (alias ``base``) starts from a registered preset and overrides it.

Merging rule: a section whose ``name`` changes is replaced, not merged, so switching a component
resets its options to the new component's defaults plus whatever is given beside the new name.
Everything is checked before anything is built: unknown keys, unknown component names and
out-of-range values raise :class:`~kfqn.core.errors.ConfigError` naming the key and the allowed
values.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from omegaconf import DictConfig, OmegaConf

from kfqn.core.components import Option
from kfqn.core.errors import ConfigError, RegistryError
from kfqn.core.registry import Registry, close_matches
from kfqn.core.sections import Sub

TOP_LEVEL: dict[str, Option | Sub] = {
    "name": Option("custom", "name of this configuration", type=str),
    "description": Option("", "one line describing it", type=str),
    "lr": Option(0.1, "learning rate alpha (param-group default)", type=float, low=0.0),
    "momentum": Option(0.9, "momentum rho (param-group default)", type=float, low=0.0, high=1.0,
                       open_high=True),
    "momentum_form": Option("ema", "'ema': Mhat <- rho Mhat + (1-rho) G; 'torch': Mhat <- rho Mhat + G"
                            "",
                            choices=["ema", "torch"]),
    "momentum_init": Option("zero", "start of the momentum buffer: 'zero' (Mhat_0 = 0, so "
                            "Mhat_1 = (1-rho) G_1 in the ema form; the P2 authors' code) or "
                            "'first' (Mhat_1 = G_1, like torch.optim.SGD)",
                            choices=["zero", "first"]),
    "weight_decay": Option(0.0, "L2 coefficient tau (param-group default)", type=float, low=0.0),
    "weight_decay_mode": Option("inside", "'inside': tau*theta added to the gradient before "
                                "momentum and preconditioning; 'outside': -tau*theta added to P",
                                choices=["inside", "outside"]),
    "damping": Option(0.3, "lambda; sqrt(lambda) goes to each factor (param-group default)",
                      type=float, low=0.0, open_low=True),
    "conv_damping_split": Option("sqrt", "conv layers: 'sqrt' gives sqrt(lambda) to A and G; "
                                 "'sqrt_T' gives sqrt(lambda*|T|) to A, sqrt(lambda/|T|) to G",
                                 choices=["sqrt", "sqrt_T"]),
    "factor_dtype": Option("float32", "dtype of factors and momentum",
                           choices=["float32", "float64"]),
    "unsupported": Option("warn", "weight-bearing modules no adapter can take: train them with "
                          "the fallback silently, with a warning, or raise",
                          choices=["fallback", "warn", "error"]),
    "trial_pass_grads": Option("layer_outputs", "backward of the extra pass (g_side.source="
                               "extra_pass): 'layer_outputs' freezes the parameters and computes "
                               "only dL/dh (about 1/3 less work; the closure must not read "
                               "parameter .grad); 'all' runs the closure's backward unchanged",
                               choices=["layer_outputs", "all"]),
    "placement": Option("replicated", "data-parallel runs: 'replicated' updates every layer's "
                        "factors on every rank; 'owner' keeps each layer's factors on one rank "
                        "(size-balanced) and exchanges the directions: factor memory and work "
                        "per rank about 1/N", choices=["replicated", "owner"]),
    "plugins": Option([], "modules to import and register before the config is read (their "
                      "kfqn.register classes, hooks and presets), e.g. ['my_lab.sr1_variant']",
                      type=list),
    "layers": Option(None, "layer adapters to use, by name; null = every registered adapter "
                     "(a module takes the first that supports it); [] = none", type=list,
                     nullable=True),
    "preconditioner": Sub("preconditioner", "kronecker", "the layer preconditioner family: "
                          "'kronecker' (a_side x g_side estimators), 'kfac', 'shampoo', ..."),
    "a_side": Sub("a_estimator", "ema_hessian_action", "input-side estimator (H_a)"),
    "g_side": Sub("g_estimator", "secant_pairs", "output-side estimator (H_g)"),
    "fallback": Sub("fallback", "momentum", "rule for parameters outside preconditioned layers"),
}

PRESET_KEYS = ("preset", "base")


# -- loading ------------------------------------------------------------------------------------
def to_plain(obj: Any) -> Any:
    """DictConfig/ListConfig -> plain containers with interpolations resolved."""
    if isinstance(obj, DictConfig) or OmegaConf.is_config(obj):
        return OmegaConf.to_container(obj, resolve=True)
    if isinstance(obj, Mapping):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    return obj


def load_yaml(path: str | Path) -> dict:
    """Read a YAML config file (OmegaConf, interpolations resolved)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except Exception as exc:
        raise ConfigError(f"cannot read config file {str(path)!r}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping, not {type(data).__name__}")
    return data


def _preset_mapping(name: str, registry: Registry) -> dict:
    try:
        preset = registry.preset(name)
    except RegistryError:
        raise ConfigError(
            f"unknown optimizer preset {name!r}; registered presets: "
            f"{', '.join(registry.names('preset'))}.{close_matches(name, registry.names('preset'))}"
            " A YAML path (ending in .yaml) is accepted too."
        ) from None
    src = preset.source
    return load_yaml(src) if isinstance(src, (str, Path)) else to_plain(src)


def load_spec(spec: Any, registry: Registry, _seen: tuple[str, ...] = ()) -> dict:
    """Turn a preset name, YAML path or mapping into one raw mapping, following ``preset:``."""
    if isinstance(spec, (str, Path)):
        text = str(spec)
        if text.endswith((".yaml", ".yml")) or Path(text).is_file():
            raw = load_yaml(text)
        else:
            if text in _seen:
                raise ConfigError(f"preset cycle: {' -> '.join(_seen + (text,))}")
            raw = _preset_mapping(text, registry)
            _seen = _seen + (text,)
    elif isinstance(spec, Mapping) or OmegaConf.is_config(spec):
        raw = to_plain(spec)
    else:
        raise ConfigError(f"optimizer spec must be a preset name, a YAML path or a mapping, "
                          f"not {type(spec).__name__}")
    bases = [k for k in PRESET_KEYS if k in raw]
    if len(bases) > 1:
        raise ConfigError("give only one of 'preset' and 'base'")
    if bases:
        base_name = raw.pop(bases[0])
        if not isinstance(base_name, str):
            raise ConfigError(f"{bases[0]} must be a preset name, not {base_name!r}")
        raw = merge(load_spec(base_name, registry, _seen), raw)
    return raw


def merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict:
    """Deep merge; a section whose 'name' changes (or a name given as a string) is replaced."""
    out = dict(base)
    for key, val in over.items():
        old = out.get(key)
        if isinstance(val, Mapping) and isinstance(old, Mapping):
            if "name" in val and val["name"] != old.get("name"):
                out[key] = dict(val)
            else:
                out[key] = merge(old, val)
        elif isinstance(val, Mapping) and isinstance(old, str) and "name" not in val:
            out[key] = {"name": old, **to_plain(val)}  # options for a component given by name
        elif isinstance(val, str) and isinstance(old, Mapping) and "name" in old:
            out[key] = dict(old) if val == old["name"] else val
        else:
            out[key] = to_plain(val)
    return out


def dotlist_to_mapping(items: Iterable[str]) -> dict:
    """['a.b=1', 'c=x'] -> {'a': {'b': 1}, 'c': 'x'} with YAML typing of values."""
    items = list(items)
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. g_side.damping=ddv2)")
    try:
        return OmegaConf.to_container(OmegaConf.from_dotlist(items), resolve=True)  # type: ignore
    except Exception as exc:
        raise ConfigError(f"cannot parse overrides {items}: {exc}") from exc


# -- validation ---------------------------------------------------------------------------------
#: a schema entry for a mapping its owner checks later (the runner's ``optimizer``, ``tasks``)
FREE = "free"

#: ``unknown(where, key, schema, label) -> message`` for a key the schema does not have
UnknownMessage = Callable[[str, str, Mapping[str, Any], str], str]


def _unknown_key(where: str, key: str, schema: Mapping[str, Any], label: str) -> str:
    allowed = ", ".join(schema) or "(none)"
    return (f"unknown key {_join(where, key)!r}; allowed keys in {label}: {allowed}."
            + close_matches(key, schema))


def validate_section(raw: Mapping[str, Any], schema: Mapping[str, Any], where: str,
                     registry: Registry | None, owner: str = "", *,
                     unknown: UnknownMessage | None = None, fill: bool = True) -> dict:
    """The one validator of kfqn's configs: check ``raw`` against ``schema`` and return it with
    defaults filled in (``fill``) and values normalised.

    Schema entries: :class:`Option` (a value: type, range, choices, finite), :class:`Sub` (a
    registered component by name, with that component's own options), a nested mapping (a
    section, checked recursively), or :data:`FREE` (a mapping its owner checks). The optimizer
    config, component options, the runner's run configs and its data set / model options all
    go through here; ``unknown`` words the message for an unknown key (default: "unknown key
    'a.b'; allowed keys in a: ... Did you mean ...?")."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where or 'config'} must be a mapping, not {raw!r}")
    out: dict[str, Any] = {}
    label = f"{where} ({owner})" if owner else (where or "the top level")
    for key in raw:
        if key not in schema:
            raise ConfigError((unknown or _unknown_key)(where, str(key), schema, label))
    for key, spec in schema.items():
        path = _join(where, key)
        if not fill and key not in raw:
            continue
        if isinstance(spec, Sub):
            value = raw.get(key, spec.default)
            if isinstance(value, Mapping) and "name" not in value:
                value = {"name": spec.default, **value}  # options of the default component
            out[key] = validate_component(value, spec.kind, path, registry)
        elif isinstance(spec, str) and spec == FREE:
            value = raw.get(key)
            if value is not None and not isinstance(value, Mapping):
                raise ConfigError(f"{path} must be a mapping, got {value!r}")
            out[key] = value
        elif isinstance(spec, Mapping):
            value = raw.get(key, {})
            if not isinstance(value, Mapping):
                raise ConfigError(f"{path} must be a mapping with keys {', '.join(spec)}")
            out[key] = validate_section(value, spec, path, registry, unknown=unknown, fill=fill)
        else:
            value = raw.get(key, spec.default)
            if isinstance(value, Mapping) and not getattr(spec, "per_task", False):
                raise ConfigError(f"{path} must be a single value; allowed: {spec.allowed()}")
            out[key] = spec.validate(path, value)
    return out


def validate_component(raw: Any, kind: str, where: str, registry: Registry) -> dict:
    """Validate a component section (name or mapping) of registry ``kind``."""
    if isinstance(raw, str):
        raw = {"name": raw}
    if not isinstance(raw, Mapping) or "name" not in raw:
        raise ConfigError(f"{where} must be a {kind} name or a mapping with 'name'; got {raw!r}")
    name = raw["name"]
    names = registry.names(kind)
    if name not in names:
        raise ConfigError(f"{where}.name = {name!r} is not a registered {kind}; allowed: "
                          f"{', '.join(names)}.{close_matches(str(name), names)}")
    cls = registry.get(kind, name)
    opts = {k: v for k, v in raw.items() if k != "name"}
    out = {"name": name, **validate_section(opts, getattr(cls, "options", {}), where, registry, name)}
    check = getattr(cls, "check_options", None)
    if check is not None:
        check(out, _Builderish(registry), where)
    return out


class _Builderish:
    """The little a component's ``check_options`` may need: the registry."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


#: sections only some preconditioner families read (their ``sections``)
FAMILY_SECTIONS = ("a_side", "g_side")


def _family_sections(raw: Mapping[str, Any], registry: Registry) -> tuple[str, ...]:
    section = raw.get("preconditioner", TOP_LEVEL["preconditioner"].default)
    name = section.get("name", "kronecker") if isinstance(section, Mapping) else section
    if not isinstance(name, str) or name not in registry.names("preconditioner"):
        return FAMILY_SECTIONS  # validate_component names the problem
    return tuple(getattr(registry.get("preconditioner", name), "sections", ()))


def validate(raw: Mapping[str, Any], registry: Registry) -> dict:
    """Validate a whole optimizer config; return the resolved config (all defaults filled).

    ``a_side`` and ``g_side`` belong to the families that read them (``kronecker``); with any
    other ``preconditioner`` they must be absent and are left out of the result."""
    used = _family_sections(raw, registry)
    for key in FAMILY_SECTIONS:
        if key not in used and key in raw:
            family = raw["preconditioner"]
            family = family.get("name") if isinstance(family, Mapping) else family
            cls = registry.get("preconditioner", family)
            opts = ", ".join(getattr(cls, "options", {})) or "(none)"
            raise ConfigError(
                f"{key} is read by preconditioner 'kronecker' only; preconditioner {family!r} "
                f"takes its options under preconditioner: {opts}")
    schema = {k: v for k, v in TOP_LEVEL.items() if k not in FAMILY_SECTIONS or k in used}
    cfg = validate_section(raw, schema, "", registry)
    adapters = registry.names("layer_adapter")
    if cfg["layers"] is None:
        return cfg
    if not all(isinstance(x, str) for x in cfg["layers"]):
        raise ConfigError(f"layers must be a list of adapter names; allowed: {', '.join(adapters)}")
    for item in cfg["layers"]:
        if item not in adapters:
            raise ConfigError(f"layers: {item!r} is not a registered layer_adapter; allowed: "
                              f"{', '.join(adapters)}.{close_matches(item, adapters)}")
    return cfg


#: the numeric options a param group may override, validated as the top-level ones
GROUP_KEYS = ("lr", "momentum", "weight_decay", "damping")


def validate_param_group(index: int, group: Mapping[str, Any]) -> dict:
    """Check the numeric hyper-parameters given in one torch-style param group (non-finite,
    out-of-range or wrongly typed values raise one line naming ``param_groups[i].key`` and
    the allowed values); return the group with those values normalised (ints widened)."""
    out = dict(group)
    for key in GROUP_KEYS:
        if key in out:
            value = out[key]
            if not isinstance(value, (bool, int, float)):
                try:  # a 0-dim tensor or numpy scalar
                    value = float(value)
                except (TypeError, ValueError):
                    pass
            out[key] = TOP_LEVEL[key].validate(f"param_groups[{index}].{key}", value)
    return out


def _load_plugins(modules: Any, registry: Registry) -> None:
    if not modules:
        return
    if not isinstance(modules, (list, tuple)):
        raise ConfigError(f"plugins = {modules!r} must be a list of module paths, e.g. "
                          "['my_lab.sr1_variant']")
    try:
        registry.load_plugins(modules)
    except RegistryError as exc:
        raise ConfigError(str(exc)) from None


def resolve_config(spec: Any, registry: Registry, overrides: Mapping[str, Any] | None = None,
                   dotlist: Iterable[str] | None = None) -> dict:
    """Preset/YAML/mapping + keyword overrides + dotlist overrides -> validated config.

    The modules listed under ``plugins`` (in the mapping, the overrides or the dotlist) are
    imported and registered first, so a plugin may define the preset the spec names."""
    dotlist = list(dotlist or [])
    early: list = []
    for source in (spec if isinstance(spec, Mapping) else {}, overrides or {},
                   dotlist_to_mapping(dotlist) if dotlist else {}):
        found = to_plain(source).get("plugins") if isinstance(source, Mapping) else None
        if found:
            early += list(found) if isinstance(found, (list, tuple)) else [found]
    _load_plugins(early, registry)
    raw = load_spec(spec, registry)
    _load_plugins(raw.get("plugins"), registry)
    if overrides:
        over = to_plain(dict(overrides))
        if any(k in over for k in PRESET_KEYS):
            raw = merge(load_spec({k: over.pop(k) for k in PRESET_KEYS if k in over}, registry), raw)
        raw = merge(raw, over)
    if dotlist:
        raw = merge(raw, dotlist_to_mapping(dotlist))
    return validate(raw, registry)
