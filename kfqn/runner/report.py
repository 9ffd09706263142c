"""Reports of a finished run or sweep: Markdown and CSV tables, PNG plots.

``write_report(path)`` finds every run directory under ``path`` and writes into ``path``:

- ``runs.csv``: one row per run (final and best training loss, test metric, epochs, time to
  the target loss, steps per second, peak memory, optimizer state size, status);
- ``report.csv`` and ``report.md``: one row per (task, method), mean and standard deviation
  over seeds;
- ``plots/<task>_loss_vs_epoch.png``, ``plots/<task>_loss_vs_time.png`` and
  ``plots/<task>_test_vs_epoch.png`` (see :mod:`kfqn.runner.plots`).

The training loss is the evaluated loss including the L2 term, as P2 reports it. The *target
loss* of a task is ``report.target_loss`` of its runs' config (or ``--target-loss``): a number,
or ``auto``, the worst mean final loss among the task's methods, which every method reaches.
"""
from __future__ import annotations

import csv
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from kfqn.runner.errors import RunDirError
from kfqn.runner.logs import read_csv
from kfqn.runner.rundir import CONFIG, SWEEP, find_runs, read_status

RUN_COLUMNS = (
    "task", "method", "preset", "seed", "status", "final_train_loss", "final_train_loss_no_l2",
    "best_train_loss", "final_test_loss", "final_test_accuracy", "epochs", "steps",
    "wall_seconds", "cpu_seconds", "target_loss", "cpu_seconds_to_target",
    "wall_seconds_to_target", "epochs_to_target", "steps_per_second", "peak_memory_mb",
    "memory_start_mb", "memory_growth_mb", "optimizer_state_mb", "run_dir", "message",
)
GROUP_COLUMNS = (
    "task", "method", "runs", "finished", "diverged", "failed", "final_train_loss_mean",
    "final_train_loss_std", "best_train_loss_mean", "test_metric", "test_metric_mean",
    "test_metric_std", "epochs_mean", "target_loss", "cpu_seconds_to_target_mean",
    "reached_target", "steps_per_second_mean", "peak_memory_mb_max", "memory_growth_mb_max",
    "optimizer_state_mb_mean",
)


@dataclass
class RunData:
    """What the report needs from one run directory."""

    run_dir: Path
    status: dict[str, Any]
    curve: list[dict[str, float]]  # epochs.csv rows as floats
    target_setting: Any = "auto"
    time_axis: str = "cpu"

    @property
    def task(self) -> str:
        return self.status.get("task") or "main"

    @property
    def method(self) -> str:
        return self.status.get("method") or self.status.get("preset") or "?"

    @property
    def ok(self) -> bool:
        return self.status.get("status") == "finished"


@dataclass
class Report:
    """The written files and the Markdown table (what ``kfqn report`` prints)."""

    markdown: str
    files: list[Path] = field(default_factory=list)
    runs: list[dict[str, Any]] = field(default_factory=list)
    groups: list[dict[str, Any]] = field(default_factory=list)


def _float(v: Any) -> Optional[float]:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def collect(path: Path) -> list[RunData]:
    """Every run under ``path`` (a run or a sweep directory), in sweep order when known."""
    path = Path(path)
    if not path.exists():
        raise RunDirError(f"{path} does not exist; give a run or sweep directory (under runs/)")
    dirs = _sweep_order(path, find_runs(path))
    if not dirs:
        raise RunDirError(f"{path} holds no runs (no status.json below it); is it the right "
                          "directory?")
    out = []
    for d in dirs:
        status = read_status(d) or {}
        curve = [{k: _float(v) for k, v in row.items()} for row in read_csv(d / "epochs.csv")]
        target, time_axis = "auto", "cpu"
        if (d / CONFIG).exists():
            from omegaconf import OmegaConf

            rep = OmegaConf.load(str(d / CONFIG)).get("report") or {}
            target = rep.get("target_loss", "auto")
            time_axis = rep.get("time", "cpu")
        out.append(RunData(d, status, curve, target, time_axis))
    return out


def _sweep_order(path: Path, dirs: list[Path]) -> list[Path]:
    """``dirs`` in the order of the sweep's ``sweep.json`` when there is one, else sorted."""
    try:
        runs = json.loads((path / SWEEP).read_text())["runs"]
        rank = {Path(r["run_dir"]).resolve(): i for i, r in enumerate(runs)}
    except (OSError, ValueError, KeyError, TypeError):
        return dirs
    return sorted(dirs, key=lambda d: (rank.get(d.resolve(), len(rank)), str(d)))


