"""Sweeps: the grid tasks x optimizer presets x ``sweep.grid`` points x seeds, run in order or
in worker processes, each run in its own directory under the sweep directory.

Every run's config is composed and checked before the first run starts. A run that fails (an
exception, an optimizer that cannot precondition the model) or diverges is recorded and the
sweep goes on with the next one. Existing run directories are never taken over silently
(:func:`check_existing`). Ctrl-C stops the queue, lets the running runs checkpoint and records
the state in ``sweep.json``; ``kfqn sweep <sweep dir> --resume`` then skips finished runs,
continues interrupted ones from their checkpoints and starts the rest.
"""
from __future__ import annotations

import itertools
import multiprocessing as mp
import os
import signal
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

from omegaconf import DictConfig, OmegaConf

from kfqn.core.errors import ConfigError, KfqnError
from kfqn.runner import config as cfgmod
from kfqn.runner.errors import RunDirError
from kfqn.runner.rundir import (CONFIG, FINAL_STATES, SWEEP, is_run_dir, read_status, run_path,
                                write_json)


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


def sweep_dir_of(base: DictConfig, label: str = "") -> Path:
    """``<logging.root>/<name>`` (``<name>-<label>`` with a label of overrides)."""
    root = cfgmod.resolve(OmegaConf.create({"r": base.logging.root, "n": base.name}))
    name = cfgmod.check_name(root.n)
    return Path(root.r) / (f"{name}-{label}" if label else name)


def _grid_points(grid: Any) -> list[list[tuple[str, Any]]]:
    if not grid:
        return [[]]
    if not isinstance(grid, Mapping):
        raise ConfigError(f"sweep.grid = {grid!r} must be a mapping of config keys to lists of "
                          "values, e.g. 'sweep.grid={optimizer.lr: [0.1, 0.3]}'")
    items = []
    for key, values in grid.items():
        values = list(values) if isinstance(values, (list, tuple)) else [values]
        if not values:
            raise ConfigError(f"sweep.grid.{key} is an empty list; give at least one value")
        items.append([(str(key), v) for v in values])
    return [list(p) for p in itertools.product(*items)]


def _name_list(sweep_cfg: Mapping, key: str) -> Optional[list[str]]:
    value = sweep_cfg.get(key)
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"sweep.{key} = {value!r} must be a list of names, e.g. "
                          f"sweep.{key}=[a,b]")
    return list(value)


def expand(base: DictConfig, overrides: Sequence[tuple[str, Any]], sweep_dir: Path,
           note: Callable[[str], None] = print) -> list[RunSpec]:
    """Every run of the sweep described by ``base`` (defaults + file + overrides).

    A preset that is not registered is an error naming the close match; with
    ``sweep.skip_missing_presets`` a name that is close to no registered preset is skipped with
    a ``note`` instead. Each run's config is composed and checked here (:func:`preflight`:
    components, options, optimizer spec, K-FAC loss), so a mistake stops the sweep before
    anything runs or is deleted.
    """
    from kfqn.core.registry import close_matches, default_registry
    from kfqn.runner.preflight import preflight

    sw = base.sweep
    sweep_cfg = cfgmod.to_dict(sw)
    tasks: list[Optional[str]]
    named_tasks = _name_list(sweep_cfg, "tasks")
    if named_tasks:
        tasks = named_tasks
    elif base.get("tasks"):
        tasks = [str(t) for t in base.tasks]
    else:
        tasks = [base.get("task")]
    presets = _name_list(sweep_cfg, "presets") or [base.optimizer.get("preset")]
    registered = default_registry().names("preset")
    kept = []
    for p in presets:
        if p in registered:
            kept.append(p)
            continue
        hint = close_matches(str(p), registered)
        if sw.skip_missing_presets and not hint:
            note(f"note: preset {p!r} is not registered; skipping it "
                 f"(registered: {', '.join(registered)})")
        else:
            raise ConfigError(f"sweep.presets: preset {p!r} is not registered; registered: "
                              f"{', '.join(registered)}." + hint)
    if not kept:
        raise ConfigError("the sweep has no runs: none of sweep.presets is registered")
    seeds = sweep_cfg.get("seeds") or [base.seed]
    if not isinstance(seeds, (list, tuple)) or not all(
            isinstance(s, int) and not isinstance(s, bool) and 0 <= s <= cfgmod.MAX_SEED
            for s in seeds):
        raise ConfigError(f"sweep.seeds = {seeds!r}: expected a list of integers in "
                          f"[0, {cfgmod.MAX_SEED}], e.g. sweep.seeds=[0,1,2]")
    points = _grid_points(sweep_cfg.get("grid"))

    specs = []
    for task, preset, point, seed in itertools.product(tasks, kept, points, seeds):
        cfg = cfgmod.compose_run(base, overrides, task=task, preset=preset, seed=seed,
                                 grid_point=point)
        preflight(cfg)
        method = method_label(preset, point)
        run_dir = run_path(sweep_dir, task, method.replace("[", "-").replace("]", ""), seed)
        cfg.logging.run_dir = str(run_dir)
        specs.append(RunSpec(task, preset, seed, {k: v for k, v in point}, method,
                             str(run_dir), cfgmod.to_dict(cfg)))
    return specs


