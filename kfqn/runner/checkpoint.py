"""Checkpoints: everything a run needs to continue exactly where it stopped.

A checkpoint holds the model, the optimizer (its ``state_dict`` is keyed by module names for
kfqn optimizers), the LR scheduler if any, the data loader and augmentation generators, the
global RNG states (torch, NumPy, Python) and the run's counters and clocks. It is written to a
temporary file and renamed, so an interruption while saving never leaves a damaged file.
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

CHECKPOINT = "checkpoint.pt"


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


def save_checkpoint(run_dir: Path, state: dict[str, Any]) -> Path:
    """Atomically write ``state`` to ``<run_dir>/checkpoint.pt``."""
    path = Path(run_dir) / CHECKPOINT
    tmp = path.with_name(f".{CHECKPOINT}.{os.getpid()}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(run_dir: Path, map_location: Any = "cpu") -> dict[str, Any] | None:
    """The checkpoint of ``run_dir``, or None if it has none."""
    path = Path(run_dir) / CHECKPOINT
    if not path.exists():
        return None
    # our own file: it holds generator states and NumPy RNG tuples, not only tensors
    return torch.load(path, map_location=map_location, weights_only=False)
