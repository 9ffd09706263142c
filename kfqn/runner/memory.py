"""Peak memory of a run: resident set size on CPU, allocated memory on CUDA.

On Linux the process's RSS high-water mark (``VmHWM``) is reset at the start of each run by
writing ``5`` to ``/proc/self/clear_refs`` (after returning freed heap pages to the OS), so the
peak of one run of a sweep does not include the peaks of the runs before it. The RSS includes
the Python interpreter and torch (a few hundred MB) and whatever an earlier run of the same
process kept (allocator caches), so ``memory_start_mb`` (the RSS at the start) is recorded
too, and a sweep can run every run in a fresh process (``sweep.fresh_process``). Elsewhere the
lifetime peak of ``resource.getrusage`` is used (an upper bound; ``memory_method`` says which).
On CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``. The
optimizer's own state is reported separately and exactly (``optimizer_state_mb``).
"""
from __future__ import annotations

import sys
from typing import Any

import torch


def _read_status_kb(field: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` (VmHWM: peak RSS, VmRSS: current RSS)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _release_free_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc ``malloc_trim``), so
    memory freed by earlier runs of this process does not count towards the next run's peak."""
    import gc

    gc.collect()
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass


class PeakMemory:
    """Measures the peak memory between :meth:`start` and :meth:`peak`."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.method = "none"
        self.start_mb: float | None = None

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_mb = torch.cuda.memory_allocated(self.device) / 2**20
            self.method = "cuda_max_allocated"
            return
        _release_free_memory()
        kb = _read_status_kb("VmRSS:")
        self.start_mb = kb / 1024 if kb is not None else None
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.method = "rss_hwm"
        except OSError:
            self.method = "ru_maxrss_lifetime"

    def peak(self) -> dict[str, Any]:
        """``peak_memory_mb``, ``memory_start_mb`` (at :meth:`start`) and ``memory_method``."""
        mb = None
        if self.method == "cuda_max_allocated":
            mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        elif self.method == "rss_hwm":
            kb = _read_status_kb("VmHWM:")
            mb = kb / 1024 if kb is not None else None
        elif self.method == "ru_maxrss_lifetime":
            try:
                import resource

                r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                mb = r / 2**20 if sys.platform == "darwin" else r / 1024  # bytes on macOS
            except (ImportError, OSError):
                mb = None
        return {"peak_memory_mb": mb, "memory_start_mb": self.start_mb,
                "memory_method": self.method}


def state_megabytes(state: Any) -> float:
    """Megabytes of all tensors in a (nested) state dict, e.g. an optimizer's state."""
    seen: set[int] = set()

    def walk(obj: Any) -> int:
        if isinstance(obj, torch.Tensor):
            key = obj.untyped_storage().data_ptr() if obj.numel() else id(obj)
            if key in seen:
                return 0
            seen.add(key)
            return obj.numel() * obj.element_size()
        if isinstance(obj, dict):
            return sum(walk(v) for v in obj.values())
        if isinstance(obj, (list, tuple)):
            return sum(walk(v) for v in obj)
        return 0

    return walk(state) / 2**20