def config_mismatch(run_dir: Path, config: Mapping[str, Any]) -> list[str]:
    """Differences (outside the sections that may change on resume) between the config saved
    in ``run_dir`` and ``config``; empty when they describe the same run."""
    saved = Path(run_dir) / CONFIG
    if not saved.exists():
        return []
    old = cfgmod.to_dict(cfgmod.load_file(saved))
    return [d for d in cfgmod.config_diff(old, dict(config))
            if d.split(".")[0].split(":")[0] not in cfgmod.RESUMABLE_SECTIONS]


def check_existing(specs: Sequence[RunSpec], resume: bool, overwrite: bool) -> None:
    """Refuse to start a sweep over existing runs unless they are resumed (same config) or
    replaced (``overwrite``; each is deleted only when its replacement starts)."""
    existing = [s for s in specs if is_run_dir(Path(s.run_dir))]
    if not existing or overwrite:
        return
    if not resume:
        first = existing[0].run_dir
        raise RunDirError(
            f"{len(existing)} of the sweep's {len(specs)} run directories already hold runs "
            f"(e.g. {first}, status {(read_status(Path(first)) or {}).get('status', '?')}); "
            "pass --resume to continue them, --overwrite to replace them, or set "
            "name=OTHER_NAME")
    for s in existing:
        diff = config_mismatch(Path(s.run_dir), s.config)
        if diff:
            raise RunDirError(
                f"cannot resume: {s.run_dir} holds a run whose config differs in "
                f"{'; '.join(diff[:3])}{' ...' if len(diff) > 3 else ''}; start a new sweep "
                "(name=OTHER_NAME) or pass --overwrite to replace it")


def _record(spec: RunSpec, status: str, message: str, summary: Optional[dict] = None,
            seconds: float = 0.0) -> dict[str, Any]:
    rec = {k: v for k, v in asdict(spec).items() if k != "config"}
    rec.update({"label": spec.label, "status": status, "message": message,
                "elapsed_seconds": seconds})
    for k in ("final_train_loss", "final_test_accuracy", "final_test_loss", "epochs"):
        rec[k] = (summary or {}).get(k)
    return rec


