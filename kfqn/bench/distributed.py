"""``kfqn bench --nproc N``: every method at 1 rank and at N data-parallel ranks (CPU, gloo).

Each world size is one group of spawned processes (``torch.multiprocessing``, start method
``spawn``, ``file://`` rendezvous in a temporary folder) that runs every (model, method) case in
turn, launched in its own session from a child interpreter and killed as a whole when it runs
past ``timeout`` seconds, so nothing can hang; collectives time out after ``pg_timeout``. The
global batch is the same at every world size: rank r of N trains on samples
[r B/N, (r+1) B/N) of the suite's fixed-seed batches (B must be a multiple of N). With N > 1 the
model is wrapped in ``DistributedDataParallel`` (``broadcast_buffers=False``: BatchNorm running
statistics stay per rank, so DDP's only collective is the gradient all-reduce) and the kfqn
optimizer averages its statistics through ``opt.comm``.

Per case and world size: the untimed first step and ``warmup`` steps, then ``steps`` timed
steps, each started after a barrier; the step time of a round is the slowest rank's. Around
every timed step the worker reads ``opt.comm.calls`` / ``opt.comm.bytes`` (kfqn's statistics
all-reduces), the time spent inside them (waiting for the other ranks included), and the
formula of :mod:`kfqn.bench.comm_model` for that step, computed from the optimizer's state just
before it. DDP's gradient all-reduce is counted, not hooked: the bytes of every trainable
parameter, per step.
"""
from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from kfqn.bench.suite import MethodSpec, ModelSpec
from kfqn.core.errors import ConfigError

SCHEMA = "kfqn-bench-dist/1"
_ROOT = Path(__file__).resolve().parents[2]


# -- the worker (one rank) -----------------------------------------------------------------------
def _spec_of(d: dict) -> ModelSpec:
    return ModelSpec(d["key"], d["model"], tuple(d["input_shape"]), d["num_classes"],
                     int(d["batch"]), dict(d.get("options") or {}))


def _method_of(d: dict) -> MethodSpec:
    return MethodSpec(d["label"], d.get("preset"), tuple(d.get("dotlist") or ()),
                      d.get("baseline"), bool(d.get("force_torch")))


def _run_case(spec: ModelSpec, method: MethodSpec, suite: dict, rank: int, world: int,
              untimed: int, steps: int, seed: int) -> dict:
    """One method on one model at this rank: build (DDP when world > 1), warm start on the local
    shard, ``untimed`` steps, then ``steps`` timed steps with their communication."""
    import torch.distributed as dist
    from torch import nn

    from kfqn.bench import comm_model
    from kfqn.bench.cases import Case, make_batches

    cpu = torch.device("cpu")
    local = spec.batch // world
    batches = [(x[rank * local:(rank + 1) * local], y[rank * local:(rank + 1) * local])
               for x, y in make_batches(spec, cpu, seed)]
    case = Case(spec, method, suite, cpu, seed)
    if world > 1:
        case.model = nn.parallel.DistributedDataParallel(case.model, broadcast_buffers=False)
    case.build_optimizer(batches)
    opt = case.opt
    comm = getattr(opt, "comm", None)
    spent = [0.0]
    if comm is not None and world > 1 and hasattr(comm, "_all_reduce"):
        inner = comm._all_reduce

        def timed_all_reduce(flat: torch.Tensor) -> None:
            t0 = time.perf_counter()
            inner(flat)
            spent[0] += time.perf_counter() - t0
        comm._all_reduce = timed_all_reduce   # this instance only: counts are the same
    for i in range(untimed):
        case.step(*batches[i % len(batches)])
    rec: dict[str, Any] = {
        "model": spec.key, "preset": method.label, "world": world, "rank": rank,
        "local_batch": local, "layers": len(getattr(opt, "layers", {}) or {}),
        "grad_bytes": comm_model.grad_bytes(case.model),
        "grad_calls_est": comm_model.grad_calls(case.model),
        "step_s": [], "calls": [], "bytes": [], "comm_s": [],
        "formula_calls": [], "formula_bytes": [], "formula_error": None,
    }
    try:
        per = comm_model.per_step(opt)
        rec["formula_calls_steady"], rec["formula_bytes_steady"] = per.calls, per.bytes
        rec["formula_breakdown"] = {k: [v.calls, v.bytes]
                                    for k, v in comm_model.breakdown(opt).items()}
    except comm_model.UnknownCommModel as exc:
        rec["formula_error"] = str(exc)
    for k in range(untimed, untimed + steps):
        x, y = batches[k % len(batches)]
        if rec["formula_error"] is None:
            exp = comm_model.expected_comm(opt, 1)
            rec["formula_calls"].append(exp.calls)
            rec["formula_bytes"].append(exp.bytes)
        c0, b0, s0 = getattr(comm, "calls", 0), getattr(comm, "bytes", 0), spent[0]
        if world > 1:
            dist.barrier()
        t0 = time.perf_counter()
        case.step(x, y)
        rec["step_s"].append(time.perf_counter() - t0)
        rec["calls"].append(getattr(comm, "calls", 0) - c0)
        rec["bytes"].append(getattr(comm, "bytes", 0) - b0)
        rec["comm_s"].append(spent[0] - s0)
    return rec


