"""Base classes shared by all registered components.

A component is a class with a ``name``, a one-line ``description`` and a table of ``options``
(name -> :class:`Option`) that the config validator checks before anything is built.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping, Sequence


@dataclass(frozen=True)
class Option:
    """One config entry of a component: default, type and allowed values or range.

    ``low``/``high`` bound numbers (inclusive unless ``open_low``/``open_high``); ``choices``
    lists allowed values; ``check`` is an extra predicate with ``check_msg`` as its error text.
    A float value must be finite (NaN and +-inf are rejected by every option).
    """

    default: Any
    doc: str = ""
    type: type | tuple[type, ...] | None = None
    choices: Sequence[Any] | None = None
    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False
    nullable: bool = False

    def allowed(self) -> str:
        """Human-readable description of the allowed values."""
        if self.choices is not None:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        parts = []
        if self.type is not None:
            names = self.type if isinstance(self.type, tuple) else (self.type,)
            parts.append(" or ".join(t.__name__ for t in names))
        if self.low is not None or self.high is not None:
            lo = "(" if self.open_low or self.low is None else "["
            hi = ")" if self.open_high or self.high is None else "]"
            parts.append(f"in {lo}{'-inf' if self.low is None else self.low}, "
                         f"{'inf' if self.high is None else self.high}{hi}")
        if self.nullable:
            parts.append("or null")
        return " ".join(parts) or "any value"

    def validate(self, key: str, value: Any) -> Any:
        """Return ``value`` (ints widened to float where a float is expected) or raise."""
        from kfqn.core.errors import ConfigError

        if value is None:
            if self.nullable:
                return None
            raise ConfigError(f"{key} must not be null; allowed: {self.allowed()}")
        if self.choices is not None:
            if value not in self.choices:
                raise ConfigError(f"{key} = {value!r} is not allowed; allowed: {self.allowed()}")
            return value
        if self.type is not None:
            types = self.type if isinstance(self.type, tuple) else (self.type,)
            if float in types and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if isinstance(value, bool) and bool not in types:
                raise ConfigError(f"{key} = {value!r} has the wrong type; allowed: {self.allowed()}")
            if not isinstance(value, types):
                raise ConfigError(f"{key} = {value!r} has the wrong type; allowed: {self.allowed()}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key} = {value!r} is not a finite number; allowed: "
                              f"{self.allowed()}")
        if self.low is not None and (value < self.low or (self.open_low and value == self.low)):
            raise ConfigError(f"{key} = {value!r} is out of range; allowed: {self.allowed()}")
        if self.high is not None and (value > self.high or (self.open_high and value == self.high)):
            raise ConfigError(f"{key} = {value!r} is out of range; allowed: {self.allowed()}")
        return value


class Component:
    """Base of every registered component class."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    options: ClassVar[Mapping[str, Option]] = {}
    #: set to True on a component that deliberately replaces one of the same name
    override: ClassVar[bool] = False


_KIND_ATTR = "_kfqn_registered_kind"


def register(kind: str) -> Callable[[type], type]:
    """Class decorator: register the class as a component of ``kind`` (``"factor_update"``,
    ``"damping"``, ``"inversion"``, ``"layer_adapter"``, ``"preconditioner"``,
    ``"a_estimator"``, ``"g_estimator"``, ``"fallback"``, or a kind an application added).

    The class is taken by the registry from the module that defines it: a built-in module, a
    module named in the config key ``plugins``, one passed to :func:`kfqn.register_plugin`, or
    one an entry point of the group ``kfqn`` names. Subclasses are not registered unless they
    are decorated themselves."""
    if not isinstance(kind, str) or not kind:
        raise TypeError("kfqn.register(kind): kind must be a component kind name")

    def mark(cls: type) -> type:
        if not getattr(cls, "name", None):
            raise TypeError(f"kfqn.register({kind!r}): {cls.__name__} needs a class attribute "
                            "'name' (the name configs use)")
        setattr(cls, _KIND_ATTR, kind)
        return cls
    return mark


def registered_kind(cls: type) -> str | None:
    """The kind ``cls`` was registered as with :func:`register` (not inherited), or None."""
    return cls.__dict__.get(_KIND_ATTR)


@dataclass(frozen=True)
class Preset:
    """A named optimizer configuration: a YAML file or an inline mapping."""

    name: str
    description: str
    source: Path | Mapping[str, Any]
    override: bool = False


@dataclass(frozen=True)
class Registered:
    """A component as the registry holds it."""

    kind: str
    name: str
    obj: Any
    description: str
    plugin: str
    extras: dict = field(default_factory=dict)


ComponentFactory = Callable[..., Any]
