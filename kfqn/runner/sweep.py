"""Sweeps: the grid tasks x optimizer presets x ``sweep.grid`` points x seeds, run in order or
in worker processes, each run in its own directory under the sweep directory.

A run that fails (an exception, an optimizer that cannot precondition the model) or diverges is
recorded and the sweep goes on with the next one. Ctrl-C stops the running run(s) cleanly
(checkpointed) and ends the sweep; ``kfqn sweep CONFIG --resume`` then skips finished runs,
continues interrupted ones from their checkpoints and starts the rest.
"""
from __future__ import annotations

import itertools
import multiprocessing as mp
import os
import signal
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from omegaconf import DictConfig, OmegaConf

from kfqn.core.errors import ConfigError, KfqnError
from kfqn.runner import config as cfgmod
from kfqn.runner.rundir import FINAL_STATES, SWEEP, read_status, run_path, write_json


@dataclass
class RunSpec:
    """One run of a sweep: where it goes and its resolved config (a plain dict)."""

    task: Optional[str]
    preset: str
    seed: int
    grid: dict[str, Any]
    method: str
    run_dir: str
    config: dict[str, Any] = field(repr=False)

    @property
    def label(self) -> str:
        return f"{self.task + '/' if self.task else ''}{self.method}/seed{self.seed}"

    def identity(self) -> dict[str, Any]:
        return {"task": self.task, "preset": self.preset, "seed": self.seed, "grid": self.grid,
                "method": self.method, "label": self.label}


