"""Command line of ``kfqn bench`` / ``python -m kfqn.bench``."""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import warnings
from pathlib import Path
from typing import Sequence

import torch

from kfqn.bench.measure import bench_model
from kfqn.bench.report import (evaluate_targets, markdown_table, ops_details, ops_table,
                               summarise, targets_table)
from kfqn.bench.suite import load_suite, load_targets, resolve_methods, resolve_models
from kfqn.core.errors import ConfigError, KfqnError

HELP = ("step time, phases, memory and (--ops) dispatched ops of every preset against SGD-m "
        "and Adam")
SCHEMA = "kfqn-bench/1"


def _batch_arg(text: str) -> tuple[str, int]:
    key, sep, value = text.partition("=")
    if not sep or not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"expected MODEL=N with N >= 1, got {text!r}")
    return key, int(value)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``kfqn bench`` / ``python -m kfqn.bench``."""
    parser.add_argument("--quick", action="store_true",
                        help="reduced suite (smaller batches, fewer repeats): under a minute on "
                             "2 CPU cores")
    parser.add_argument("--models", default=None,
                        help="comma-separated models of benchmarks/suite.yaml "
                             "(default: the mode's)")
    parser.add_argument("--presets", default=None,
                        help="comma-separated method labels (default: all; adam is always added)")
    parser.add_argument("--batch", type=_batch_arg, action="append", default=[],
                        metavar="MODEL=N", help="batch size of one model, e.g. allcnn_c=64")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="auto: CPU, and CUDA too when present")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps per method")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps per method")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (default: the mode's `threads` in the suite, "
                             "1; 0 keeps torch's own choice)")
    parser.add_argument("--seed", type=int, default=0, help="seed of weights and data")
    parser.add_argument("--no-memory", action="store_true",
                        help="skip the allocation records (resident and peak memory)")
    parser.add_argument("--json", default=None, metavar="PATH",
                        help="write {schema, meta, records, targets} as JSON")
    parser.add_argument("--suite", default=None, metavar="PATH",
                        help="suite definitions (default: benchmarks/suite.yaml)")
    parser.add_argument("--targets", default=None, metavar="PATH",
                        help="targets (default: benchmarks/targets.yaml)")
    parser.add_argument("--strict", action="store_true",
                        help="exit with status 3 when a target is missed")
    parser.add_argument("--ops", action="store_true",
                        help="also count the aten ops one step dispatches (TorchDispatchMode): "
                             "step, closure (forward+backward) and optimizer ops, per "
                             "preconditioned layer and per parameter tensor (after the timing)")
    parser.add_argument("--ops-steps", type=int, default=20, metavar="N",
                        help="--ops: counted steps; the table gives the median step and the "
                             "maximum (default 20)")
    parser.add_argument("--ops-warm", type=int, default=3, metavar="N",
                        help="--ops: steps a method must have taken before counting (one-off "
                             "work: warm starts, first inversions; default 3)")
    parser.add_argument("--ops-verbose", type=int, nargs="?", const=12, default=0, metavar="TOP",
                        help="--ops, and print the TOP (12) most frequent operators, step phases "
                             "and kfqn functions of each method's optimizer ops")
    parser.add_argument("--check", action="store_true",
                        help="--ops, and exit with status 3 when an op budget of the targets "
                             "(metric ops_*) is exceeded")
    parser.add_argument("--list", action="store_true", help="list models and methods, then exit")


def _devices(choice: str) -> list[torch.device]:
    if choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: CUDA is not available in this torch build/machine")
    if choice == "auto":
        return [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    return [torch.device(choice)]


def run(args: argparse.Namespace) -> int:
    """Entry point of ``kfqn bench``; returns the exit status (0 ok, 1 a method or its op
    count failed, 3 a target missed with ``--strict``, or an op budget with ``--check``)."""
    suite = load_suite(args.suite)
    targets = load_targets(args.targets)
    mode = "quick" if args.quick else "full"
    methods = resolve_methods(suite, args.presets, mode=mode)
    specs = resolve_models(suite, mode, args.models, dict(args.batch))
    if args.list:
        print("models: " + ", ".join(f"{k} ({v['model']}, batch {v['batch']})"
                                       for k, v in suite["models"].items()))
        print("methods: " + ", ".join(m.label for m in methods))
        return 0
    cfg = suite["modes"][mode]
    warmup = cfg.get("warmup", 2) if args.warmup is None else args.warmup
    repeats = cfg.get("repeats", 5) if args.repeats is None else args.repeats
    if repeats < 1 or warmup < 0:
        raise ConfigError("--repeats must be >= 1 and --warmup >= 0")
    count_ops = args.ops or args.check or bool(args.ops_verbose)
    if count_ops and (args.ops_steps < 1 or args.ops_warm < 0):
        raise ConfigError("--ops-steps must be >= 1 and --ops-warm >= 0")
    threads = cfg.get("threads") if args.threads is None else args.threads
    if threads:
        torch.set_num_threads(int(threads))
    meta = {"mode": mode, "warmup": warmup, "repeats": repeats, "threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "argv": sys.argv[1:]}
    if count_ops:
        meta.update({"ops_steps": args.ops_steps, "ops_warm": args.ops_warm})
    start = time.perf_counter()
    records: list[dict] = []
    for device in _devices(args.device):
        for spec in specs:
            print(f"[{device.type}] {spec.key} ({spec.model}, batch {spec.batch}): "
                  f"{len(methods)} methods, warm-up {warmup}, {repeats} timed rounds", flush=True)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                results = bench_model(spec, methods, suite, device, warmup, repeats, args.seed,
                                      memory=not args.no_memory,
                                      log=lambda s: print(s, flush=True),
                                      ops_steps=args.ops_steps if count_ops else 0,
                                      ops_warm=args.ops_warm, ops_sites=bool(args.ops_verbose))
            records += summarise(results, spec, device, meta, ops_top=args.ops_verbose)
            print(f"  ({time.perf_counter() - start:.0f} s so far)", flush=True)
    meta["elapsed_s"] = time.perf_counter() - start
    rows = evaluate_targets(records, targets)
    print()
    print(markdown_table(records))
    if count_ops:
        print(f"\naten ops per step (median and max of {args.ops_steps} counted steps, after at "
              f"least {args.ops_warm} uncounted ones; optimizer ops = step ops - the closure's "
              "own forward+backward):")
        print(ops_table(records, targets))
        if args.ops_verbose:
            print()
            print(ops_details(records))
    print()
    print(targets_table(rows))
    print(f"\n{len(records)} records in {meta['elapsed_s']:.0f} s "
          f"(torch {torch.__version__}, {meta['threads']} threads)")
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"schema": SCHEMA, "meta": meta, "records": records,
                                    "targets": rows}, indent=2))
        print(f"wrote {path}")
    if any(r["error"] or r.get("ops_error") for r in records):
        return 1
    if args.strict and any(t["status"] == "MISS" for t in rows):
        return 3
    if args.check and any(t["status"] == "MISS" and t["metric"].startswith("ops_")
                          for t in rows):
        return 3
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m kfqn.bench``."""
    parser = argparse.ArgumentParser(prog="python -m kfqn.bench", description=HELP)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except KfqnError as exc:
        print(f"kfqn bench: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