def _rank_main(rank: int, world: int, folder: str) -> None:
    """Entry point of one spawned rank: every case of ``folder/job.json``; the records go to
    ``folder/w{world}-r{rank}.json`` after each case (a timeout keeps what was done)."""
    import torch.distributed as dist

    warnings.simplefilter("ignore")
    job = json.loads(Path(folder, "job.json").read_text())
    torch.set_num_threads(int(job["threads"]) if job["threads"] else torch.get_num_threads())
    out_path = Path(folder, f"w{world}-r{rank}.json")
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous-{world}",
                                rank=rank, world_size=world,
                                timeout=timedelta(seconds=job["pg_timeout"]))
    records: list[dict] = []
    try:
        for s in job["specs"]:
            for m in job["methods"]:
                spec, method = _spec_of(s), _method_of(m)
                try:
                    rec = _run_case(spec, method, job["suite"], rank, world, job["untimed"],
                                    job["steps"], job["seed"])
                    rec["error"] = None
                except Exception as exc:  # one broken case must not sink the others
                    rec = {"model": spec.key, "preset": method.label, "world": world,
                           "rank": rank, "error": f"{type(exc).__name__}: "
                           f"{' '.join(str(exc).split())}"[:300],
                           "traceback": traceback.format_exc()[-2000:]}
                records.append(rec)
                out_path.write_text(json.dumps(records))
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _launch(world: int, folder: str) -> None:
    """Run in the child interpreter: spawn ``world`` ranks and wait for them."""
    import torch.multiprocessing as mp

    mp.start_processes(_rank_main, args=(world, folder), nprocs=world, start_method="spawn",
                       join=True)


def spawn_group(world: int, folder: Path, timeout: float) -> tuple[int, str]:
    """Run the job of ``folder`` on ``world`` ranks in a child interpreter of its own session;
    kill the session after ``timeout`` seconds. Returns (exit status, last output)."""
    code = "import sys; from kfqn.bench.distributed import _launch; " \
           "_launch(int(sys.argv[1]), sys.argv[2])"
    env = {**os.environ,
           "PYTHONPATH": os.pathsep.join(p for p in (str(_ROOT), os.environ.get("PYTHONPATH", ""))
                                         if p)}
    proc = subprocess.Popen([sys.executable, "-c", code, str(world), str(folder)],
                            cwd=folder, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        return proc.returncode, (out or "")[-3000:]
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)   # the child and the ranks it spawned
        except ProcessLookupError:
            pass
        out, _ = proc.communicate()
        return -9, f"timed out after {timeout:.0f} s\n" + (out or "")[-3000:]


# -- the parent ----------------------------------------------------------------------------------
def _median(xs: Sequence[float]) -> float | None:
    return statistics.median(xs) if xs else None


