"""The component contract suite, for plugin authors: run kfqn's own contracts on your component.

In your test file::

    from kfqn.testing import factor_update_contract
    test_my_rule = factor_update_contract(MyRule)            # pytest collects it

or, to change a setting::

    from kfqn.testing import FactorUpdateContract

    class TestMyRule(FactorUpdateContract):
        component = MyRule
        options = {"memory": 10}       # constructor options
        max_examples = 50              # hypothesis examples per test

Contracts: :class:`FactorUpdateContract` (update rules), :class:`DampingContract`,
:class:`InversionContract`, :class:`LayerAdapterContract`; :func:`contract_for` picks one by
the kind the component was registered as. Tests run on cpu (and cuda when available) in float32
and float64. :mod:`kfqn.testing.strategies` has the hypothesis strategies (SPD matrices,
curvature pairs, adversarial vectors); :func:`no_host_sync` checks that code keeps its
decisions on the device. The pytest plugin :mod:`kfqn.testing.plugin` (installed with kfqn)
adds the fixtures ``kfqn_device`` and ``kfqn_dtype``, the marker ``kfqn_contract`` and the
option ``--kfqn-devices``.

Needs the test extra: ``pip install kfqn[test]`` (pytest, hypothesis). The names are loaded on
first use, so that the pytest plugin, which lives in this package and is loaded by every pytest
run where kfqn is installed, works without the extra.
"""
from __future__ import annotations

import importlib
from typing import Any

_CONTRACTS = ("CONTRACTS", "DTYPES", "TOLERANCES", "ComponentContract", "DampingContract",
              "FactorUpdateContract", "InversionContract", "LayerAdapterContract", "Tolerance",
              "available_devices", "contract_for", "damping_contract", "factor_update_contract",
              "inversion_contract", "layer_adapter_contract")
_SYNC = ("HostSyncError", "NoHostSync", "no_host_sync")
_WHERE = {**{n: "kfqn.testing.contracts" for n in _CONTRACTS},
          **{n: "kfqn.testing.sync" for n in _SYNC},
          "strategies": None}

__all__ = [*_CONTRACTS, *_SYNC, "strategies"]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'kfqn.testing' has no attribute {name!r}")
    from kfqn.testing import _deps  # noqa: F401  (one-line ImportError without the test extra)

    module = _WHERE[name]
    value = (importlib.import_module("kfqn.testing.strategies") if module is None
             else getattr(importlib.import_module(module), name))
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
