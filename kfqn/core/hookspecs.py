"""Hook specifications: the extension contract of kfqn.

A component is normally registered where it is defined, with :func:`kfqn.register`; the
module that defines it is then a plugin. Every component kind can also be contributed through
one hook. A plugin is any object (module, class
instance) with functions decorated by :data:`hookimpl` whose names match the specs below; each
returns a list of component classes (or :class:`~kfqn.core.components.Preset` records for
presets). The built-in components in :mod:`kfqn.plugins` use exactly these hooks.

Third-party plugins are discovered through the entry-point group ``kfqn`` or registered at run
time with :func:`kfqn.register_plugin`.
"""
from __future__ import annotations

import pluggy

PROJECT = "kfqn"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


class KfqnHookSpecs:
    """Component hooks. Each returns a list of components of one kind."""

    @hookspec
    def kfqn_layer_adapters(self) -> list:
        """Layer adapters: map a module type to Kronecker-factor quantities (docs/algorithms.md §1-2)."""

    @hookspec
    def kfqn_preconditioners(self) -> list:
        """Layer preconditioners: one object per layer owning both factors
        (:class:`kfqn.preconditioners.base.LayerPreconditioner`)."""

    @hookspec
    def kfqn_a_estimators(self) -> list:
        """Input-side (A / H_a) curvature estimators (docs/algorithms.md §3)."""

    @hookspec
    def kfqn_g_estimators(self) -> list:
        """Output-side (G / H_g) curvature estimators (docs/algorithms.md §3)."""

    @hookspec
    def kfqn_factor_updates(self) -> list:
        """Inverse-factor update rules: BFGS, L-BFGS, ... (docs/algorithms.md §3)."""

    @hookspec
    def kfqn_dampings(self) -> list:
        """Damping rules applied to secant pairs: Powell, DD, DDV2, ... (docs/algorithms.md §3)."""

    @hookspec
    def kfqn_inversions(self) -> list:
        """Inversion strategies for symmetric positive definite factors."""

    @hookspec
    def kfqn_fallbacks(self) -> list:
        """First-order rules for parameters outside preconditioned layers."""

    @hookspec
    def kfqn_presets(self) -> list:
        """Named optimizer configurations (docs/algorithms.md §4): list of ``Preset`` records."""