def _time_to_target(run: RunData, target: Optional[float]) -> dict[str, Optional[float]]:
    none = {"cpu_seconds_to_target": None, "wall_seconds_to_target": None,
            "epochs_to_target": None}
    if target is None or run.status.get("status") == "failed":
        return none
    for row in run.curve:
        loss = row.get("train_loss")
        if loss is not None and loss <= target:
            return {"cpu_seconds_to_target": row.get("cpu_seconds"),
                    "wall_seconds_to_target": row.get("wall_seconds"),
                    "epochs_to_target": row.get("epoch")}
    return none


def _mean(xs: Sequence[Optional[float]]) -> Optional[float]:
    xs = [x for x in xs if x is not None]
    return statistics.fmean(xs) if xs else None


def _std(xs: Sequence[Optional[float]]) -> Optional[float]:
    xs = [x for x in xs if x is not None]
    return statistics.stdev(xs) if len(xs) > 1 else (0.0 if xs else None)


def _groups(runs: Sequence[RunData]) -> dict[tuple[str, str], list[RunData]]:
    groups: dict[tuple[str, str], list[RunData]] = {}
    for r in runs:
        groups.setdefault((r.task, r.method), []).append(r)
    return groups


def resolve_targets(runs: Sequence[RunData], override: Any = None) -> dict[str, Optional[float]]:
    """Target loss per task (see the module docstring)."""
    targets: dict[str, Optional[float]] = {}
    groups = _groups(runs)
    for task in dict.fromkeys(r.task for r in runs):
        setting = override if override is not None else next(
            (r.target_setting for r in runs if r.task == task), "auto")
        if setting is None or setting == "none":
            targets[task] = None
        elif setting == "auto":
            finals = [_mean([_float(r.status.get("final_train_loss")) for r in g if r.ok])
                      for (t, _), g in groups.items() if t == task]
            finals = [f for f in finals if f is not None]
            targets[task] = max(finals) if finals else None
        else:
            targets[task] = float(setting)
    return targets


def run_rows(runs: Sequence[RunData], targets: dict[str, Optional[float]]) -> list[dict]:
    """One row per run (columns :data:`RUN_COLUMNS`)."""
    rows = []
    for r in runs:
        s = r.status
        row = {c: s.get(c) for c in RUN_COLUMNS}
        peak, start = _float(s.get("peak_memory_mb")), _float(s.get("memory_start_mb"))
        row.update({"task": r.task, "method": r.method, "run_dir": str(r.run_dir),
                    "target_loss": targets.get(r.task),
                    "memory_growth_mb": peak - start if peak is not None and start is not None
                    else None})
        row.update(_time_to_target(r, targets.get(r.task)))
        rows.append(row)
    return rows


def group_rows(runs: Sequence[RunData], rows: Sequence[dict],
               targets: dict[str, Optional[float]]) -> list[dict]:
    """One row per (task, method), means over the finished seeds (columns :data:`GROUP_COLUMNS`)."""
    by_dir = {row["run_dir"]: row for row in rows}
    out = []
    for (task, method), group in _groups(runs).items():
        rs = [by_dir[str(r.run_dir)] for r in group]
        ok = [row for row, r in zip(rs, group) if r.ok]
        classify = any(r.status.get("task_type") == "classification" for r in group)
        metric = "final_test_accuracy" if classify else "final_test_loss"
        reached = [row["cpu_seconds_to_target"] for row in ok
                   if row["cpu_seconds_to_target"] is not None]
        out.append({
            "task": task, "method": method, "runs": len(group), "finished": len(ok),
            "diverged": sum(r.status.get("status") == "diverged" for r in group),
            "failed": sum(r.status.get("status") not in ("finished", "diverged") for r in group),
            "final_train_loss_mean": _mean([_float(x["final_train_loss"]) for x in ok]),
            "final_train_loss_std": _std([_float(x["final_train_loss"]) for x in ok]),
            "best_train_loss_mean": _mean([_float(x["best_train_loss"]) for x in ok]),
            "test_metric": "test_accuracy" if classify else "test_loss",
            "test_metric_mean": _mean([_float(x[metric]) for x in ok]),
            "test_metric_std": _std([_float(x[metric]) for x in ok]),
            "epochs_mean": _mean([_float(x["epochs"]) for x in ok]),
            "target_loss": targets.get(task),
            "cpu_seconds_to_target_mean": _mean(reached) if len(reached) == len(ok) else None,
            "reached_target": f"{len(reached)}/{len(ok)}",
            "steps_per_second_mean": _mean([_float(x["steps_per_second"]) for x in ok]),
            "peak_memory_mb_max": max((v for v in (_float(x["peak_memory_mb"]) for x in rs)
                                       if v is not None), default=None),
            "memory_growth_mb_max": max((v for v in (_float(x["memory_growth_mb"]) for x in rs)
                                         if v is not None), default=None),
            "optimizer_state_mb_mean": _mean([_float(x["optimizer_state_mb"]) for x in rs]),
        })
    return out


