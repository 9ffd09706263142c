"""The ``kfqn`` command line.

::

    kfqn train CONFIG [key=value ...]    one run (CONFIG: a YAML file, a name in
                                         configs/experiment/, or a run directory)
    kfqn sweep CONFIG [key=value ...]    tasks x presets x grid x seeds, then the report
    kfqn report RUN_DIR                  tables and plots of a finished run or sweep
    kfqn components                      the registered components

Exit status: 0 success; 1 a run diverged or failed; 2 a usage or configuration error (one
line on stderr); 130 interrupted (resume with ``--resume``).

Subcommands are registered with :func:`register_command` (name -> help, add_arguments, run).
An optional module ``kfqn.bench`` contributes ``kfqn bench`` when present: it must define
``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int``.
"""
from __future__ import annotations

import argparse
import importlib
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence


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
    p.add_argument("config", help="experiment YAML file, or a name in configs/experiment/"
                   + (", or a run directory" if what == "run" else ""))
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, e.g. optimizer.lr=0.1 budget.epochs=5 "
                        "data.options.n_train=2000")
    p.add_argument("--resume", action="store_true",
                   help=f"continue the {what} in its existing directory from its checkpoint(s)")
    p.add_argument("--overwrite", action="store_true",
                   help=f"delete an existing {what} directory of the same name first")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def _train_args(p: argparse.ArgumentParser) -> None:
    _add_common(p, "run")


def _prepare_dir(path: Path, marker: str, resume: bool, overwrite: bool, what: str,
                 hint: str) -> None:
    from kfqn.runner.errors import RunDirError

    if not (path / marker).exists():
        return
    if overwrite:
        shutil.rmtree(path)
    elif not resume:
        raise RunDirError(f"{what} directory {path} already exists; pass --resume to continue it, "
                          f"--overwrite to start over, or {hint}")


def _run_train(args: argparse.Namespace) -> int:
    from kfqn.runner import config as C
    from kfqn.runner.rundir import CONFIG, STATUS, run_path
    from kfqn.runner.sweep import sweep_dir_of
    from kfqn.runner.trainer import train_run

    overrides = C.parse_overrides(args.overrides)
    src = Path(args.config)
    run_dir: Optional[Path] = None
    if src.is_dir() and (src / CONFIG).exists():  # a run directory: its own saved config
        run_dir = src
        base = C.base_config(src / CONFIG, overrides)
    else:
        base = C.base_config(C.find_config(args.config), overrides)
    cfg = C.compose_run(base, overrides)
    preset = cfg.optimizer.preset
    if run_dir is None:
        run_dir = Path(cfg.logging.run_dir) if cfg.logging.run_dir else run_path(
            sweep_dir_of(base), cfg.task, preset, cfg.seed)
    cfg.logging.run_dir = str(run_dir)
    _prepare_dir(run_dir, STATUS, args.resume, args.overwrite, "run",
                 "set logging.run_dir=OTHER_DIR")
    label = f"{cfg.task + '/' if cfg.task else ''}{preset}/seed{cfg.seed}"
    identity = {"task": cfg.task, "preset": preset, "method": preset, "seed": cfg.seed,
                "grid": {}, "label": label}
    result = train_run(cfg, run_dir, resume=args.resume, quiet=args.quiet, identity=identity)
    s = result.summary
    print(f"{label}: {result.status}. {result.message}")
    if s.get("final_train_loss") is not None and result.status != "diverged":
        line = f"final training loss (incl. L2) {s['final_train_loss']:.6g}"
        if s.get("final_test_accuracy") is not None:
            line += f", test accuracy {100 * s['final_test_accuracy']:.2f}%"
        elif s.get("final_test_loss") is not None:
            line += f", test loss {s['final_test_loss']:.6g}"
        print(line + f"; {s['epochs']:.2f} epochs, {s['cpu_seconds']:.1f} CPU s")
    print(f"logs: {run_dir}  (TensorBoard: tensorboard --logdir {run_dir};  "
          f"report: kfqn report {run_dir})")
    return {"finished": 0, "interrupted": 130}.get(result.status, 1)


