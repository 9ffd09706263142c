"""Checking a checkpoint against the optimizer that is to load it, before anything changes.

:func:`check_like` walks the optimizer's own state (``expected``: what a state of this model and
configuration looks like) beside the checkpoint's and raises one :class:`KfqnError` line at the
first mismatch: a missing or unexpected key, a tensor of another shape or dtype, a value of
another kind. ``None`` matches anything (a factor not formed yet, on either side). Keys in
:data:`OPTIONAL_KEYS` were added to the format later: a checkpoint may lack them.
"""
from __future__ import annotations

from typing import Any

from torch import Tensor

from kfqn.core.errors import KfqnError

#: state keys that older checkpoints lack (they load with their defaults)
OPTIONAL_KEYS = frozenset({"released", "unsupported", "model", "resets", "start", "draws",
                           "seed"})
#: checked elsewhere (config: by key; param groups: by parameter names; model: by its
#: signature) or free-form (unsupported: reasons by module name)
SKIP_KEYS = frozenset({"config", "param_groups", "unsupported", "model"})


def _fail(path: str, what: str) -> None:
    raise KfqnError(f"checkpoint does not fit this optimizer: {path}: {what}; nothing was loaded")


def _kind(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"tensor{tuple(value.shape)} {str(value.dtype).replace('torch.', '')}"
    return type(value).__name__


def check_like(expected: Any, got: Any, path: str = "state") -> None:
    """Raise at the first place where ``got`` does not have ``expected``'s structure."""
    if expected is None or got is None:
        return
    if isinstance(expected, Tensor):
        if isinstance(got, Tensor):
            if tuple(got.shape) != tuple(expected.shape):
                _fail(path, f"shape {tuple(got.shape)} in the checkpoint, "
                            f"{tuple(expected.shape)} here")
            if got.dtype != expected.dtype:
                _fail(path, f"dtype {got.dtype} in the checkpoint, {expected.dtype} here")
            return
        if expected.dim() == 0 and isinstance(got, (bool, int, float)):
            return  # a counter saved as a number by an older version
        _fail(path, f"{_kind(got)} in the checkpoint, {_kind(expected)} here")
    if isinstance(expected, dict):
        if not isinstance(got, dict):
            _fail(path, f"{_kind(got)} in the checkpoint, a mapping here")
        for key in expected:
            if key in SKIP_KEYS:
                continue
            if key not in got:
                if key in OPTIONAL_KEYS:
                    continue
                _fail(f"{path}.{key}", "missing from the checkpoint")
            check_like(expected[key], got[key], f"{path}.{key}")
        extra = [k for k in got if k not in expected and k not in SKIP_KEYS]
        if extra:
            _fail(f"{path}.{extra[0]}", "not expected here (a different model or component?)")
        return
    if isinstance(expected, (list, tuple)):
        if not isinstance(got, (list, tuple)) or len(got) != len(expected):
            _fail(path, f"{_kind(got)} of length {len(got) if hasattr(got, '__len__') else '-'} "
                        f"in the checkpoint, {len(expected)} entries here")
        for i, (e, g) in enumerate(zip(expected, got)):
            check_like(e, g, f"{path}[{i}]")
        return
    if isinstance(expected, bool) or isinstance(got, bool):
        if not isinstance(got, (bool, int)) or isinstance(expected, (str, Tensor)):
            _fail(path, f"{_kind(got)} in the checkpoint, {_kind(expected)} here")
        return
    if isinstance(expected, (int, float)):
        if not isinstance(got, (int, float)) and not (isinstance(got, Tensor) and got.dim() == 0):
            _fail(path, f"{_kind(got)} in the checkpoint, {_kind(expected)} here")
        return
    if isinstance(expected, str) and not isinstance(got, str):
        _fail(path, f"{_kind(got)} in the checkpoint, {_kind(expected)} here")


def clone_tree(obj: Any, device: Any = None) -> Any:
    """A copy of a state tree with every tensor cloned (a snapshot to roll back to), onto
    ``device`` if given (e.g. "cpu", to send it between ranks)."""
    if isinstance(obj, Tensor):
        t = obj.detach()
        return t.clone() if device is None else t.to(device, copy=True)
    if isinstance(obj, dict):
        return {k: clone_tree(v, device) for k, v in obj.items()}
    if isinstance(obj, list):
        return [clone_tree(v, device) for v in obj]
    if isinstance(obj, tuple):
        return tuple(clone_tree(v, device) for v in obj)
    return obj


def tensor_bytes(obj: Any) -> int:
    """Bytes of every tensor in a nested state dict."""
    if isinstance(obj, Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0
