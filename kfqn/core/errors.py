"""Errors raised by kfqn, each carrying a message a user can act on."""
from __future__ import annotations


class KfqnError(Exception):
    """Base class of kfqn errors."""


class ConfigError(KfqnError, ValueError):
    """A configuration entry is unknown, out of range or inconsistent."""


class RegistryError(KfqnError, KeyError):
    """A component name is unknown or registered twice."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class UnsupportedModuleError(KfqnError, TypeError):
    """A module cannot be preconditioned and the policy says so."""