def _short_keys(keys: Sequence[str]) -> dict[str, str]:
    """Last component of each dotted key, or the full key where two would collide."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last)}


def method_label(preset: str, point: Sequence[tuple[str, Any]]) -> str:
    """``kbfgs`` or ``kbfgs[lr=0.1,damping=1]`` for a grid point."""
    if not point:
        return preset
    short = _short_keys([k for k, _ in point])
    return f"{preset}[{','.join(f'{short[k]}={v}' for k, v in point)}]"


def sweep_dir_of(base: DictConfig) -> Path:
    """``<logging.root>/<name>``."""
    root = cfgmod.resolve(OmegaConf.create({"r": base.logging.root, "n": base.name}))
    return Path(root.r) / str(root.n)


def _grid_points(grid: Any) -> list[list[tuple[str, Any]]]:
    if not grid:
        return [[]]
    items = []
    for key, values in grid.items():
        values = list(values) if isinstance(values, (list, tuple)) else [values]
        if not values:
            raise ConfigError(f"sweep.grid.{key} is an empty list; give at least one value")
        items.append([(str(key), v) for v in values])
    return [list(p) for p in itertools.product(*items)]


def expand(base: DictConfig, overrides: Sequence[tuple[str, Any]], sweep_dir: Path,
           note: Callable[[str], None] = print) -> list[RunSpec]:
    """Every run of the sweep described by ``base`` (defaults + file + overrides).

    Presets that are not registered are skipped with a ``note`` when
    ``sweep.skip_missing_presets`` is true, else they are an error. Each run's config is
    composed and validated here, so a config mistake stops the sweep before anything runs.
    """
    from kfqn.core.registry import close_matches, default_registry

    sw = base.sweep
    sweep_cfg = cfgmod.to_dict(sw)
    tasks: list[Optional[str]]
    if sweep_cfg.get("tasks"):
        tasks = [str(t) for t in sweep_cfg["tasks"]]
    elif base.get("tasks"):
        tasks = [str(t) for t in base.tasks]
    else:
        tasks = [base.get("task")]
    presets = [str(p) for p in (sweep_cfg.get("presets") or [base.optimizer.get("preset")])]
    registered = default_registry().names("preset")
    kept = []
    for p in presets:
        if p in registered:
            kept.append(p)
        elif sw.skip_missing_presets:
            note(f"note: preset {p!r} is not registered; skipping it "
                 f"(registered: {', '.join(registered)})")
        else:
            raise ConfigError(f"sweep.presets: preset {p!r} is not registered; registered: "
                              f"{', '.join(registered)}." + close_matches(p, registered))
    if not kept:
        raise ConfigError("the sweep has no runs: none of sweep.presets is registered")
    seeds = sweep_cfg.get("seeds") or [base.seed]
    if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds):
        raise ConfigError(f"sweep.seeds = {seeds!r}: expected a list of non-negative integers")
    points = _grid_points(sweep_cfg.get("grid"))

    specs = []
    for task, preset, point, seed in itertools.product(tasks, kept, points, seeds):
        cfg = cfgmod.compose_run(base, overrides, task=task, preset=preset, seed=seed,
                                 grid_point=point)
        method = method_label(preset, point)
        run_dir = run_path(sweep_dir, task, method.replace("[", "-").replace("]", ""), seed)
        cfg.logging.run_dir = str(run_dir)
        specs.append(RunSpec(task, preset, seed, {k: v for k, v in point}, method,
                             str(run_dir), cfgmod.to_dict(cfg)))
    return specs


def _record(spec: RunSpec, status: str, message: str, summary: Optional[dict] = None,
            seconds: float = 0.0) -> dict[str, Any]:
    rec = {k: v for k, v in asdict(spec).items() if k != "config"}
    rec.update({"label": spec.label, "status": status, "message": message,
                "elapsed_seconds": seconds})
    for k in ("final_train_loss", "final_test_accuracy", "final_test_loss", "epochs"):
        rec[k] = (summary or {}).get(k)
    return rec


def run_one(spec: RunSpec, resume: bool, quiet: bool) -> dict[str, Any]:
    """Run ``spec`` (or skip it when resuming and it already ended); never raises for a run's
    own failure, which is returned as status ``failed``."""
    from kfqn.runner.trainer import train_run

    t0 = time.perf_counter()
    previous = read_status(Path(spec.run_dir)) if resume else None
    if previous and previous.get("status") in FINAL_STATES:
        return _record(spec, previous["status"], "already done (resume)", previous)
    try:
        result = train_run(OmegaConf.create(spec.config), Path(spec.run_dir), resume=resume,
                           quiet=quiet, identity=spec.identity())
    except KfqnError as exc:
        msg = str(exc).splitlines()[0]
        _mark_failed(spec, msg)
        return _record(spec, "failed", msg, seconds=time.perf_counter() - t0)
    except Exception as exc:  # a bug or an optimizer failure: record it, go on
        msg = f"{type(exc).__name__}: {exc}".splitlines()[0]
        _mark_failed(spec, msg, traceback.format_exc())
        return _record(spec, "failed", msg, seconds=time.perf_counter() - t0)
    return _record(spec, result.status, result.message, result.summary,
                   time.perf_counter() - t0)


def _mark_failed(spec: RunSpec, message: str, tb: Optional[str] = None) -> None:
    from kfqn.runner.rundir import write_status

    run_dir = Path(spec.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if tb:
        (run_dir / "error.txt").write_text(tb)
    write_status(run_dir, {**spec.identity(), "status": "failed", "message": message,
                           "run_dir": str(run_dir)})


def _init_worker(threads: int) -> None:
    import torch

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the trainer handles Ctrl-C during a run
    torch.set_num_threads(threads)


def _run_in_worker(spec_dict: dict, resume: bool) -> dict[str, Any]:
    return run_one(RunSpec(**spec_dict), resume, quiet=True)


def run_sweep(specs: Sequence[RunSpec], sweep_dir: Path, *, workers: int = 1,
              resume: bool = False, quiet: bool = False, fresh_process: bool = False,
              echo: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Run every spec; write and return the per-run records (also in ``sweep.json``).

    ``workers`` > 1 runs in that many worker processes; ``fresh_process`` starts a new process
    for every run (isolated memory measurements, a crash cannot take other runs along).
    """
    sweep_dir = Path(sweep_dir)
    records: list[Optional[dict]] = [None] * len(specs)
    n = len(specs)

    def done(i: int, rec: dict) -> None:
        records[i] = rec
        loss = rec.get("final_train_loss")
        loss_txt = (f"  train loss {loss:.5g}"
                    if isinstance(loss, float) and rec["status"] == "finished" else "")
        echo(f"[{sum(r is not None for r in records)}/{n}] {rec['label']}: {rec['status']}"
             f"{loss_txt}  ({rec['elapsed_seconds']:.1f} s)"
             + (f"  - {rec['message']}" if rec["status"] in ("failed", "diverged") else ""))
        _write_index(sweep_dir, specs, records)

    _write_index(sweep_dir, specs, records)
    if workers <= 1 and not fresh_process:
        for i, spec in enumerate(specs):
            rec = run_one(spec, resume, quiet)
            done(i, rec)
            if rec["status"] == "interrupted":
                echo("sweep interrupted; continue it with: kfqn sweep <config> --resume")
                break
    else:
        threads = max(1, (os.cpu_count() or 1) // workers)
        ctx = mp.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                                 initargs=(threads,),
                                 max_tasks_per_child=1 if fresh_process else None) as ex:
            futures = {ex.submit(_run_in_worker, asdict(s), resume): i
                       for i, s in enumerate(specs)}
            try:
                for fut in as_completed(futures):
                    i = futures[fut]
                    try:
                        rec = fut.result()
                    except Exception as exc:  # the worker process itself died
                        rec = _record(specs[i], "failed", f"worker failed: {exc!r}")
                    done(i, rec)
            except KeyboardInterrupt:
                echo("interrupt: waiting for the running runs to checkpoint; "
                     "continue later with kfqn sweep <config> --resume")
                ex.shutdown(wait=True, cancel_futures=True)
    return [r for r in records if r is not None]


def _write_index(sweep_dir: Path, specs: Sequence[RunSpec], records: Sequence[Optional[dict]]):
    rows = []
    for spec, rec in zip(specs, records):
        rows.append(rec or {**{k: v for k, v in asdict(spec).items() if k != "config"},
                            "label": spec.label, "status": "pending"})
    write_json(sweep_dir / SWEEP, {"runs": rows,
                                   "updated": time.strftime("%Y-%m-%dT%H:%M:%S")})


def save_sweep_config(base: DictConfig, overrides: Sequence[str], sweep_dir: Path) -> None:
    """The sweep's base config (interpolations kept) and its command-line overrides."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(base, str(sweep_dir / "sweep.yaml"))
    (sweep_dir / "overrides.txt").write_text("".join(f"{o}\n" for o in overrides))
