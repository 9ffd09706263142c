"""PNG plots of a task's runs: training loss vs epoch and vs time, test metric vs epoch.

The loss axes are logarithmic when the losses span more than a factor 3; the accuracy
axis is always linear. One curve per method: the mean over its finished seeds on a common x grid (linear
interpolation between evaluations, up to the shortest seed), with the min-max band over seeds.
Matplotlib runs with the Agg backend (no display needed).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from kfqn.runner.rundir import slug

_X = {"epoch": ("epoch", "epoch"), "cpu": ("cpu_seconds", "training CPU time (s)"),
      "wall": ("wall_seconds", "training wall-clock time (s)")}


def _series(run, x_key: str, y_key: str) -> tuple[np.ndarray, np.ndarray]:
    pts = [(row.get(x_key), row.get(y_key)) for row in run.curve]
    pts = [(x, y) for x, y in pts if x is not None and y is not None]
    if not pts:
        return np.empty(0), np.empty(0)
    xs, ys = map(np.asarray, zip(*pts))
    return xs, ys


def _mean_band(curves: Sequence[tuple[np.ndarray, np.ndarray]]):
    curves = [c for c in curves if len(c[0])]
    if not curves:
        return None
    if len(curves) == 1:
        x, y = curves[0]
        return x, y, y, y
    hi = min(c[0][-1] for c in curves)
    lo = max(c[0][0] for c in curves)
    if hi <= lo:
        x, y = curves[0]
        return x, y, y, y
    grid = np.linspace(lo, hi, 200)
    ys = np.stack([np.interp(grid, x, y) for x, y in curves])
    return grid, ys.mean(0), ys.min(0), ys.max(0)


def _plot(runs, x_key: str, x_label: str, y_key: str, y_label: str, title: str,
          path: Path, allow_log: bool = True) -> Path | None:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    methods: dict[str, list] = {}
    for r in runs:
        methods.setdefault(r.method, []).append(r)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    all_y: list[float] = []
    for method, group in methods.items():
        ok = [r for r in group if r.ok]
        band = _mean_band([_series(r, x_key, y_key) for r in ok])
        bad = len(group) - len(ok)
        label = f"{method} (n={len(ok)}{f', {bad} not finished' if bad else ''})"
        if band is None:
            continue
        x, mean, lo, hi = band
        (line,) = ax.plot(x, mean, label=label, lw=1.6)
        if len(ok) > 1:
            ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.2, lw=0)
        all_y += list(mean)
    if not all_y:
        plt.close(fig)
        return None
    finite = [y for y in all_y if np.isfinite(y)]
    if allow_log and finite and min(finite) > 0 and max(finite) / min(finite) > 3:
        ax.set_yscale("log")
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_task(runs, task: str, out_dir: Path, time_axis: str = "cpu") -> list[Path]:
    """The plots of one task; returns the files written."""
    out_dir = Path(out_dir)
    name = slug(task)
    files = []
    t_key, t_label = _X[time_axis]
    loss_label = "training loss incl. L2"
    files.append(_plot(runs, "epoch", "epoch", "train_loss", loss_label,
                       f"{task}: training loss vs epoch", out_dir / f"{name}_loss_vs_epoch.png"))
    files.append(_plot(runs, t_key, t_label, "train_loss", loss_label,
                       f"{task}: training loss vs time", out_dir / f"{name}_loss_vs_time.png"))
    classify = any(r.status.get("task_type") == "classification" for r in runs)
    y_key, y_label = ("test_accuracy", "test accuracy") if classify else ("test_loss", "test loss")
    # accuracy on a linear axis: on a log axis curves near 1.0 lie on top of each other
    files.append(_plot(runs, "epoch", "epoch", y_key, y_label, f"{task}: {y_label} vs epoch",
                       out_dir / f"{name}_test_vs_epoch.png", allow_log=not classify))
    return [f for f in files if f is not None]
