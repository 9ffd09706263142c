"""Look-up of registered data sets and models, and validation of their ``options``.

Data sets and models are registry components (kinds ``dataset`` and ``model``), contributed by
:mod:`kfqn.runner.builtins` (kinds added by :mod:`kfqn.runner.registry`) or any third-party plugin through the hooks
``kfqn_datasets`` / ``kfqn_models``. Each is a class; the runner instantiates it without
arguments and passes the validated ``options`` of the experiment config to its build method.
"""
from __future__ import annotations

from typing import Any, Mapping

from kfqn.core.components import Component
from kfqn.core.errors import ConfigError, RegistryError
from kfqn.core.registry import close_matches

#: config section -> registry kind
SECTION_KIND = {"data": "dataset", "model": "model"}


def get_component(kind: str, name: str, key: str) -> Any:
    """An instance of the registered component ``kind``/``name``.

    ``key`` is the config key that named it (``data.name``); it prefixes the error message.
    """
    from kfqn.runner.registry import runner_registry

    if not name:
        names = ", ".join(runner_registry().names(kind)) or "(none)"
        raise ConfigError(f"{key} is required; registered {kind}s: {names}")
    try:
        cls = runner_registry().get(kind, str(name))
    except RegistryError as exc:
        raise ConfigError(f"{key}: {exc}") from None
    return cls() if isinstance(cls, type) else cls


def resolve_options(component: Component, given: Mapping[str, Any] | None, key: str) -> dict:
    """``given`` checked against ``component.options`` and completed with the defaults (the
    library's validator, :func:`kfqn.core.config.validate_section`).

    Raises :class:`ConfigError` naming the key, the allowed values and close matches.
    """
    from kfqn.core.config import validate_section

    table = getattr(component, "options", {}) or {}

    def unknown(where: str, k: str, schema: Mapping[str, Any], label: str) -> str:
        allowed = ", ".join(sorted(schema)) or "(none)"
        return (f"{where}.{k} is not an option of {component.name!r}; its options: {allowed}."
                + close_matches(k, schema))
    return validate_section(dict(given or {}), table, key, None, component.name,
                            unknown=unknown)


def describe_options(component: Component) -> str:
    """One line per option: name, default, allowed values and doc (for listings)."""
    lines = []
    for name, opt in (getattr(component, "options", {}) or {}).items():
        lines.append(f"{name} = {opt.default!r}  ({opt.allowed()})  {opt.doc}".rstrip())
    return "\n".join(lines)