def _merge_ranks(recs: list[dict], world: int) -> dict:
    """One record per case and world size from its ranks' records: the step time of a round is
    the slowest rank's; counts are rank 0's (every rank makes the same calls; checked)."""
    errors = [r["error"] for r in recs if r.get("error")]
    base = dict(recs[0])
    if errors or len(recs) < world:
        return {"model": base["model"], "preset": base["preset"], "world": world,
                "error": errors[0] if errors else f"only {len(recs)} of {world} ranks reported"}
    rounds = [max(ts) for ts in zip(*(r["step_s"] for r in recs))]
    comm_rounds = [max(ts) for ts in zip(*(r["comm_s"] for r in recs))]
    same = all(r["calls"] == recs[0]["calls"] and r["bytes"] == recs[0]["bytes"] for r in recs)
    steps = len(rounds)
    out = {k: base[k] for k in ("model", "preset", "world", "local_batch", "layers",
                                "grad_bytes", "grad_calls_est", "formula_error")}
    out.update({
        "steps": steps, "error": None if same else "ranks made different collectives",
        "step_ms_median": _median([t * 1e3 for t in rounds]),
        "step_ms_min": min(rounds) * 1e3 if rounds else None,
        "stats_comm_ms_median": _median([t * 1e3 for t in comm_rounds]),
        "calls_per_step": sum(base["calls"]) / steps if steps else None,
        "bytes_per_step": sum(base["bytes"]) / steps if steps else None,
        "calls_by_step": base["calls"], "bytes_by_step": base["bytes"],
    })
    if base.get("formula_error") is None:
        out.update({
            "formula_calls_per_step": sum(base["formula_calls"]) / steps if steps else None,
            "formula_bytes_per_step": sum(base["formula_bytes"]) / steps if steps else None,
            "formula_calls_by_step": base["formula_calls"],
            "formula_bytes_by_step": base["formula_bytes"],
            "formula_calls_steady": base.get("formula_calls_steady"),
            "formula_bytes_steady": base.get("formula_bytes_steady"),
            "formula_breakdown": base.get("formula_breakdown"),
        })
        if world > 1:
            out["formula_match"] = (base["formula_calls"] == base["calls"]
                                    and base["formula_bytes"] == base["bytes"])
    return out


def run_group(specs: Sequence[ModelSpec], methods: Sequence[MethodSpec], suite: dict,
              world: int, warmup: int, steps: int, seed: int = 0, threads: int | None = 1,
              timeout: float = 900.0, pg_timeout: float = 120.0,
              folder: Path | None = None,
              first_step_timed: bool = False) -> tuple[list[dict], str]:
    """Every case on ``world`` ranks (one spawned group); the merged records and the group's
    output tail (empty when it exited cleanly). The first step (one-off start-up work) is not
    timed unless ``first_step_timed``; ``warmup`` more steps are not timed either."""
    for spec in specs:
        if spec.batch % world:
            raise ConfigError(f"model {spec.key!r}: batch {spec.batch} is not a multiple of "
                              f"{world} ranks (set --batch {spec.key}=...)")
    with tempfile.TemporaryDirectory(prefix="kfqn-bench-dist-", dir=folder) as tmp:
        job = {"specs": [asdict(s) for s in specs], "methods": [asdict(m) for m in methods],
               "suite": suite, "untimed": warmup + (0 if first_step_timed else 1),
               "steps": steps, "seed": seed,
               "threads": threads, "pg_timeout": pg_timeout}
        Path(tmp, "job.json").write_text(json.dumps(job, default=list))
        status, tail = spawn_group(world, Path(tmp), timeout)
        per_rank = []
        for r in range(world):
            path = Path(tmp, f"w{world}-r{r}.json")
            per_rank.append(json.loads(path.read_text()) if path.is_file() else [])
    merged = []
    for spec in specs:
        for m in methods:
            recs = [next((x for x in rank if x["model"] == spec.key and x["preset"] == m.label),
                         None) for rank in per_rank]
            recs = [x for x in recs if x is not None]
            if not recs:
                merged.append({"model": spec.key, "preset": m.label, "world": world,
                               "error": f"not run (group exit status {status})"})
                continue
            merged.append(_merge_ranks(recs, world))
    return merged, ("" if status == 0 else tail)


