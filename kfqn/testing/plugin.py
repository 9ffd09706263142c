"""pytest plugin of kfqn (entry point ``pytest11: kfqn``), loaded by pytest wherever kfqn is
installed.

* fixtures ``kfqn_device`` (``torch.device``: cpu, and cuda when available) and ``kfqn_dtype``
  (float32, float64): a test that takes them runs once per device and dtype;
* marker ``kfqn_contract``: the tests of :mod:`kfqn.testing`'s contract suite carry it
  (``pytest -m kfqn_contract`` runs only them, ``-m "not kfqn_contract"`` skips them);
* option ``--kfqn-devices=cpu,cuda``: the devices those tests use (default: every available
  one).

It imports neither torch nor hypothesis until a test asks for them, so it costs nothing in
projects that do not use it, and a missing test extra breaks nothing here.
"""
from __future__ import annotations

from typing import Any

MARKER = "kfqn_contract: a test of kfqn.testing's component contract suite"


def pytest_addoption(parser: Any) -> None:
    group = parser.getgroup("kfqn")
    group.addoption("--kfqn-devices", dest="kfqn_devices", default=None, metavar="LIST",
                    help="comma-separated devices for kfqn_device and the kfqn contract "
                         "tests (default: cpu, and cuda when available)")


def pytest_configure(config: Any) -> None:
    config.addinivalue_line("markers", MARKER)


def _directly_parametrized(metafunc: Any) -> set[str]:
    names: set[str] = set()
    for mark in metafunc.definition.iter_markers("parametrize"):
        args = mark.args[0] if mark.args else mark.kwargs.get("argnames", ())
        if isinstance(args, str):
            args = [a.strip() for a in args.split(",")]
        names.update(args)
    return names


def pytest_generate_tests(metafunc: Any) -> None:
    # the contract classes parametrise themselves (they work without this plugin)
    if getattr(metafunc.cls, "_kfqn_contract", False):
        return
    wanted = {"kfqn_device", "kfqn_dtype"} & set(metafunc.fixturenames)
    wanted -= _directly_parametrized(metafunc)
    if not wanted:
        return
    import torch   # here, not at import: the plugin loads in every pytest run

    if "kfqn_device" in wanted:
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
        option = metafunc.config.getoption("kfqn_devices", None)
        if option:
            devices = [d for d in devices if d in {o.strip() for o in option.split(",")}]
        metafunc.parametrize("kfqn_device", [torch.device(d) for d in devices], ids=devices)
    if "kfqn_dtype" in wanted:
        metafunc.parametrize("kfqn_dtype", [torch.float32, torch.float64],
                             ids=["float32", "float64"])
