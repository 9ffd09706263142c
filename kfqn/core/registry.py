"""The component registry, built on pluggy.

Components of each kind come from the hooks in :mod:`kfqn.core.hookspecs`. Built-ins are
registered first, then plugins from the ``kfqn`` entry-point group, then anything passed to
:func:`register_plugin`. A name offered twice for one kind is an error unless the later
component (or its registration) says ``override``.
"""
from __future__ import annotations

import difflib
import threading
from typing import Any, Iterable

import pluggy

from kfqn.core.components import Preset, Registered
from kfqn.core.errors import RegistryError
from kfqn.core.hookspecs import PROJECT, KfqnHookSpecs

#: component kind -> hook name
KINDS: dict[str, str] = {
    "layer_adapter": "kfqn_layer_adapters",
    "a_estimator": "kfqn_a_estimators",
    "g_estimator": "kfqn_g_estimators",
    "factor_update": "kfqn_factor_updates",
    "damping": "kfqn_dampings",
    "inversion": "kfqn_inversions",
    "fallback": "kfqn_fallbacks",
    "preset": "kfqn_presets",
    "dataset": "kfqn_datasets",
    "model": "kfqn_models",
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


class Registry:
    """A pluggy plugin manager plus per-kind component tables."""

    def __init__(self, load_builtins: bool = True, load_entry_points: bool = True) -> None:
        self.pm = pluggy.PluginManager(PROJECT)
        self.pm.add_hookspecs(KfqnHookSpecs)
        self._overrides: set[int] = set()
        self._tables: dict[str, dict[str, Registered]] | None = None
        self._lock = threading.Lock()
        if load_builtins:
            from kfqn.plugins import BUILTIN_PLUGINS

            for plugin in BUILTIN_PLUGINS:
                self.pm.register(plugin, name=f"kfqn.builtin:{getattr(plugin, '__name__', plugin)}")
        if load_entry_points:
            self._load_entry_points()

    # -- registration ----------------------------------------------------------------------
    def _load_entry_points(self) -> None:
        try:
            self.pm.load_setuptools_entrypoints(PROJECT)
        except Exception as exc:  # a broken third-party plugin must not hide which one it is
            raise RegistryError(
                f"loading a plugin from the entry-point group {PROJECT!r} failed: {exc!r}. "
                "Uninstall or fix that package (pip show / pip uninstall)."
            ) from exc
        self._tables = None

    def register(self, plugin: Any, name: str | None = None, override: bool = False) -> str:
        """Register ``plugin`` (module or object with hook implementations); returns its name.

        Its components are checked at once, so a duplicate name fails here, not at build time.
        """
        if self.pm.is_registered(plugin):
            raise RegistryError(f"plugin {name or plugin!r} is already registered")
        pname = self.pm.register(plugin, name=name)
        if pname is None:
            raise RegistryError(f"plugin {name or plugin!r} was blocked by the plugin manager")
        if override:
            self._overrides.add(id(plugin))
        self._tables = None
        try:
            self.tables()
        except RegistryError:
            self.pm.unregister(plugin)
            self._overrides.discard(id(plugin))
            self._tables = None
            raise
        return pname

    def unregister(self, plugin: Any) -> None:
        """Remove a plugin registered earlier."""
        self.pm.unregister(plugin)
        self._overrides.discard(id(plugin))
        self._tables = None

    # -- lookup ----------------------------------------------------------------------------
    def tables(self) -> dict[str, dict[str, Registered]]:
        """All components, kind -> name -> :class:`Registered` (cached until a change)."""
        with self._lock:
            if self._tables is None:
                self._tables = {kind: self._collect(kind, hook) for kind, hook in KINDS.items()}
            return self._tables

    def _collect(self, kind: str, hook_name: str) -> dict[str, Registered]:
        table: dict[str, Registered] = {}
        hook = getattr(self.pm.hook, hook_name)
        # oldest registration first, so later plugins may override earlier ones
        for impl in hook.get_hookimpls():  # registration order, oldest first
            items = impl.function() or []
            plugin_override = id(impl.plugin) in self._overrides
            for obj in items:
                name = getattr(obj, "name", None)
                if not name or not isinstance(name, str):
                    raise RegistryError(
                        f"plugin {impl.plugin_name!r} offered a {kind} without a string 'name': {obj!r}"
                    )
                if name in table and not (plugin_override or getattr(obj, "override", False)):
                    raise RegistryError(
                        f"{kind} {name!r} from plugin {impl.plugin_name!r} is already registered by "
                        f"plugin {table[name].plugin!r}. Rename it, or set override=True on the "
                        "component (or register_plugin(..., override=True)) to replace it."
                    )
                table[name] = Registered(kind, name, obj, _describe(obj), impl.plugin_name)
        return table

    def get(self, kind: str, name: str) -> Any:
        """The component object of ``kind`` called ``name``; a clear error if unknown."""
        if kind not in KINDS:
            raise RegistryError(f"unknown component kind {kind!r}; kinds: {', '.join(KINDS)}")
        table = self.tables()[kind]
        if name not in table:
            raise RegistryError(
                f"unknown {kind} {name!r}; registered: {', '.join(sorted(table)) or '(none)'}."
                + close_matches(name, table)
            )
        return table[name].obj

    def names(self, kind: str) -> list[str]:
        """Sorted names registered for ``kind``."""
        return sorted(self.tables()[kind])

    def components(self, kind: str | None = None) -> list[Registered]:
        """Every registered component (of one kind if given), sorted by kind then name."""
        kinds = [kind] if kind else list(KINDS)
        out: list[Registered] = []
        for k in kinds:
            if k not in KINDS:
                raise RegistryError(f"unknown component kind {k!r}; kinds: {', '.join(KINDS)}")
            out.extend(self.tables()[k][n] for n in sorted(self.tables()[k]))
        return out

    def preset(self, name: str) -> Preset:
        """The :class:`Preset` called ``name``."""
        return self.get("preset", name)


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


def format_components(kind: str | None = None) -> str:
    """The registry listing as aligned text, one component a line, grouped by kind."""
    rows = default_registry().components(kind)
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
