"""The ``kfqn`` command line.

::

    kfqn train CONFIG [key=value ...]    one run (CONFIG: a YAML file, the name of a shipped
                                         config such as quickstart, or a run directory)
    kfqn sweep CONFIG [key=value ...]    tasks x presets x grid x seeds, then the report
    kfqn report RUN_DIR                  tables and plots of a finished run or sweep
    kfqn components                      the registered components

Exit status: 0 success; 1 a run diverged or failed; 2 a usage or configuration error (one
line on stderr); 3 ``kfqn bench --strict``: a performance target missed; 130 interrupted
(resume with ``--resume``).

Subcommands are registered with :func:`register_command` (name -> help, add_arguments, run).
An optional module ``kfqn.bench`` contributes ``kfqn bench`` when present: it must define
``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int``.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from kfqn.core.errors import KfqnError


@dataclass(frozen=True)
class Command:
    """A subcommand: one-line help, a function adding its arguments, and its entry point."""

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    description: str = ""


COMMANDS: dict[str, Command] = {}


def register_command(name: str, help: str, add_arguments: Callable[[argparse.ArgumentParser], None],
                     run: Callable[[argparse.Namespace], int], description: str = "") -> None:
    """Add (or replace) the subcommand ``kfqn NAME``."""
    COMMANDS[name] = Command(help, add_arguments, run, description or help)


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (exit status 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _err(prog: str, exc: BaseException) -> None:
    text = " ".join(str(exc).split()) or type(exc).__name__
    print(f"{prog}: error: {text}", file=sys.stderr)


# -- train -----------------------------------------------------------------------------------------
def _add_common(p: argparse.ArgumentParser, what: str) -> None:
    names = ", ".join(_experiment_names()) or "quickstart"
    p.add_argument("config", help=f"experiment YAML file, or the name of a shipped config "
                   f"({names})" + (", or a run directory" if what == "run" else
                                   ", or a sweep directory (with --resume)"))
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, e.g. optimizer.lr=0.1 budget.epochs=5 "
                        "data.options.n_train=2000; those that change the experiment name "
                        "its directory (kbfgs-lr=0.1), so a new override is a new " + what)
    p.add_argument("--resume", action="store_true",
                   help=f"continue the {what} in its existing directory from its checkpoint(s)")
    p.add_argument("--overwrite", action="store_true",
                   help=f"replace an existing {what} of the same directory (deleted only once "
                        "the new config has been checked and built)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def _experiment_names() -> list[str]:
    try:
        from kfqn.runner.config import experiment_names

        return experiment_names()
    except Exception:  # listing is a nicety of the help text
        return []


def _nproc(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"invalid --nproc {text!r}: give the number of "
                                         "processes (ranks), an integer >= 1")
    return n


def _train_args(p: argparse.ArgumentParser) -> None:
    _add_common(p, "run")
    p.add_argument("--nproc", type=_nproc, default=None, metavar="N",
                   help="data-parallel training on N local processes (ranks): data.batch_size "
                        "is the global batch (divisible by N), each rank trains on its slice "
                        "of it and the run follows the one-process run; rank 0 writes the run "
                        "directory. Under torchrun or srun leave it out: kfqn train joins the "
                        "ranks the launcher started (RANK/WORLD_SIZE or SLURM_PROCID/"
                        "SLURM_STEP_NUM_TASKS)")


def _flags(args: argparse.Namespace) -> None:
    from kfqn.runner.errors import ConfigError

    if args.resume and args.overwrite:
        raise ConfigError("--resume and --overwrite exclude each other: --resume continues the "
                          "existing run(s), --overwrite replaces them")


def _overrides(args: argparse.Namespace):
    """Command-line overrides, then those of $KFQN_OVERRIDES (CI and tests use it for budgets)."""
    import os
    import shlex

    from kfqn.runner import config as C

    cli_over = C.parse_overrides(args.overrides)
    env = os.environ.get("KFQN_OVERRIDES", "").strip()
    try:
        env_over = C.parse_overrides(shlex.split(env)) if env else []
    except C.ConfigError as exc:
        raise C.ConfigError(f"$KFQN_OVERRIDES: {exc}") from None
    return cli_over, cli_over + env_over


def _check_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    from kfqn.runner.errors import RunDirError
    from kfqn.runner.rundir import is_run_dir, read_status

    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"{run_dir} is a file, not a run directory (check logging.root / "
                          "logging.run_dir)")
    if is_run_dir(run_dir):
        if resume or overwrite:
            return
        status = (read_status(run_dir) or {}).get("status", "unknown")
        raise RunDirError(f"run directory {run_dir} already holds a run (status {status}); "
                          "pass --resume to continue it (budget.* may change), --overwrite to "
                          "replace it, or change an override / set logging.run_dir=OTHER_DIR")
    if overwrite and run_dir.exists() and any(run_dir.iterdir()):
        raise RunDirError(f"{run_dir} is not empty and holds no run; refusing to delete it with "
                          "--overwrite: choose another logging.run_dir")


def _run_train(args: argparse.Namespace) -> int:
    from kfqn.runner import distributed as D

    where = D.detect()
    try:
        return _run_train_as(args, where)
    except KfqnError as exc:
        if not where.distributed:
            raise
        D.record_error(exc)  # for the launcher's report (kfqn train --nproc, torchrun)
        # every rank meets a config / data / checkpoint error alike: rank 0 reports it, or
        # kfqn train --nproc does (one line)
        if where.rank != 0 or D.launched_by_kfqn():
            return 2
        raise


def _run_train_as(args: argparse.Namespace, where) -> int:
    from kfqn.runner import distributed as D
    from kfqn.runner.errors import ConfigError

    nproc = getattr(args, "nproc", None)
    if nproc is not None and where.distributed:
        raise ConfigError(f"--nproc starts the ranks itself, but this process is already rank "
                          f"{where.rank} of {where.world_size} ({where.launcher}); leave "
                          "--nproc out under torchrun or srun")
    cfg, run_dir, name, identity = _train_setup(args, nproc or where.world_size)
    if nproc is not None and nproc > 1:
        return _launch_ranks(args, cfg, run_dir, nproc)
    if not where.distributed:
        _check_run_dir(run_dir, args.resume, args.overwrite)
        return _train_and_report(args, cfg, run_dir, name, identity, D.SINGLE)
    from kfqn.runner.environment import pick_device

    ctx = D.init(where, pick_device(cfg.device))
    try:
        # rank 0 checks the run directory; every rank ends with its error
        ctx.on_main(lambda: _check_run_dir(run_dir, args.resume, args.overwrite))
        return _train_and_report(args, cfg, run_dir, name, identity, ctx)
    finally:
        ctx.close()


def _train_setup(args: argparse.Namespace, world: int):
    """(config, run directory, label, identity) of ``kfqn train``; checks that need no data."""
    from kfqn.runner import config as C
    from kfqn.runner.distributed import check_batch, timeout_seconds
    from kfqn.runner.preflight import preflight
    from kfqn.runner.rundir import CONFIG, run_path
    from kfqn.runner.sweep import sweep_dir_of

    _flags(args)
    cli_over, overrides = _overrides(args)
    src = Path(args.config)
    run_dir: Optional[Path] = None
    if src.is_dir() and (src / CONFIG).exists():  # a run directory: its own saved config
        run_dir = src
        base = C.base_config(src / CONFIG, overrides)
    else:
        base = C.base_config(C.find_config(args.config), overrides)
    cfg = C.compose_run(base, overrides)
    preflight(cfg)  # every check that needs no data, before anything on disk changes
    if world > 1:
        check_batch(cfg.data.batch_size, world)
        timeout_seconds()  # a bad $KFQN_DIST_TIMEOUT: one line now, not N later
    preset = cfg.optimizer.preset
    label = C.override_label(cli_over, exclude=("sweep",))
    method = f"{preset}-{label}" if label else preset
    if run_dir is None:
        run_dir = Path(cfg.logging.run_dir) if cfg.logging.run_dir else run_path(
            sweep_dir_of(base) / "train", cfg.task, method, cfg.seed)
    cfg.logging.run_dir = str(run_dir)
    name = f"{cfg.task + '/' if cfg.task else ''}{method}/seed{cfg.seed}"
    identity = {"task": cfg.task, "preset": preset, "method": method, "seed": cfg.seed,
                "grid": {}, "label": name, "process": "own"}
    return cfg, run_dir, name, identity


def _train_and_report(args: argparse.Namespace, cfg, run_dir: Path, name: str, identity: dict,
                      ctx) -> int:
    from kfqn.runner.distributed import launched_by_kfqn, record_error
    from kfqn.runner.trainer import train_run

    who = f"rank {ctx.rank} of {ctx.world_size}: " if ctx.active else ""
    try:
        result = train_run(cfg, run_dir, resume=args.resume, overwrite=args.overwrite,
                           quiet=args.quiet, identity=identity, dist=ctx if ctx.active else None)
    except (KfqnError, KeyboardInterrupt):
        raise
    except Exception as exc:
        record_error(exc)
        if ctx.active and launched_by_kfqn():
            return 1  # kfqn train --nproc names the rank that failed first, in one line
        where = run_dir / "error.txt"
        text = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
        tail = f" (traceback in {where})" if where.exists() and ctx.is_main else ""
        print(f"kfqn train: run failed: {who}{text}{tail}", file=sys.stderr)
        return 1
    code = {"finished": 0, "interrupted": 130}.get(result.status, 1)
    if not ctx.is_main:
        return code
    s = result.summary
    print(f"{name}: {result.status}. {result.message}")
    if s.get("final_train_loss") is not None and result.status != "diverged":
        line = f"final training loss (incl. L2) {s['final_train_loss']:.6g}"
        if s.get("final_test_accuracy") is not None:
            line += f", test accuracy {100 * s['final_test_accuracy']:.2f}%"
        elif s.get("final_test_loss") is not None:
            line += f", test loss {s['final_test_loss']:.6g}"
        ranks = f" ({ctx.world_size} ranks)" if ctx.active else ""
        print(line + f"; {s['epochs']:.2f} epochs, {s['cpu_seconds']:.1f} CPU s{ranks}")
    print(f"logs: {run_dir}  (TensorBoard: tensorboard --logdir {run_dir};  "
          f"report: kfqn report {run_dir})")
    return code


def _launch_ranks(args: argparse.Namespace, cfg, run_dir: Path, nproc: int) -> int:
    """``kfqn train --nproc N``: the same command as N ranks; one line if a rank fails."""
    from kfqn.runner.distributed import launch
    from kfqn.runner.environment import pick_device
    from kfqn.runner.errors import ConfigError
    from kfqn.runner.rundir import is_run_dir, read_status, write_status

    if pick_device(cfg.device).type == "cuda":
        import torch

        if nproc > torch.cuda.device_count():
            raise ConfigError(f"--nproc {nproc} on CUDA needs {nproc} GPUs; "
                              f"{torch.cuda.device_count()} are visible")
    _check_run_dir(run_dir, args.resume, args.overwrite)
    argv = ["train", str(args.config), *args.overrides]
    argv += [flag for flag, on in (("--resume", args.resume), ("--overwrite", args.overwrite),
                                   ("-q", args.quiet)) if on]
    result = launch(nproc, argv, threads=cfg.threads)
    status = (read_status(run_dir) or {}).get("status")
    if result.exit_code == 0 or status == "diverged":
        return result.exit_code  # rank 0 printed the outcome (not an error of the launch)
    if result.exit_code == 130 or result.failed_rank is None:  # a signal stopped the ranks
        if status != "interrupted":  # else rank 0 printed how to resume
            why = f" ({result.error})" if result.error else ""
            print(f"kfqn train: interrupted{why}; --resume continues from the last checkpoint",
                  file=sys.stderr)
        return result.exit_code
    if result.worker_exit == 2 and result.error:  # a config / data / checkpoint error
        text = result.error.split(": ", 1)[-1] if result.error.split(": ", 1)[0].endswith(
            "Error") else result.error
        print(f"kfqn train: error: {text}", file=sys.stderr)
        return 2
    what = f"rank {result.failed_rank} of {nproc}" if result.failed_rank is not None else "a rank"
    code = f"exit code {result.worker_exit}" if result.worker_exit is not None else "failed"
    detail = f": {result.error[:300]}" if result.error else ""
    tail = ""
    if is_run_dir(run_dir):  # rank 0 may have been stopped before it could say why
        where = run_dir / "error.txt"
        if result.traceback:
            where.write_text(f"{what} failed first:\n{result.traceback}")
            tail = f" (traceback in {where})"
        status = read_status(run_dir) or {}
        if status.get("status") in ("running", "failed"):
            write_status(run_dir, {**status, "status": "failed",
                                   "message": f"{what} failed ({code}){detail}",
                                   **({"error_file": str(where)} if tail else {})})
    print(f"kfqn train: run failed: {what} ({code}){detail}; the other ranks were stopped"
          f"{tail}", file=sys.stderr)
    return result.exit_code


# -- sweep -----------------------------------------------------------------------------------------
def _sweep_args(p: argparse.ArgumentParser) -> None:
    _add_common(p, "sweep")
    p.add_argument("-j", "--workers", type=int, default=None, metavar="N",
                   help="run N runs in parallel, each in a process of its own (default: "
                        "sweep.workers)")
    p.add_argument("--dry-run", action="store_true", help="list the runs and exit")
    p.add_argument("--no-report", action="store_true", help="skip the report at the end")


def _run_sweep(args: argparse.Namespace) -> int:
    from kfqn.runner import config as C
    from kfqn.runner.errors import ConfigError, RunDirError
    from kfqn.runner.report import write_report
    from kfqn.runner.rundir import SWEEP
    from kfqn.runner.sweep import (SWEEP_CONFIG, check_existing, expand, run_sweep,
                                   save_sweep_config, sweep_dir_of)

    _flags(args)
    cli_over, overrides = _overrides(args)
    src = Path(args.config)
    if src.is_dir() and (src / SWEEP_CONFIG).exists():  # a sweep directory: its own record
        if not args.resume and not args.dry_run:
            raise RunDirError(f"{src} is a sweep directory; continue it with kfqn sweep {src} "
                              "--resume, or give its config (file or name) for a new sweep")
        saved = (src / "overrides.txt").read_text().split("\n") \
            if (src / "overrides.txt").exists() else []
        overrides = C.parse_overrides([o for o in saved if o.strip()]) + overrides
        base = C.base_config(src / SWEEP_CONFIG, overrides)
        sweep_dir = src
    else:
        base = C.base_config(C.find_config(args.config), overrides)
        named = any(k == "name" for k, _ in cli_over)
        sweep_dir = sweep_dir_of(base, "" if named else C.override_label(cli_over))
    if args.workers is not None:
        if args.workers < 1:
            raise ConfigError(f"--workers {args.workers}: give a positive number of workers")
        base.sweep.workers = args.workers
    specs = expand(base, overrides, sweep_dir)
    if args.dry_run:
        for s in specs:
            print(f"{s.label}  ->  {s.run_dir}")
        print(f"{len(specs)} runs in {sweep_dir}")
        return 0
    if sweep_dir.exists() and not sweep_dir.is_dir():
        raise RunDirError(f"{sweep_dir} is a file, not a sweep directory (check logging.root)")
    if (sweep_dir / SWEEP).exists() and not (args.resume or args.overwrite):
        raise RunDirError(f"sweep directory {sweep_dir} already exists; pass --resume to continue "
                          "it, --overwrite to replace its runs, or set name=OTHER_NAME (or "
                          "logging.root=OTHER_ROOT)")
    if args.resume and (sweep_dir / SWEEP_CONFIG).exists() and sweep_dir != src:
        _check_sweep_record(sweep_dir / SWEEP_CONFIG, base)
    check_existing(specs, args.resume, args.overwrite)
    try:
        if not (args.resume and (sweep_dir / SWEEP_CONFIG).exists()):
            save_sweep_config(base, list(args.overrides), sweep_dir)
    except OSError as exc:
        raise RunDirError(f"cannot write the sweep directory {sweep_dir}: "
                          f"{exc.strerror or exc} (check logging.root)") from None
    workers = int(base.sweep.workers)
    fresh = bool(base.sweep.fresh_process)
    print(f"sweep {sweep_dir}: {len(specs)} runs"
          + (f", {workers} at a time" if workers > 1 else "")
          + (", each in a process of its own" if fresh or workers > 1 else ""))
    records = run_sweep(specs, sweep_dir, workers=workers, resume=args.resume,
                        overwrite=args.overwrite, quiet=args.quiet or workers > 1 or fresh,
                        fresh_process=fresh)
    statuses = [r["status"] for r in records]
    interrupted = len(records) < len(specs) or "interrupted" in statuses
    if not args.no_report and records and not interrupted:
        report = write_report(sweep_dir)
        print()
        print(report.markdown)
        print()
        for note in report.notes:
            print(note)
        print(f"report: {sweep_dir / 'report.md'} (tables also in report.csv, runs.csv)")
        print(f"plots:  {sweep_dir / 'plots'}/")
    print(f"TensorBoard: tensorboard --logdir {sweep_dir}   (then open http://localhost:6006)")
    if interrupted:
        return 130
    return 1 if "failed" in statuses else 0


def _check_sweep_record(path: Path, base) -> None:
    """A resumed sweep must be the sweep its record describes (budgets etc. may change)."""
    from kfqn.runner import config as C
    from kfqn.runner.errors import RunDirError

    old = C.to_dict(C.resolve(C.base_config(path)))
    new = C.to_dict(C.resolve(base))
    keep = {"sweep": ("presets", "seeds", "tasks", "grid")}
    diff = []
    for d in C.config_diff(old, new):
        key = d.split(":")[0]
        top = key.split(".")[0]
        if top in C.RESUMABLE_SECTIONS and not (
                top == "sweep" and key.split(".")[1:2] and key.split(".")[1] in keep["sweep"]):
            continue
        diff.append(d)
    if diff:
        raise RunDirError(f"cannot resume {path.parent}: the sweep was made with another config "
                          f"({'; '.join(diff[:3])}{' ...' if len(diff) > 3 else ''}); drop the "
                          "new overrides, or start a new sweep with name=OTHER_NAME")


# -- report ----------------------------------------------------------------------------------------
def _report_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a run or sweep directory (e.g. runs/quickstart)")
    p.add_argument("--target-loss", default=None, metavar="X",
                   help="training loss for the time-to-target column: a number, 'auto', "
                        "'none', or per task: curves=150,digits=0.05 (default: "
                        "report.target_loss of the runs)")
    p.add_argument("--time", choices=("cpu", "wall"), default=None,
                   help="x axis of the loss-vs-time plots (default: report.time of the runs)")
    p.add_argument("--out", default=None, help="write the report here instead of RUN_DIR")
    p.add_argument("--no-plots", action="store_true", help="tables only")


def _run_report(args: argparse.Namespace) -> int:
    from kfqn.runner.report import parse_target, write_report

    target = None if args.target_loss is None else parse_target(args.target_loss)
    report = write_report(args.run_dir, args.out, target_loss=target, time_axis=args.time,
                          plots=not args.no_plots)
    print(report.markdown)
    print()
    for note in report.notes:
        print(note)
    for f in report.files:
        print(f"wrote {f}")
    return 0


# -- components ------------------------------------------------------------------------------------
def _components_args(p: argparse.ArgumentParser) -> None:
    from kfqn.core.registry import KINDS
    from kfqn.runner.registry import RUNNER_KINDS

    p.add_argument("--kind", choices=sorted({**KINDS, **RUNNER_KINDS}), default=None, help="only this kind")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="also list each data set's and model's options")
    p.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                   help="import and register this module first (repeatable)")


def _run_components(args: argparse.Namespace) -> int:
    from kfqn.core.registry import format_components
    from kfqn.runner.components import describe_options
    from kfqn.runner.registry import runner_registry

    runner_registry().load_plugins(args.plugin, key="--plugin")
    print(format_components(args.kind, runner_registry()))
    if args.verbose:
        for kind in ("dataset", "model"):
            if args.kind not in (None, kind):
                continue
            for reg in runner_registry().components(kind):
                comp = reg.obj() if isinstance(reg.obj, type) else reg.obj
                opts = describe_options(comp)
                print(f"\n{kind} {reg.name} options:")
                print("\n".join(f"  {line}" for line in opts.splitlines()) or "  (none)")
    return 0


register_command("train", "train one run of an experiment config", _train_args, _run_train)
register_command("sweep", "run the grid tasks x presets x sweep.grid x seeds, then report",
                 _sweep_args, _run_sweep)
register_command("report", "tables (Markdown, CSV) and PNG plots of a run or sweep",
                 _report_args, _run_report)
register_command("components", "list the registered components (presets, data sets, ...)",
                 _components_args, _run_components)


def _load_optional_commands() -> None:
    """``kfqn bench`` from :mod:`kfqn.bench` when that module exists."""
    if "bench" in COMMANDS:
        return
    try:
        bench = importlib.import_module("kfqn.bench")
    except ModuleNotFoundError as exc:
        if exc.name in ("kfqn.bench",):
            return  # not written yet / not installed: no subcommand
        error: BaseException = exc
    except Exception as exc:  # a broken module must not break the other subcommands
        error = exc
    else:
        register_command("bench", getattr(bench, "HELP", "benchmarks"), bench.add_arguments,
                         bench.run)
        return

    def unavailable(args: argparse.Namespace) -> int:
        _err("kfqn bench", RuntimeError(f"unavailable: importing kfqn.bench failed: {error!r}"))
        return 1

    register_command("bench", "benchmarks (unavailable: kfqn.bench failed to import)",
                     lambda p: p.add_argument("args", nargs="*"), unavailable)


def build_parser() -> argparse.ArgumentParser:
    """The ``kfqn`` argument parser with every registered subcommand."""
    _load_optional_commands()
    parser = _Parser(prog="kfqn", description="Kronecker-factored quasi-Newton optimizers: "
                     "experiments, sweeps, reports.",
                     epilog="Exit status: 0 ok, 1 a run diverged or failed, 2 usage or config "
                            "error, 3 kfqn bench --strict: a target missed, 130 interrupted. "
                            "Algorithms: docs/algorithms.md.")
    from kfqn import __version__

    parser.add_argument("--version", action="version", version=f"kfqn {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    parser.subcommands = {}  # type: ignore[attr-defined]
    for name, cmd in COMMANDS.items():
        p = sub.add_parser(name, help=cmd.help, description=cmd.description)
        cmd.add_arguments(p)
        parser.subcommands[name] = p  # type: ignore[attr-defined]
    return parser


def parse(argv: Sequence[str]) -> argparse.Namespace:
    """Parse ``argv``; a subcommand's options and key=value overrides may come in any order."""
    parser = build_parser()
    subs = parser.subcommands  # type: ignore[attr-defined]
    if argv and argv[0] in subs:
        try:
            args = subs[argv[0]].parse_intermixed_args(argv[1:])
        except TypeError:  # a parser using features intermixed parsing lacks (REMAINDER)
            args = subs[argv[0]].parse_args(argv[1:])
        args.command = argv[0]
        return args
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``kfqn`` console script; returns the exit status."""

    args = parse(list(sys.argv[1:] if argv is None else argv))
    if not args.command:
        print("kfqn: error: a command is required: " + ", ".join(COMMANDS)
              + " (see kfqn --help)", file=sys.stderr)
        return 2
    prog = f"kfqn {args.command}"
    try:
        return int(COMMANDS[args.command].run(args) or 0)
    except KfqnError as exc:
        _err(prog, exc)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a failure, not a usage error: one line, status 1
        _err(prog, RuntimeError(f"failed: {type(exc).__name__}: {exc}"))
        return 1


if __name__ == "__main__":
    sys.exit(main())
