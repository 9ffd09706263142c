"""The component registry, built on pluggy.

A component is registered where it is defined::

    @kfqn.register("factor_update")
    class SR1Factor(FactorUpdate): ...

A module holding such classes is a plugin: the registry takes every class registered in it (in
the order they are defined). Modules and objects may also contribute components through the
pluggy hooks of :mod:`kfqn.core.hookspecs` (lists of classes, or ``Preset`` records).

Sources, oldest first: the built-in modules (:func:`kfqn.plugins.builtin_modules`: every module
of the component packages), the ``kfqn`` entry-point group, then :func:`register_plugin` and the
config key ``plugins: [module.path, ...]`` (:func:`load_plugins`). A name offered twice for one
kind is an error unless the later component (or its registration) says ``override``.

Kinds are the optimizer's (:data:`KINDS`); an application adds its own with
:meth:`Registry.add_kinds` (the experiment runner adds ``dataset`` and ``model``), so that the
library imports nothing of it.
"""
from __future__ import annotations

import difflib
import importlib
import inspect
import threading
import types
from typing import Any, Iterable

import pluggy

from kfqn.core.components import Preset, Registered, registered_kind
from kfqn.core.errors import RegistryError
from kfqn.core.hookspecs import PROJECT, KfqnHookSpecs

#: component kind -> hook name (the optimizer's kinds)
KINDS: dict[str, str] = {
    "layer_adapter": "kfqn_layer_adapters",
    "preconditioner": "kfqn_preconditioners",
    "a_estimator": "kfqn_a_estimators",
    "g_estimator": "kfqn_g_estimators",
    "factor_update": "kfqn_factor_updates",
    "damping": "kfqn_dampings",
    "inversion": "kfqn_inversions",
    "fallback": "kfqn_fallbacks",
    "preset": "kfqn_presets",
}


def _describe(obj: Any) -> str:
    desc = getattr(obj, "description", "") or (obj.__doc__ or "").strip().splitlines()[0:1]
    if isinstance(desc, list):
        desc = desc[0] if desc else ""
    return str(desc)


def close_matches(name: str, names: Iterable[str]) -> str:
    """' Did you mean ...?' suffix for an unknown ``name``, or ''."""
    m = difflib.get_close_matches(str(name), list(names), n=1)
    return f" Did you mean {m[0]!r}?" if m else ""


def declared_components(plugin: Any) -> list[tuple[str, Any]]:
    """``(kind, class)`` of every class registered with :func:`kfqn.register` in the module
    ``plugin`` (defined there, not imported into it), in definition order."""
    if not isinstance(plugin, types.ModuleType):
        return []
    found = []
    for obj in vars(plugin).values():
        if inspect.isclass(obj) and obj.__module__ == plugin.__name__:
            kind = registered_kind(obj)
            if kind is not None:
                found.append((kind, obj))
    found.sort(key=lambda kc: _line(kc[1]))
    return found


def _line(cls: type) -> int:
    try:
        return inspect.getsourcelines(cls)[1]
    except (OSError, TypeError):
        return 0


