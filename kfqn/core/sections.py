"""``Sub``: a config entry that names a nested component (a section with ``name`` + options)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Sub:
    """A nested component of registry ``kind``, default ``default``; in YAML either the
    component's name or a mapping ``{name: ..., <its options>}``."""

    kind: str
    default: str
    doc: str = ""