# -- sweep -----------------------------------------------------------------------------------------
def _sweep_args(p: argparse.ArgumentParser) -> None:
    _add_common(p, "sweep")
    p.add_argument("-j", "--workers", type=int, default=None, metavar="N",
                   help="run N runs in parallel worker processes (default: sweep.workers)")
    p.add_argument("--dry-run", action="store_true", help="list the runs and exit")
    p.add_argument("--no-report", action="store_true", help="skip the report at the end")


def _run_sweep(args: argparse.Namespace) -> int:
    from kfqn.runner import config as C
    from kfqn.runner.errors import ConfigError
    from kfqn.runner.report import write_report
    from kfqn.runner.rundir import SWEEP
    from kfqn.runner.sweep import expand, run_sweep, save_sweep_config, sweep_dir_of

    overrides = C.parse_overrides(args.overrides)
    base = C.base_config(C.find_config(args.config), overrides)
    if args.workers is not None:
        if args.workers < 1:
            raise ConfigError(f"--workers {args.workers}: give a positive number of workers")
        base.sweep.workers = args.workers
    sweep_dir = sweep_dir_of(base)
    specs = expand(base, overrides, sweep_dir)
    if args.dry_run:
        for s in specs:
            print(f"{s.label}  ->  {s.run_dir}")
        print(f"{len(specs)} runs")
        return 0
    _prepare_dir(sweep_dir, SWEEP, args.resume, args.overwrite, "sweep",
                 "set name=OTHER_NAME (or logging.root=OTHER_ROOT)")
    save_sweep_config(base, args.overrides, sweep_dir)
    workers = int(base.sweep.workers)
    print(f"sweep {sweep_dir}: {len(specs)} runs"
          + (f" in {workers} worker processes" if workers > 1 else ""))
    fresh = bool(base.sweep.fresh_process)
    records = run_sweep(specs, sweep_dir, workers=workers, resume=args.resume,
                        quiet=args.quiet or workers > 1 or fresh, fresh_process=fresh)
    if not args.no_report and records:
        report = write_report(sweep_dir)
        print()
        print(report.markdown)
        print()
        print(f"report: {sweep_dir / 'report.md'} (tables also in report.csv, runs.csv)")
        print(f"plots:  {sweep_dir / 'plots'}/")
    print(f"TensorBoard: tensorboard --logdir {sweep_dir}   (then open http://localhost:6006)")
    statuses = [r["status"] for r in records]
    if len(records) < len(specs) or "interrupted" in statuses:
        return 130
    return 1 if "failed" in statuses else 0


# -- report ----------------------------------------------------------------------------------------
def _report_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a run or sweep directory (e.g. runs/quickstart)")
    p.add_argument("--target-loss", default=None, metavar="X",
                   help="training loss for the time-to-target column: a number, 'auto' or "
                        "'none' (default: report.target_loss of the runs)")
    p.add_argument("--time", choices=("cpu", "wall"), default=None,
                   help="x axis of the loss-vs-time plots (default: report.time of the runs)")
    p.add_argument("--out", default=None, help="write the report here instead of RUN_DIR")
    p.add_argument("--no-plots", action="store_true", help="tables only")


def _run_report(args: argparse.Namespace) -> int:
    from kfqn.runner.errors import ConfigError
    from kfqn.runner.report import write_report

    target = args.target_loss
    if target is not None and target not in ("auto", "none"):
        try:
            target = float(target)
        except ValueError:
            raise ConfigError(
                f"--target-loss {target!r}: give a number, 'auto' or 'none'") from None
    report = write_report(args.run_dir, args.out, target_loss=target, time_axis=args.time,
                          plots=not args.no_plots)
    print(report.markdown)
    print()
    for f in report.files:
        print(f"wrote {f}")
    return 0


# -- components ------------------------------------------------------------------------------------
def _components_args(p: argparse.ArgumentParser) -> None:
    from kfqn.core.registry import KINDS

    p.add_argument("--kind", choices=sorted(KINDS), default=None, help="only this kind")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="also list each data set's and model's options")


def _run_components(args: argparse.Namespace) -> int:
    from kfqn.core.registry import default_registry, format_components
    from kfqn.runner.components import describe_options

    print(format_components(args.kind))
    if args.verbose:
        for kind in ("dataset", "model"):
            if args.kind not in (None, kind):
                continue
            for reg in default_registry().components(kind):
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
                            "error, 130 interrupted.")
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
    from kfqn.core.errors import KfqnError

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


if __name__ == "__main__":
    sys.exit(main())
