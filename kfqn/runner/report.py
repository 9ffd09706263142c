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
from kfqn.runner.rundir import CONFIG, STATUS, SWEEP, find_runs, read_status

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
    notes: list[str] = field(default_factory=list)


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
    dirs = _sweep_runs(path) if (path / SWEEP).exists() else find_runs(path)
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


def _sweep_runs(path: Path) -> list[Path]:
    """The runs of the sweep at ``path``, in the order of its ``sweep.json`` (other run
    directories below it, e.g. ``kfqn train`` runs under ``train/``, are not part of it)."""
    try:
        runs = json.loads((path / SWEEP).read_text())["runs"]
        dirs = [Path(r["run_dir"]) for r in runs]
    except (OSError, ValueError, KeyError, TypeError):
        return find_runs(path)
    return [d for d in dirs if (d / STATUS).exists()]


def target_problems(runs: Sequence[RunData],
                    targets: dict[str, Optional[float]]) -> dict[str, str]:
    """Tasks whose target says nothing: every run starts below it, or none comes near it."""
    out = {}
    for task, target in targets.items():
        if target is None:
            continue
        losses = [[row.get("train_loss") for row in r.curve if row.get("train_loss") is not None]
                  for r in runs if r.task == task]
        losses = [ls for ls in losses if ls]
        if not losses:
            continue
        starts = [ls[0] for ls in losses]
        best = min(min(ls) for ls in losses)
        if all(st <= target for st in starts):
            out[task] = (f"every run of {task} starts below the target {_fmt(target)} (initial "
                         f"losses {_fmt(min(starts))}..{_fmt(max(starts))}): the time to target "
                         "is not shown; give a lower target for this task")
        elif best > target:
            out[task] = (f"no run of {task} reaches the target {_fmt(target)} (best loss "
                         f"{_fmt(best)}): give a higher target for this task")
    return out


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


def parse_target(text: str) -> Any:
    """``--target-loss``: ``auto``, ``none``, a number, or ``task=number,task=auto,...``."""
    from kfqn.runner.errors import ConfigError

    def one(v: str) -> Any:
        if v in ("auto", "none"):
            return v
        try:
            return float(v)
        except ValueError:
            raise ConfigError(f"--target-loss {text!r}: give a number, 'auto', 'none' or "
                              "task=value pairs such as curves=150,digits=0.05") from None

    if "=" not in text:
        return one(text)
    out = {}
    for part in text.split(","):
        task, sep, value = part.partition("=")
        if not sep or not task.strip():
            raise ConfigError(f"--target-loss {text!r}: give task=value pairs such as "
                              "curves=150,digits=0.05")
        out[task.strip()] = one(value.strip())
    return out


def _setting_for(setting: Any, task: str) -> Any:
    if isinstance(setting, dict) or hasattr(setting, "items"):
        return dict(setting).get(task, "auto")
    return setting


def resolve_targets(runs: Sequence[RunData], override: Any = None) -> dict[str, Optional[float]]:
    """Target loss per task (see the module docstring)."""
    targets: dict[str, Optional[float]] = {}
    groups = _groups(runs)
    if isinstance(override, dict):
        from kfqn.core.registry import close_matches
        from kfqn.runner.errors import ConfigError

        tasks = list(dict.fromkeys(r.task for r in runs))
        for t in override:
            if t not in tasks:
                raise ConfigError(f"--target-loss: no task {t!r} in these runs; tasks: "
                                  f"{', '.join(tasks)}." + close_matches(t, tasks))
    for task in dict.fromkeys(r.task for r in runs):
        if override is not None:
            setting = _setting_for(override, task)
        else:
            setting = _setting_for(next((r.target_setting for r in runs if r.task == task),
                                        "auto"), task)
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
    flagged = target_problems(runs, targets)
    shown = {t: (None if t in flagged and "starts below" in flagged[t] else v)
             for t, v in targets.items()}
    rows = run_rows(runs, shown)
    groups = group_rows(runs, rows, shown)
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
    processes = {r.status.get("process", "shared") for r in runs}
    if processes == {"own"}:
        mem_note = ("'peak MB' = the peak resident memory of the run's own process (Python "
                    "and torch included, about 300-400 MB of it)")
    else:
        mem_note = ("'peak MB' = the peak resident memory of the process during the run; some "
                    "runs shared a process with earlier runs (sweep.fresh_process=false), whose "
                    "leftovers count too: compare the '(+run)' growth, or rerun with "
                    "sweep.fresh_process=true")
    md = [f"# Report: {path}", "",
          "Training loss = evaluated loss on the training set including the L2 term "
          "(tau/2)||theta||^2; mean ± std over seeds of the finished runs. "
          "'CPU s to target' = process CPU seconds of training until the loss first reached "
          "the task's target loss (at an evaluation). " + mem_note + "; '(+run)' = its growth "
          "during the run, 'opt. state MB' = the optimizer's own state.", ""]
    notes = []
    for task, t in targets.items():
        line = f"- target loss for {task}: {_fmt(t) if t is not None else 'none'}"
        if task in flagged:
            line += f" (**{flagged[task]}**)"
            notes.append(f"note: {flagged[task]}")
        md.append(line)
    md += ["", table, ""]
    for task in dict.fromkeys(r.task for r in runs):
        task_runs = [r for r in runs if r.task == task]
        if not any(r.ok for r in task_runs):
            why = sorted({str(r.status.get("status")) for r in task_runs})
            msg = (f"no run of {task} finished ({', '.join(why)}): no plots for {task}; the "
                   "messages below say why")
            notes.append(f"note: {msg}")
            md += [f"**{msg}.**", ""]
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
    return Report(table, files, rows, groups, notes)
