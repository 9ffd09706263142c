"""Process set-up for a run: device, threads, determinism, seeds."""
from __future__ import annotations

import random
from typing import Optional

import numpy as np
import torch

from kfqn.core.errors import ConfigError


def pick_device(name: str) -> torch.device:
    """``cpu``, ``cuda`` (an error if unavailable) or ``auto`` (cuda when available)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device = 'cuda' but torch.cuda.is_available() is False; use "
                          "device=cpu or device=auto")
    return torch.device(name)


def configure_torch(threads: Optional[int], deterministic: bool) -> None:
    """Set intra-op threads and deterministic algorithms for this process."""
    if threads:
        torch.set_num_threads(int(threads))
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), NumPy and Python's ``random``."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def derived_seeds(seed: int, n: int) -> list[int]:
    """``n`` independent 63-bit seeds derived from ``seed`` (data order, augmentation, ...)."""
    return [int(s) for s in np.random.SeedSequence(seed).generate_state(n, dtype=np.uint64) >> 1]