def run_one(spec: RunSpec, resume: bool, quiet: bool, overwrite: bool = False,
            process: str = "shared") -> dict[str, Any]:
    """Run ``spec`` (or skip it when resuming and it already ended); never raises for a run's
    own failure, which is returned as status ``failed``. ``process`` (``own`` or ``shared``)
    is recorded with the run: whether its peak memory is that of a process of its own."""
    from kfqn.runner.trainer import train_run

    t0 = time.perf_counter()
    previous = read_status(Path(spec.run_dir)) if resume else None
    if previous and previous.get("status") in FINAL_STATES:
        return _record(spec, previous["status"], "already done (resume)", previous)
    try:
        result = train_run(OmegaConf.create(spec.config), Path(spec.run_dir), resume=resume,
                           overwrite=overwrite, quiet=quiet,
                           identity={**spec.identity(), "process": process})
    except KeyboardInterrupt:
        return _record(spec, "interrupted", "interrupted before its first checkpoint"
                       if not Path(spec.run_dir, "checkpoint.pt").exists() else "interrupted",
                       seconds=time.perf_counter() - t0)
    except KfqnError as exc:
        msg = " ".join(str(exc).split())
        return _record(spec, "failed", msg, seconds=time.perf_counter() - t0)
    except Exception as exc:  # a bug or an optimizer failure: recorded by the trainer, go on
        msg = f"{type(exc).__name__}: {exc}".splitlines()[0]
        if not is_run_dir(Path(spec.run_dir)):
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


def _child(spec_dict: dict, resume: bool, overwrite: bool, threads: int, conn: Any) -> None:
    """Body of a run's own process: a process group of its own (a Ctrl-C at the terminal
    reaches only the sweep, which passes exactly one SIGINT on), one run, its record back."""
    import torch

    try:
        os.setpgrp()
    except (AttributeError, OSError):  # not on POSIX
        pass
    signal.signal(signal.SIGINT, signal.default_int_handler)
    torch.set_num_threads(threads)
    rec = run_one(RunSpec(**spec_dict), resume, quiet=True, overwrite=overwrite, process="own")
    conn.send(rec)
    conn.close()


class _Interrupts:
    """SIGINT in the sweep's process: the first stops the queue and asks every running run to
    checkpoint and stop; a second one aborts the running runs at once."""

    def __init__(self, echo: Callable[[str], None]) -> None:
        self.count = 0
        self.echo = echo
        self.children: dict[int, Any] = {}
        self._old: Any = None

    def __enter__(self) -> "_Interrupts":
        if threading.current_thread() is threading.main_thread():
            try:
                self._old = signal.signal(signal.SIGINT, self._handle)
            except ValueError:
                self._old = None
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)

    def _handle(self, signum: int, frame: Any) -> None:
        self.count += 1
        if self.count == 1:
            self.echo("interrupt: no new runs start; the running ones checkpoint and stop "
                      "(Ctrl-C again to abort them without a checkpoint)")
        for proc in list(self.children.values()):
            if proc.is_alive() and proc.pid:
                try:
                    os.kill(proc.pid, signal.SIGINT)
                except OSError:
                    pass


