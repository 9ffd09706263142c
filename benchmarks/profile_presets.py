"""Where does the step time go? Profiles kfqn presets on a model of ``benchmarks/suite.yaml``.

For each method: build it as ``kfqn bench`` does, take the untimed first step and ``--warmup``
more, then profile ``--steps`` steps with

* cProfile, restricted to kfqn's own code (``kfqn/core``, ``curvature``, ``updates``, ``layers``,
  ``inversion``): cumulative time per function, i.e. the torch ops it issued (CPU ops are
  synchronous, so this is wall time on the CPU; on CUDA use ``--torch``);
* optionally (``--torch``) ``torch.profiler``: the aten ops with the largest self time, with
  their input shapes.

Usage (from the repository root)::

    python benchmarks/profile_presets.py autoencoder --methods kbfgs,kfbfgs_l_cnn+next
    python benchmarks/profile_presets.py allcnn_c --batch 64 --torch --top 15

Times are per step (totals divided by ``--steps``).
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import warnings

import torch

from kfqn import bench

KFQN_CODE = r"kfqn/(core|curvature|updates|layers|inversion)/"


def profile_method(case: bench.Case, batches, steps: int, top: int, use_torch: bool,
                   by_shape: bool = True) -> str:
    """cProfile (and torch.profiler) text for ``steps`` steps of one built and warmed case."""
    prof = cProfile.Profile()
    prof.enable()
    for i in range(steps):
        case.step(*batches[i % len(batches)])
    prof.disable()
    out = io.StringIO()
    stats = pstats.Stats(prof, stream=out)
    stats.sort_stats("cumulative").print_stats(KFQN_CODE, top)
    text = _per_step(out.getvalue(), steps)
    if use_torch:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as tp:
            for i in range(steps):
                case.step(*batches[i % len(batches)])
        text += "\n" + tp.key_averages(group_by_input_shape=by_shape).table(
            sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=28,
            max_shapes_column_width=50)
    return text


def _per_step(report: str, steps: int) -> str:
    """Keep the table part of a pstats report and note the divisor."""
    lines = [l for l in report.splitlines() if l.strip() and "List reduced" not in l]
    start = next((i for i, l in enumerate(lines) if l.lstrip().startswith("ncalls")), 0)
    return f"(cProfile over {steps} steps; divide times by {steps} for one step)\n" + \
        "\n".join(lines[start:])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", help="a model key of benchmarks/suite.yaml (autoencoder, allcnn_c...)")
    p.add_argument("--methods", default=None, help="comma-separated labels (default: all)")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--top", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--torch", action="store_true", help="also the torch.profiler op table")
    p.add_argument("--device", default="cpu")
    p.add_argument("--by-name", action="store_true",
                   help="group the torch.profiler table by op name only (not by input shapes)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    suite = bench.load_suite()
    batches = {args.model: args.batch} if args.batch else None
    spec = bench.resolve_models(suite, "full", args.model, batches)[0]
    methods = bench.resolve_methods(suite, args.methods)
    device = torch.device(args.device)
    data = bench.make_batches(spec, device, 0)
    warnings.simplefilter("ignore")
    for method in methods:
        case = bench.Case(spec, method, suite, device, 0)
        case.build_optimizer(data)
        for i in range(1 + args.warmup):
            case.step(*data[i % len(data)])
        print(f"\n==== {spec.key} (batch {spec.batch}) / {method.label} ====")
        print(profile_method(case, data, args.steps, args.top, args.torch,
                                   not args.by_name), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
