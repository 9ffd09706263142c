"""Layout of run and sweep directories, and the ``status.json`` summary of a run.

A run directory holds::

    config.yaml       the resolved config of the run (``kfqn train <dir> --resume`` reuses it)
    status.json       status (running, finished, diverged, interrupted, failed) and summary
    steps.csv         training scalars every logging.every_steps steps
    epochs.csv        evaluations: train loss with and without L2, test loss / accuracy
    checkpoint.pt     the latest checkpoint (verified by a checksum on load)
    checkpoint.prev.pt      the one before it (the fallback when the latest is damaged)
    events.out.tfevents.*   TensorBoard logs

In a data-parallel run (``kfqn train --nproc N``, torchrun, SLURM) rank 0 alone writes these
files (``status.json`` then has ``world_size``); every rank reads the checkpoint on resume.

``kfqn train`` puts runs under ``<root>/<name>/train/<task>/<method>/seed<k>``; the method is
the preset plus the command-line overrides that change the experiment (``kbfgs-lr=0.1``).

A sweep directory (``<root>/<name>``, or ``<root>/<name>-<overrides>`` for a sweep with
overrides) holds ``sweep.yaml`` and ``overrides.txt`` (what the sweep was started with; kept on
resume), ``sweep.json`` (its state and runs), the run directories ``<task>/<method>/seed<k>``
and the report (``report.md``, ``report.csv``, ``runs.csv``, ``plots/``).
"""
from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any, Mapping, Optional

STATUS = "status.json"
CONFIG = "config.yaml"
SWEEP = "sweep.json"
FINAL_STATES = ("finished", "diverged")


def slug(text: str) -> str:
    """``text`` made safe as one path component."""
    return re.sub(r"[^A-Za-z0-9._=+,-]+", "_", str(text)).strip("_") or "_"


def run_path(root: Path, task: Optional[str], method: str, seed: int) -> Path:
    """``<root>/<task>/<method>/seed<seed>`` (task ``main`` when there is none)."""
    return Path(root) / slug(task or "main") / slug(method) / f"seed{seed}"


def read_status(run_dir: Path) -> Optional[dict[str, Any]]:
    """The ``status.json`` of a run, or None."""
    path = Path(run_dir) / STATUS
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    """Atomically write ``data`` as JSON (non-finite floats become null)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(_finite(data), indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


def write_status(run_dir: Path, data: Mapping[str, Any]) -> None:
    write_json(Path(run_dir) / STATUS,
               {**data, "updated": time.strftime("%Y-%m-%dT%H:%M:%S")})


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if obj == obj and abs(obj) != float("inf") else None
    if isinstance(obj, Mapping):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def is_run_dir(path: Path) -> bool:
    return (Path(path) / STATUS).exists() or (Path(path) / CONFIG).exists()


def find_runs(root: Path) -> list[Path]:
    """Every run directory at or below ``root`` (those with a status.json), sorted."""
    root = Path(root)
    if (root / STATUS).exists():
        return [root]
    return sorted(p.parent for p in root.rglob(STATUS))