def run_sweep(specs: Sequence[RunSpec], sweep_dir: Path, *, workers: int = 1,
              resume: bool = False, quiet: bool = False, fresh_process: bool = False,
              overwrite: bool = False,
              echo: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Run every spec; write and return the per-run records (also in ``sweep.json``).

    With ``fresh_process`` or ``workers`` > 1 every run gets a process of its own (at most
    ``workers`` at a time): its own peak memory, and a crash takes no other run along.
    Ctrl-C stops the queue, lets the running runs checkpoint, records the state in
    ``sweep.json`` ("interrupted") and returns; ``kfqn sweep <sweep dir> --resume`` continues.
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
        _write_index(sweep_dir, specs, records, "running")

    _write_index(sweep_dir, specs, records, "running")
    interrupted = False
    with _Interrupts(echo) as intr:
        if workers <= 1 and not fresh_process:
            for i, spec in enumerate(specs):
                if intr.count:
                    interrupted = True
                    break
                signal_guard = intr._old is not None
                if signal_guard:  # the trainer's own Ctrl-C handling during the run
                    signal.signal(signal.SIGINT, intr._old)
                try:
                    rec = run_one(spec, resume, quiet, overwrite)
                finally:
                    if signal_guard:
                        signal.signal(signal.SIGINT, intr._handle)
                done(i, rec)
                if rec["status"] == "interrupted":
                    interrupted = True
                    break
        else:
            interrupted = _run_processes(specs, workers, resume, overwrite, intr, done)
    state = "interrupted" if interrupted or any(
        r is None or r["status"] == "interrupted" for r in records) else "done"
    _write_index(sweep_dir, specs, records, state)
    if state == "interrupted":
        from kfqn.runner.checkpoint import has_checkpoint

        ended = sum(1 for r in records if r and r["status"] != "interrupted")
        stopped = [s for s, r in zip(specs, records) if r and r["status"] == "interrupted"]
        saved = sum(has_checkpoint(Path(s.run_dir)) for s in stopped)
        echo(f"sweep interrupted: {ended} ended, {len(stopped)} stopped ({saved} with a "
             f"checkpoint), {sum(r is None for r in records)} not started. "
             f"Continue with: kfqn sweep {sweep_dir} --resume")
    return [r for r in records if r is not None]


def _run_processes(specs: Sequence[RunSpec], workers: int, resume: bool, overwrite: bool,
                   intr: _Interrupts, done: Callable[[int, dict], None]) -> bool:
    """Every spec in a process of its own, ``workers`` at a time; True if interrupted."""
    from multiprocessing.connection import wait

    ctx = mp.get_context("spawn")
    threads = max(1, (os.cpu_count() or 1) // max(1, workers))
    queue = list(range(len(specs)))
    running: dict[int, tuple[Any, Any]] = {}
    try:
        while (queue and not intr.count) or running:
            while queue and not intr.count and len(running) < max(1, workers):
                i = queue.pop(0)
                recv, send = ctx.Pipe(duplex=False)
                proc = ctx.Process(target=_child, args=(asdict(specs[i]), resume, overwrite,
                                                        threads, send), daemon=False)
                proc.start()
                send.close()
                running[i] = (proc, recv)
                intr.children[i] = proc
            ready = wait([p.sentinel for p, _ in running.values()]
                         + [c for _, c in running.values()], timeout=0.5)
            for i, (proc, conn) in list(running.items()):
                if proc.sentinel not in ready and conn not in ready:
                    continue
                rec = None
                try:
                    if conn.poll():
                        rec = conn.recv()
                except (EOFError, OSError):
                    rec = None
                if rec is None and proc.is_alive():
                    continue
                proc.join()
                if rec is None:
                    code = proc.exitcode
                    rec = _record(specs[i], "interrupted" if intr.count else "failed",
                                  f"the run's process ended without a result (exit code {code})")
                conn.close()
                del running[i]
                intr.children.pop(i, None)
                done(i, rec)
    finally:
        for i, (proc, _) in running.items():  # an error in the sweep itself: stop the runs
            if proc.is_alive() and proc.pid:
                os.kill(proc.pid, signal.SIGINT)
            proc.join(timeout=60)
    return bool(intr.count) or bool(queue)


def _write_index(sweep_dir: Path, specs: Sequence[RunSpec], records: Sequence[Optional[dict]],
                 state: str = "running"):
    rows = []
    for spec, rec in zip(specs, records):
        rows.append(rec or {**{k: v for k, v in asdict(spec).items() if k != "config"},
                            "label": spec.label, "status": "pending"})
    data = {"state": state, "runs": rows, "updated": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if state == "interrupted":
        data["resume"] = f"kfqn sweep {sweep_dir} --resume"
    write_json(sweep_dir / SWEEP, data)


SWEEP_CONFIG = "sweep.yaml"


def save_sweep_config(base: DictConfig, overrides: Sequence[str], sweep_dir: Path) -> None:
    """The sweep's base config (interpolations kept) and its command-line overrides; written
    once, when the sweep starts (a resume keeps the record of what the runs were made with)."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    tmp = sweep_dir / f".{SWEEP_CONFIG}.{os.getpid()}.tmp"
    OmegaConf.save(base, str(tmp))
    os.replace(tmp, sweep_dir / SWEEP_CONFIG)
    tmp = sweep_dir / f".overrides.txt.{os.getpid()}.tmp"
    tmp.write_text("".join(f"{o}\n" for o in overrides))
    os.replace(tmp, sweep_dir / "overrides.txt")
