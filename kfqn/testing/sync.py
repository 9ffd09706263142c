"""Detect host synchronisation: a device value read back to Python.

:func:`no_host_sync` fails on the operations that wait for the device and copy a value to the
host: ``.item()``, ``float(t)``, ``bool(t)`` and ``if t:`` (all ``aten._local_scalar_dense``),
``torch.equal`` and ``torch.allclose``, ops whose output shape depends on the data
(``nonzero``, ``masked_select``, ``unique``, indexing with a boolean mask), and linear algebra
that checks its LAPACK/cuSOLVER status on the host (``torch.linalg.cholesky``, ``inv``, ...
through ``aten._linalg_check_errors``, and ``torch.linalg.eigh``). It does so on every device,
through a ``TorchDispatchMode``, so a CPU-only run already finds them; on CUDA it also sets
``torch.cuda.set_sync_debug_mode("error")``, which catches the rest (a ``.cpu()`` copy,
``tolist()``).
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten


class HostSyncError(AssertionError):
    """A component read a device value back to the host where it must not."""


_NAMES = {
    "_local_scalar_dense": ".item(), float(t), int(t), bool(t) or `if t:`",
    "equal": "torch.equal",
    "allclose": "torch.allclose",
    "is_nonzero": "bool(t)",
    "nonzero": "torch.nonzero / torch.where(cond) with one argument",
    "masked_select": "torch.masked_select",
    "_unique": "torch.unique",
    "_unique2": "torch.unique",
    "unique_dim": "torch.unique(dim=...)",
    "unique_consecutive": "torch.unique_consecutive",
    "_linalg_check_errors": "a torch.linalg function that checks its status on the host "
                            "(use the *_ex variant, e.g. torch.linalg.cholesky_ex)",
    "_linalg_eigh": "torch.linalg.eigh (reads its status back on CUDA)",
}
_FORBIDDEN = {getattr(aten, n): why for n, why in _NAMES.items() if hasattr(aten, n)}
_INDEX = {getattr(aten, n) for n in ("index", "index_put", "index_put_") if hasattr(aten, n)}


def _bool_index(args: tuple) -> bool:
    if len(args) < 2 or not isinstance(args[1], (list, tuple)):
        return False
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)
               for i in args[1])


class NoHostSync(TorchDispatchMode):
    """Raises :class:`HostSyncError` on the operations listed in this module's docstring."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        packet = func.overloadpacket
        if packet in _FORBIDDEN:
            raise HostSyncError(f"host synchronisation: {func} ({_FORBIDDEN[packet]}); keep "
                                "decisions on the device with torch.where")
        if packet in _INDEX and _bool_index(args):
            raise HostSyncError(f"host synchronisation: {func} with a boolean mask (the "
                                "output shape depends on the data); use torch.where")
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def no_host_sync(device: torch.device | str | None = None) -> Iterator[None]:
    """Within the block, reading a device value back to the host raises
    :class:`HostSyncError` (CUDA: also ``RuntimeError`` from the sync debug mode)."""
    cuda = device is not None and torch.device(device).type == "cuda"
    previous = torch.cuda.get_sync_debug_mode() if cuda else None
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.set_sync_debug_mode("error")
    try:
        with NoHostSync():
            yield
    finally:
        if cuda:
            torch.cuda.set_sync_debug_mode(previous)
