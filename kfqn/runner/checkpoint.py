"""Checkpoints: everything a run needs to continue exactly where it stopped.

A checkpoint holds the model, the optimizer (its ``state_dict`` is keyed by module names for
kfqn optimizers), the LR scheduler if any, the data loader and augmentation generators, the
global RNG states (torch, NumPy, Python) and the run's counters and clocks.

Nothing is ever lost to an interruption or a damaged file:

- a checkpoint is written to a temporary file, flushed to disk and renamed over
  ``checkpoint.pt``; the one it replaces is kept as ``checkpoint.prev.pt`` (the last two);
- the file starts with a header line ``KFQN-CHECKPOINT 1 <sha256> <length>`` followed by the
  ``torch.save`` payload; :func:`load_checkpoint` verifies length and SHA-256 and, when the
  newest checkpoint is damaged, falls back to the older one with a warning; when neither is
  usable it raises :class:`CheckpointError` (one line: which files, what to do);
- temporary files left by a killed process are removed by :func:`remove_stale_temporaries`
  (called when a run starts).
"""
from __future__ import annotations

import hashlib
import io
import os
import random
import warnings
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from kfqn.core.errors import KfqnError

CHECKPOINT = "checkpoint.pt"
PREVIOUS = "checkpoint.prev.pt"
MAGIC = b"KFQN-CHECKPOINT 1 "
_TMP_PREFIX = f".{CHECKPOINT}."


class CheckpointError(KfqnError):
    """No usable checkpoint where one is needed (damaged, truncated or unreadable)."""


def rng_state() -> dict[str, Any]:
    """The global RNG states (torch CPU and CUDA, NumPy, Python)."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
             "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def encode(state: dict[str, Any]) -> bytes:
    """``state`` serialised with ``torch.save`` behind the checksum header."""
    buf = io.BytesIO()
    torch.save(state, buf)
    payload = buf.getvalue()
    digest = hashlib.sha256(payload).hexdigest()
    return MAGIC + f"{digest} {len(payload)}\n".encode() + payload


def decode(data: bytes, map_location: Any = "cpu") -> dict[str, Any]:
    """The state in ``data``; ``ValueError`` (saying what is wrong) when it does not verify."""
    if not data.startswith(MAGIC):
        raise ValueError("no checkpoint header (not a kfqn checkpoint, or damaged)")
    end = data.find(b"\n", len(MAGIC), len(MAGIC) + 200)
    if end < 0:
        raise ValueError("damaged header")
    try:
        digest, length = data[len(MAGIC):end].decode().split()
        length = int(length)
    except ValueError:
        raise ValueError("damaged header") from None
    payload = data[end + 1:]
    if len(payload) != length:
        raise ValueError(f"truncated: {len(payload)} of {length} bytes")
    if hashlib.sha256(payload).hexdigest() != digest:
        raise ValueError("checksum mismatch (the file was changed or damaged)")
    # our own verified file: it holds generator states and NumPy RNG tuples, not only tensors
    return torch.load(io.BytesIO(payload), map_location=map_location, weights_only=False)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(run_dir: Path, state: dict[str, Any]) -> Path:
    """Atomically write ``state`` to ``<run_dir>/checkpoint.pt``, keeping the previous one as
    ``checkpoint.prev.pt``."""
    run_dir = Path(run_dir)
    path, prev = run_dir / CHECKPOINT, run_dir / PREVIOUS
    tmp = run_dir / f"{_TMP_PREFIX}{os.getpid()}.tmp"
    data = encode(state)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if path.exists():
            os.replace(path, prev)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(run_dir)
    return path


def remove_stale_temporaries(run_dir: Path) -> list[Path]:
    """Delete temporary checkpoint / status files a killed process left in ``run_dir``."""
    removed = []
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return removed
    for p in run_dir.iterdir():
        if p.name.startswith(".") and p.name.endswith(".tmp") and p.is_file():
            try:
                p.unlink()
                removed.append(p)
            except OSError:
                pass
    return removed


def has_checkpoint(run_dir: Path) -> bool:
    return any((Path(run_dir) / n).exists() for n in (CHECKPOINT, PREVIOUS))


def load_checkpoint(run_dir: Path, map_location: Any = "cpu") -> Optional[dict[str, Any]]:
    """The newest verified checkpoint of ``run_dir``, or None if it has none.

    A damaged ``checkpoint.pt`` is skipped with a warning in favour of ``checkpoint.prev.pt``
    (the run then repeats the steps in between); if no file verifies, :class:`CheckpointError`.
    """
    run_dir = Path(run_dir)
    problems = []
    for name in (CHECKPOINT, PREVIOUS):
        path = run_dir / name
        if not path.exists():
            continue
        try:
            state = decode(path.read_bytes(), map_location)
        except Exception as exc:  # ValueError from decode, or unpickling errors
            problems.append(f"{path}: {' '.join(str(exc).split())[:200]}")
            continue
        if problems:
            warnings.warn(f"{problems[0]}; resuming from the older checkpoint {path} instead "
                          f"(step {state.get('state', {}).get('step', '?')})", stacklevel=2)
        return state
    if problems:
        raise CheckpointError(
            f"no usable checkpoint in {run_dir}: {'; '.join(problems)}. Start the run over with "
            "--overwrite (its logs and status are replaced), or restore the file from a backup")
    return None