def run_scaling(specs: Sequence[ModelSpec], methods: Sequence[MethodSpec], suite: dict,
                nproc: int, warmup: int, steps: int, seed: int = 0, threads: int | None = 1,
                timeout: float = 900.0, log: Callable[[str], None] = print) -> list[dict]:
    """Every case at 1 rank and at ``nproc`` ranks; one record per (model, method) with both
    step times, the speed-up, kfqn's statistics traffic (measured at ``nproc``) beside the
    formula, and DDP's gradient bytes."""
    if nproc < 2:
        raise ConfigError("--nproc must be >= 2")
    by_world: dict[int, list[dict]] = {}
    for world in (1, nproc):
        t0 = time.perf_counter()
        log(f"{world} rank{'s' if world > 1 else ''}: {len(specs)} model(s) x {len(methods)} "
            f"methods, {warmup} warm-up + {steps} timed steps each ...")
        recs, tail = run_group(specs, methods, suite, world, warmup, steps, seed, threads,
                               timeout)
        if tail:
            log(f"  the {world}-rank group did not exit cleanly:\n{tail}")
        log(f"  done in {time.perf_counter() - t0:.0f} s")
        by_world[world] = recs
    out = []
    for one, many in zip(by_world[1], by_world[nproc]):
        rec = {"model": one["model"], "preset": one["preset"], "nproc": nproc,
               "batch": next(s.batch for s in specs if s.key == one["model"]),
               "error": one.get("error") or many.get("error")}
        rec["step_ms_1"] = one.get("step_ms_median")
        rec["step_ms_n"] = many.get("step_ms_median")
        rec["speedup"] = (rec["step_ms_1"] / rec["step_ms_n"]
                          if rec["step_ms_1"] and rec["step_ms_n"] else None)
        for key in ("layers", "local_batch", "steps", "grad_bytes", "grad_calls_est",
                    "calls_per_step", "bytes_per_step", "stats_comm_ms_median",
                    "formula_calls_per_step", "formula_bytes_per_step", "formula_match",
                    "formula_calls_steady", "formula_bytes_steady", "formula_breakdown",
                    "formula_error", "calls_by_step", "bytes_by_step",
                    "formula_calls_by_step", "formula_bytes_by_step"):
            rec[key] = many.get(key)
        rec["one_rank"] = one
        out.append(rec)
    return out


def _kb(n: float | None) -> str:
    if n is None:
        return "-"
    return f"{n / 1e3:,.1f}" if n >= 100 else f"{n / 1e3:.3f}"


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.0f}"


def scaling_table(records: Sequence[dict]) -> str:
    """The Markdown table of :func:`run_scaling`."""
    n = records[0]["nproc"] if records else "N"
    head = (f"| model | method | batch (global) | step ms, 1 rank | step ms, {n} ranks | "
            f"speed-up | kfqn calls / step | kfqn kB / step | formula kB / step | "
            f"formula = measured | in kfqn all-reduces, ms | DDP gradient kB / step | "
            f"kfqn / DDP bytes |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in records:
        if r["error"]:
            lines.append(f"| {r['model']} | {r['preset']} | {r['batch']} | failed: "
                         f"{r['error']} |" + " |" * 9)
            continue
        calls = r["calls_per_step"]
        match = {True: "yes", False: "NO", None: "-"}[r.get("formula_match")]
        if r.get("formula_error"):
            match = "no model"
        ratio = (r["bytes_per_step"] / r["grad_bytes"]
                 if r.get("bytes_per_step") is not None and r.get("grad_bytes") else None)
        speed = "-" if r["speedup"] is None else f"{r['speedup']:.2f}"
        ncalls = "-" if calls is None else f"{calls:g}"
        spent = "-" if r["stats_comm_ms_median"] is None else f"{r['stats_comm_ms_median']:.1f}"
        share = "-" if ratio is None else f"{ratio:.2f}"
        lines.append(
            f"| {r['model']} | {r['preset']} | {r['batch']} | {_ms(r['step_ms_1'])} | "
            f"{_ms(r['step_ms_n'])} | {speed} | {ncalls} | {_kb(r['bytes_per_step'])} | "
            f"{_kb(r.get('formula_bytes_per_step'))} | {match} | {spent} | "
            f"{_kb(r['grad_bytes'])} | {share} |")
    return "\n".join(lines)
