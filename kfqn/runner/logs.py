"""Run logs: metrics CSV files that survive resumption, and TensorBoard event files.

On resume both are cut back to the checkpoint's step: CSV rows logged after it are dropped,
and the TensorBoard writer is opened with ``purge_step`` so TensorBoard hides events logged
after it. A resumed run therefore has exactly the logs an uninterrupted run would have.
"""
from __future__ import annotations

import csv
import math
import warnings
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

STEP_COLUMNS = ("step", "epoch", "loss", "loss_no_l2", "lr", "step_seconds", "wall_seconds",
                "cpu_seconds")
EPOCH_COLUMNS = ("epoch", "step", "train_loss", "train_loss_no_l2", "batch_loss_mean",
                 "test_loss", "test_accuracy", "lr", "wall_seconds", "cpu_seconds",
                 "steps_per_second")


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else str(v)
    return str(v)


class CsvLog:
    """Append-only CSV with a fixed header; ``resume_step`` drops rows with a larger step."""

    def __init__(self, path: Path, columns: Sequence[str], resume_step: Optional[int] = None):
        self.path = Path(path)
        self.columns = tuple(columns)
        if resume_step is not None and self.path.exists():
            rows = read_csv(self.path)
            keep = [r for r in rows if r.get("step") not in (None, "")
                    and int(float(r["step"])) <= resume_step]
            self._write(keep)
        else:
            self._write([])

    def _write(self, rows: list[dict[str, str]]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "w", newline="") as f:
            w = csv.DictWriter(f, self.columns, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)

    def append(self, row: Mapping[str, Any]) -> None:
        unknown = set(row) - set(self.columns)
        if unknown:
            raise KeyError(f"{self.path.name}: unknown columns {sorted(unknown)}")
        with open(self.path, "a", newline="") as f:
            csv.writer(f).writerow([_fmt(row.get(c)) for c in self.columns])


class NullLog:
    """A log that writes nothing: the other ranks of a data-parallel run (rank 0 logs)."""

    def append(self, row: Mapping[str, Any]) -> None:
        pass


def read_csv(path: Path) -> list[dict[str, str]]:
    """Rows of a CSV file as dicts of strings (empty list if the file is missing)."""
    if not Path(path).exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


class TensorBoardLog:
    """Thin wrapper over ``torch.utils.tensorboard.SummaryWriter``; a no-op when disabled.

    A missing ``tensorboard`` package disables it with one warning instead of failing the run.
    """

    def __init__(self, log_dir: Path, enabled: bool = True,
                 purge_step: Optional[int] = None) -> None:
        self.writer = None
        self.log_dir = Path(log_dir)
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:  # tensorboard not installed
            warnings.warn(f"TensorBoard logging disabled: {exc}. pip install tensorboard",
                          stacklevel=2)
            return
        self.writer = SummaryWriter(str(log_dir), purge_step=purge_step)

    def scalars(self, values: Mapping[str, Optional[float]], step: int) -> None:
        """Log every finite value of ``values`` (tag -> number) at ``step``."""
        if self.writer is None:
            return
        for tag, v in values.items():
            if v is not None and math.isfinite(float(v)):
                self.writer.add_scalar(tag, float(v), step)

    def hparams(self, hparams: Mapping[str, Any], metrics: Mapping[str, Optional[float]]) -> None:
        """An HParams entry for this run (values must be bool, str or numbers)."""
        if self.writer is None:
            return
        clean = {k: (v if isinstance(v, (bool, int, float, str)) else str(v))
                 for k, v in hparams.items()}
        finite = {k: float(v) for k, v in metrics.items()
                  if v is not None and math.isfinite(float(v))}
        # run_name="." writes the hparams into this run's own directory, so TensorBoard's
        # HParams view lists the run under its real name
        self.writer.add_hparams(clean, finite, run_name=".")

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