class Registry:
    """A pluggy plugin manager plus per-kind component tables."""

    def __init__(self, load_builtins: bool = True, load_entry_points: bool = True) -> None:
        self.pm = pluggy.PluginManager(PROJECT)
        self.pm.add_hookspecs(KfqnHookSpecs)
        self.kinds: dict[str, str] = dict(KINDS)
        self._sources: list[tuple[Any, str]] = []  # registration order, oldest first
        self._overrides: set[int] = set()
        self._tables: dict[str, dict[str, Registered]] | None = None
        self._lock = threading.RLock()
        if load_builtins:
            from kfqn.plugins import builtin_modules

            for module in builtin_modules():
                self._add(module, f"kfqn.builtin:{module.__name__}")
        if load_entry_points:
            self._load_entry_points()

    # -- registration ----------------------------------------------------------------------
    def _add(self, plugin: Any, name: str | None) -> str:
        pname = self.pm.register(plugin, name=name)
        if pname is None:
            raise RegistryError(f"plugin {name or plugin!r} was blocked by the plugin manager")
        self._sources.append((plugin, pname))
        self._tables = None
        return pname

    def _load_entry_points(self) -> None:
        before = set(id(p) for p, _ in self._sources)
        try:
            self.pm.load_setuptools_entrypoints(PROJECT)
        except Exception as exc:  # a broken third-party plugin must not hide which one it is
            raise RegistryError(
                f"loading a plugin from the entry-point group {PROJECT!r} failed: {exc!r}. "
                "Uninstall or fix that package (pip show / pip uninstall)."
            ) from exc
        for pname, plugin in self.pm.list_name_plugin():
            if id(plugin) not in before:
                self._sources.append((plugin, pname))
        self._tables = None

    def add_kinds(self, kinds: dict[str, str], hookspecs: Any = None,
                  builtins: Iterable[Any] = ()) -> None:
        """Add component kinds (kind -> hook name), their hook specifications and the modules
        that define their built-ins. Idempotent: kinds already known are left alone."""
        with self._lock:
            new = {k: h for k, h in kinds.items() if k not in self.kinds}
            if not new:
                return
            if hookspecs is not None:
                self.pm.add_hookspecs(hookspecs)
            self.kinds.update(new)
            # the new kinds' built-ins come first, before any plugin that may override them
            head = []
            for module in builtins:
                if not self.pm.is_registered(module):
                    pname = self.pm.register(module, name=f"kfqn.builtin:{module.__name__}")
                    head.append((module, pname))
            self._sources = head + self._sources
            self._tables = None

    def register(self, plugin: Any, name: str | None = None, override: bool = False) -> str:
        """Register ``plugin`` (a module with :func:`kfqn.register` classes, or an object or
        module with hook implementations); returns its name.

        Its components are checked at once, so a duplicate name fails here, not at build time.
        """
        if self.pm.is_registered(plugin):
            raise RegistryError(f"plugin {name or plugin!r} is already registered")
        pname = self._add(plugin, name)
        if override:
            self._overrides.add(id(plugin))
        try:
            self.tables()
        except RegistryError:
            self.unregister(plugin)
            raise
        return pname

    def unregister(self, plugin: Any) -> None:
        """Remove a plugin registered earlier."""
        self.pm.unregister(plugin)
        self._sources = [(p, n) for p, n in self._sources if p is not plugin]
        self._overrides.discard(id(plugin))
        self._tables = None

    def is_registered(self, plugin: Any) -> bool:
        return self.pm.is_registered(plugin)

    # -- lookup ----------------------------------------------------------------------------
    def tables(self) -> dict[str, dict[str, Registered]]:
        """All components, kind -> name -> :class:`Registered` (cached until a change)."""
        with self._lock:
            if self._tables is None:
                self._tables = self._collect()
            return self._tables

    def _offered(self, plugin: Any, pname: str) -> Iterable[tuple[str, Any]]:
        """(kind, component) pairs ``plugin`` offers: registered classes, then hook results."""
        yield from ((k, c) for k, c in declared_components(plugin) if k in self.kinds)
        for kind, hook_name in self.kinds.items():
            hook = getattr(self.pm.hook, hook_name, None)
            if hook is None:
                continue
            for impl in hook.get_hookimpls():
                if impl.plugin is plugin:
                    yield from ((kind, obj) for obj in (impl.function() or []))

    def _collect(self) -> dict[str, dict[str, Registered]]:
        tables: dict[str, dict[str, Registered]] = {kind: {} for kind in self.kinds}
        for plugin, pname in self._sources:
            plugin_override = id(plugin) in self._overrides
            for kind, obj in self._offered(plugin, pname):
                table = tables[kind]
                name = getattr(obj, "name", None)
                if not name or not isinstance(name, str):
                    raise RegistryError(
                        f"plugin {pname!r} offered a {kind} without a string 'name': {obj!r}")
                if name in table and not (plugin_override or getattr(obj, "override", False)):
                    raise RegistryError(
                        f"{kind} {name!r} from plugin {pname!r} is already registered by "
                        f"plugin {table[name].plugin!r}. Rename it, or set override=True on the "
                        "component (or register_plugin(..., override=True)) to replace it."
                    )
                table[name] = Registered(kind, name, obj, _describe(obj), pname)
        return tables

    def _check_kind(self, kind: str) -> None:
        if kind not in self.kinds:
            raise RegistryError(f"unknown component kind {kind!r}; kinds: {', '.join(self.kinds)}")

    def get(self, kind: str, name: str) -> Any:
        """The component object of ``kind`` called ``name``; a clear error if unknown."""
        self._check_kind(kind)
        table = self.tables()[kind]
        if name not in table:
            raise RegistryError(
                f"unknown {kind} {name!r}; registered: {', '.join(sorted(table)) or '(none)'}."
                + close_matches(name, table)
            )
        return table[name].obj

    def names(self, kind: str) -> list[str]:
        """Sorted names registered for ``kind``."""
        self._check_kind(kind)
        return sorted(self.tables()[kind])

    def components(self, kind: str | None = None) -> list[Registered]:
        """Every registered component (of one kind if given), sorted by kind then name."""
        kinds = [kind] if kind else list(self.kinds)
        out: list[Registered] = []
        for k in kinds:
            self._check_kind(k)
            out.extend(self.tables()[k][n] for n in sorted(self.tables()[k]))
        return out

    def preset(self, name: str) -> Preset:
        """The :class:`Preset` called ``name``."""
        return self.get("preset", name)

    # -- the config key ``plugins`` ----------------------------------------------------------
    def load_plugins(self, modules: Iterable[str], key: str = "plugins") -> None:
        """Import each module path and register it (once). One line on failure."""
        if isinstance(modules, str):
            modules = [modules]
        for i, path in enumerate(modules or []):
            if not isinstance(path, str) or not path:
                raise RegistryError(f"{key}[{i}] = {path!r} must be a module path such as "
                                    "'my_package.my_rule'")
            try:
                module = importlib.import_module(path)
            except Exception as exc:
                raise RegistryError(
                    f"{key}[{i}]: cannot import {path!r} ({type(exc).__name__}: {exc}); give an "
                    "importable module path (installed, or on PYTHONPATH)") from None
            if not self.pm.is_registered(module):
                self.register(module, name=path)