def _fmt(v: Optional[float], digits: int = 4) -> str:
    if v is None:
        return "-"
    if abs(v) >= 1e4 or (0 < abs(v) < 1e-3):
        return f"{v:.{digits - 1}e}"
    return f"{v:.{digits}g}"


def _pm(mean: Optional[float], std: Optional[float]) -> str:
    if mean is None:
        return "-"
    return _fmt(mean) + (f" ± {_fmt(std, 2)}" if std else "")


def _mem(g: dict) -> str:
    peak, growth = g["peak_memory_mb_max"], g["memory_growth_mb_max"]
    if peak is None:
        return "-"
    return f"{peak:.0f}" + (f" (+{growth:.0f})" if growth is not None else "")


def markdown_table(groups: Sequence[dict]) -> str:
    """The per-(task, method) table as GitHub Markdown."""
    head = ("| task | method | runs | final train loss | best train loss | test | epochs | "
            "CPU s to target | steps/s | peak MB (+run) | opt. state MB |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for g in groups:
        runs = f"{g['finished']}/{g['runs']}"
        if g["diverged"]:
            runs += f" ({g['diverged']} div.)"
        if g["failed"]:
            runs += f" ({g['failed']} failed)"
        if g["test_metric"] == "test_accuracy" and g["test_metric_mean"] is not None:
            test = f"{100 * g['test_metric_mean']:.2f}% acc"
        else:
            test = _pm(g["test_metric_mean"], g["test_metric_std"])
            test = test if test == "-" else f"{test} loss"
        ttt = _fmt(g["cpu_seconds_to_target_mean"], 3)
        if ttt == "-" and g["finished"]:
            ttt = f"- ({g['reached_target']} reached)"
        lines.append(
            f"| {g['task']} | {g['method']} | {runs} | "
            f"{_pm(g['final_train_loss_mean'], g['final_train_loss_std'])} | "
            f"{_fmt(g['best_train_loss_mean'])} | {test} | {_fmt(g['epochs_mean'], 3)} | {ttt} | "
            f"{_fmt(g['steps_per_second_mean'], 3)} | {_mem(g)} | "
            f"{_fmt(g['optimizer_state_mb_mean'], 3)} |")
    return "\n".join(lines)


def _write_csv(path: Path, columns: Sequence[str], rows: Sequence[dict]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, columns, extrasaction="ignore")
        w.writeheader()
        for row in rows:
            w.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})
    return path


def write_report(path: str | Path, out_dir: Optional[str | Path] = None,
                 target_loss: Any = None, time_axis: Optional[str] = None,
                 plots: bool = True) -> Report:
    """Write the report of the run or sweep at ``path`` (into ``out_dir``, default ``path``)."""
    path = Path(path)
    runs = collect(path)
    out = Path(out_dir) if out_dir else path
    out.mkdir(parents=True, exist_ok=True)
    targets = resolve_targets(runs, target_loss)
    rows = run_rows(runs, targets)
    groups = group_rows(runs, rows, targets)
    files = [_write_csv(out / "runs.csv", RUN_COLUMNS, rows),
             _write_csv(out / "report.csv", GROUP_COLUMNS, groups)]
    table = markdown_table(groups)
    plot_files: list[Path] = []
    if plots:
        from kfqn.runner.plots import plot_task

        axis = time_axis or (runs[0].time_axis if runs else "cpu")
        for task in dict.fromkeys(r.task for r in runs):
            plot_files += plot_task([r for r in runs if r.task == task], task, out / "plots",
                                    axis)
    files += plot_files
    md = [f"# Report: {path}", "",
          "Training loss = evaluated loss on the training set including the L2 term "
          "(tau/2)||theta||^2; mean ± std over seeds of the finished runs. "
          "'CPU s to target' = process CPU seconds of training until the loss first reached "
          "the task's target loss (at an evaluation). 'peak MB' = the process's peak resident "
          "memory during the run (Python and torch included; with sweep.fresh_process=false "
          "also what earlier runs of the same worker kept), '(+run)' = its growth during the "
          "run, 'opt. state MB' = the optimizer's own state.", ""]
    for task, t in targets.items():
        md.append(f"- target loss for {task}: {_fmt(t) if t is not None else 'none'}")
    md += ["", table, ""]
    problems = [r for r in rows if r.get("status") not in ("finished", None)]
    if problems:
        md += ["## Runs that did not finish", ""]
        md += [f"- {r['task']}/{r['method']}/seed{r['seed']}: {r['status']}: {r['message']}"
               for r in problems]
        md.append("")
    if plot_files:
        md += ["## Plots", ""] + [f"![{p.stem}]({p.relative_to(out)})" for p in plot_files]
    (out / "report.md").write_text("\n".join(md) + "\n")
    files.insert(2, out / "report.md")
    return Report(table, files, rows, groups)
