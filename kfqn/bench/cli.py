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
        "and Adam; --nproc N: data-parallel step time and communication; --project: 8/64-GPU "
        "projection")
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
    dist = parser.add_argument_group("data-parallel (kfqn/bench/distributed.py, project.py)")
    dist.add_argument("--nproc", type=int, default=0, metavar="N",
                      help="run every method at 1 and at N ranks (CPU, gloo, spawned processes, "
                           "same global batch): step times, kfqn's statistics all-reduces per "
                           "step (calls, bytes) against their formula, DDP's gradient bytes")
    dist.add_argument("--placement", choices=["replicated", "owner", "both"],
                      default="replicated",
                      help="--nproc: where the kfqn methods' factor work runs at N ranks "
                           "(config key placement); 'owner' and 'both' add METHOD+owner columns")
    dist.add_argument("--timeout", type=float, default=900.0, metavar="S",
                      help="--nproc: kill a world size's process group after S seconds "
                           "(default 900)")
    dist.add_argument("--project", action="store_true",
                      help="print the projected step time at 8 and 64 GPUs of ResNet-32 and "
                           "VGG16 per preset (communication formula + link model + measured "
                           "1-GPU compute), with its assumptions, then exit")
    dist.add_argument("--gpus", default="8,64", help="--project: GPU counts (default 8,64)")
    dist.add_argument("--link", action="append", default=[], metavar="N:GBPS:US",
                      help="--project: all-reduce bus bandwidth (GB/s) and latency per call "
                           "(us) at N GPUs, e.g. 64:40:40")
    dist.add_argument("--compute", default=None, metavar="PATH",
                      help="--project: kfqn bench --json file with CUDA records for the "
                           "per-GPU compute time (default benchmarks/results/"
                           "2026-11-25-h100-full.json)")
    dist.add_argument("--project-models", default="resnet32,vgg16", metavar="MODELS",
                      help="--project: registered models (default resnet32,vgg16)")


def _devices(choice: str) -> list[torch.device]:
    if choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: CUDA is not available in this torch build/machine")
    if choice == "auto":
        return [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    return [torch.device(choice)]


def run(args: argparse.Namespace) -> int:
    """Entry point of ``kfqn bench``; returns the exit status (0 ok, 1 a method or its op
    count failed, 3 a target missed with ``--strict``, or an op budget with ``--check``)."""
    if getattr(args, "project", False):
        return run_projection(args)
    suite = load_suite(args.suite)
    targets = load_targets(args.targets)
    mode = "quick" if args.quick else "full"
    # --nproc: --presets may name any registered preset, also in quick mode
    methods = resolve_methods(suite, args.presets,
                              mode="full" if getattr(args, "nproc", 0) and args.presets else mode)
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
    if getattr(args, "nproc", 0):
        return run_distributed(args, suite, methods, specs, mode, warmup, repeats, threads)
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


def _meta(**extra: object) -> dict:
    return {"torch": torch.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "argv": sys.argv[1:], **extra}


def _write_json(path: str | None, payload: dict) -> None:
    if path:
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(payload, indent=2, default=str))
        print(f"wrote {out}")


def run_distributed(args: argparse.Namespace, suite: dict, methods: list, specs: list,
                    mode: str, warmup: int, repeats: int, threads: int | None) -> int:
    """``kfqn bench --nproc N`` (:mod:`kfqn.bench.distributed`); 1 when a case failed or its
    measured statistics traffic differs from the formula."""
    from kfqn.bench.distributed import SCHEMA as DIST_SCHEMA
    from kfqn.bench.distributed import run_scaling, scaling_table

    if args.nproc < 2:
        raise ConfigError("--nproc must be >= 2")
    if args.device == "cuda":
        raise ConfigError("--nproc runs on the CPU (gloo); leave --device out")
    placement = getattr(args, "placement", "replicated")
    if placement != "replicated":
        from dataclasses import replace

        owners = [replace(m, label=f"{m.label}+owner", dotlist=(*m.dotlist, "placement=owner"))
                  for m in methods if m.preset is not None]
        methods = owners if placement == "owner" else [*methods, *owners]
    start = time.perf_counter()
    meta = _meta(mode=mode, nproc=args.nproc, warmup=warmup, repeats=repeats,
                 threads_per_rank=threads, placement=placement)
    records = run_scaling(specs, methods, suite, args.nproc, warmup, repeats, args.seed,
                          threads, args.timeout, log=lambda s: print(s, flush=True))
    meta["elapsed_s"] = time.perf_counter() - start
    print()
    print(scaling_table(records))
    print(f"\nCPU, gloo, {threads or 'default'} thread(s) per rank, the same global batch at "
          f"1 and {args.nproc} ranks; step time = median over {repeats} rounds of the slowest "
          "rank; kfqn calls / bytes measured at "
          f"{args.nproc} ranks (opt.comm, one rank's contribution); DDP gradient bytes = every "
          f"trainable parameter. {meta['elapsed_s']:.0f} s.")
    _write_json(args.json, {"schema": DIST_SCHEMA, "meta": meta, "records": records})
    if any(r["error"] for r in records) or any(r.get("formula_match") is False
                                               for r in records):
        return 1
    return 0


def run_projection(args: argparse.Namespace) -> int:
    """``kfqn bench --project`` (:mod:`kfqn.bench.project`)."""
    from kfqn.bench.project import (PRESETS, assumptions_text, parse_link, project,
                                    projection_table)

    try:
        gpus = [int(g) for g in args.gpus.split(",") if g.strip()]
        links = dict(parse_link(t) for t in args.link)
    except ValueError as exc:
        raise ConfigError(f"--gpus / --link: {exc}") from None
    models = [m.strip() for m in args.project_models.split(",") if m.strip()]
    presets = None
    if args.presets:
        presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    torch.set_num_threads(int(args.threads or 1))
    print("projection (not a measurement): building the models for their layer dimensions",
          flush=True)
    try:
        result = project(models, presets or PRESETS, gpus, links, args.compute,
                         log=lambda s: print(s, flush=True))
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    print()
    print(projection_table(result))
    print("\nassumptions:")
    print(assumptions_text(result))
    _write_json(args.json, {"schema": "kfqn-bench-project/1", "meta": _meta(), **result})
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