_default: Registry | None = None
_default_lock = threading.Lock()


def default_registry() -> Registry:
    """The process-wide registry: built-ins plus entry-point plugins, created on first use."""
    global _default
    with _default_lock:
        if _default is None:
            _default = Registry()
        return _default


def register_plugin(plugin: Any, name: str | None = None, override: bool = False) -> str:
    """Register a plugin object or module in the default registry at run time."""
    return default_registry().register(plugin, name=name, override=override)


def unregister_plugin(plugin: Any) -> None:
    """Remove a plugin registered with :func:`register_plugin`."""
    default_registry().unregister(plugin)


def components(kind: str | None = None) -> list[tuple[str, str, str]]:
    """``(kind, name, description)`` of every registered component."""
    return [(r.kind, r.name, r.description) for r in default_registry().components(kind)]


def format_components(kind: str | None = None, registry: Registry | None = None) -> str:
    """The registry listing as aligned text, one component a line, grouped by kind."""
    rows = (registry or default_registry()).components(kind)
    width = max((len(r.name) for r in rows), default=0)
    lines: list[str] = []
    current = None
    for r in rows:
        if r.kind != current:
            current = r.kind
            lines.append(f"{r.kind}:")
        src = "" if r.plugin.startswith("kfqn.builtin") else f"  [{r.plugin}]"
        lines.append(f"  {r.name.ljust(width)}  {r.description}{src}")
    return "\n".join(lines)
