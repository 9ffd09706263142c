"""``kfqn bench --project``: projected data-parallel step time at 8 and 64 GPUs.

A projection, not a measurement. Per (model, preset, N GPUs)::

    T(N) = T_compute + T_stats(N) + T_grad(N)

* **T_stats**, kfqn's statistics all-reduces: calls and bytes per step from
  :mod:`kfqn.bench.comm_model` (steady state, averaged over K-FAC's cadence), on the model's
  real layer dimensions (the model is built here, on the CPU). The formula is the one that
  ``tests/test_bench.py`` checks exactly against 2-rank gloo runs;
* **T_grad**, DDP's gradient all-reduce: every trainable parameter's bytes, in ~25 MiB buckets;
  counted as not overlapped with the backward (an upper bound: DDP overlaps most of it);
* one all-reduce of b bytes over N GPUs takes ``alpha + 2 (N-1)/N * b / B`` (ring all-reduce;
  B = the all-reduce bus bandwidth, alpha = the per-call latency), with the link figures of
  :data:`LINKS` (``--link N:GBps:us`` overrides them). kfqn's all-reduces are blocking and sit
  between the backward and the update, so they add to the step;
* **T_compute**, the per-GPU compute time, *weak scaling*: every GPU keeps the local batch of a
  measured 1-GPU run (32 for VGG16 in ``benchmarks/results/2026-11-25-h100-full.json``, one
  H100, torch 2.11), so T_compute is that run's median step time. A model without a GPU record
  (ResNet-32) gets an *estimate* transferred from the reference model's record, preset by
  preset: the forward/backward (+ extra pass) time scaled by the ratio of the two models'
  dispatched ops of one forward+backward (counted here with :mod:`kfqn.bench.ops`), the
  optimizer's time by the ratio of preconditioned layers (kfqn's optimizer work per layer is
  a near-constant ~400-500 ops, README's op table, and at these sizes the H100 is
  launch-bound), the first-order fallback by the ratio of its parameter tensors. K-FAC and
  Shampoo in that record invert at every step (their first 20 steps): their T_compute there is
  an upper bound of the steady state, which inverts every 20th step; for ResNet-32 they are not
  estimated.
"""
from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from kfqn.bench import comm_model
from kfqn.bench.suite import benchmarks_dir

#: (all-reduce bus bandwidth in GB/s, latency per call in microseconds, what) per GPU count
LINKS: dict[int, tuple[float, float, str]] = {
    8: (360.0, 15.0, "one node of 8 H100 SXM, NVLink 4 / NVSwitch (900 GB/s per GPU "
                     "bidirectional; NCCL all-reduce bus bandwidth ~360-480 GB/s: 360 assumed)"),
    64: (40.0, 40.0, "8 such nodes, one 400 Gb/s NDR InfiniBand NIC per GPU (50 GB/s line rate; "
                     "40 GB/s bus bandwidth assumed across nodes)"),
}

MODELS = {"resnet32": ((3, 32, 32), 10), "vgg16": ((3, 32, 32), 10)}
PRESETS = ("sgd_m", "adam", "kbfgs", "kbfgs_l", "kfbfgs_cnn", "kfbfgs_l_cnn", "kfbfgs_ll_cnn",
           "kfac", "shampoo")
#: presets whose reference records invert at every step (inverse_warmup 20 > the steps timed)
INVERTING = ("kfac", "shampoo")
DEFAULT_COMPUTE = "results/2026-11-25-h100-full.json"
REFERENCE_MODEL = "vgg16"


@dataclass
class ModelFacts:
    """What the projection needs of one model under one preset."""

    layers: int
    fallback_tensors: int
    param_tensors: int
    grad_bytes: int
    grad_calls: int
    stats: comm_model.CommCount
    breakdown: dict


def allreduce_s(calls: float, nbytes: float, n: int, bw_gbps: float, lat_us: float) -> float:
    """Seconds of ``calls`` ring all-reduces moving ``nbytes`` in total over ``n`` GPUs."""
    return calls * lat_us * 1e-6 + 2.0 * (n - 1) / n * nbytes / (bw_gbps * 1e9)


def _build(model: str, width: float = 1.0) -> torch.nn.Module:
    from kfqn.runner.registry import runner_registry

    comp = runner_registry().get("model", model)
    comp = comp() if isinstance(comp, type) else comp
    opts = {k: o.default for k, o in (comp.options or {}).items()}
    if "width" in opts:
        opts["width"] = width
    shape, classes = MODELS.get(model, ((3, 32, 32), 10))
    torch.manual_seed(0)
    return comp.build(shape, classes, **opts)


def model_facts(model: str, preset: str) -> ModelFacts:
    """Layer dimensions, statistics traffic and gradient bytes of ``model`` under ``preset``."""
    import kfqn

    net = _build(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = kfqn.build_optimizer(net, preset)
    try:
        claimed = {id(p) for l in opt.layers.values() for p in l.adapter.params()}
        tensors = [p for p in net.parameters() if p.requires_grad]
        return ModelFacts(len(opt.layers), sum(1 for p in tensors if id(p) not in claimed),
                          len(tensors), comm_model.grad_bytes(net), comm_model.grad_calls(net),
                          comm_model.per_step(opt), comm_model.breakdown(opt))
    finally:
        opt.remove_hooks()


def closure_ops(model: str, batch: int = 2) -> int:
    """Dispatched ops of one forward+backward of ``model`` (cross-entropy, no optimizer hooks)."""
    from kfqn.bench.ops import count_call

    net = _build(model)
    shape, classes = MODELS.get(model, ((3, 32, 32), 10))
    x = torch.randn(batch, *shape)
    y = torch.randint(0, classes, (batch,))

    def closure() -> None:
        net.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(net(x), y).backward()
    closure()   # lazy initialisations out of the way
    return count_call(closure).total


def load_compute(path: Path) -> dict[tuple[str, str], dict]:
    """CUDA records of a ``kfqn bench --json`` file, by (model, preset)."""
    data = json.loads(Path(path).read_text())
    return {(r["model"], r["preset"]): r for r in data["records"]
            if r.get("device") == "cuda" and r.get("step_ms_median") is not None}


def _phases(rec: dict) -> tuple[float, float, float]:
    """(forward+backward+extra pass, optimizer layer work, fallback) of a record, in ms; what
    the phases do not cover goes with the forward+backward."""
    ph = rec.get("phase_ms_median") or {}
    fb = ph.get("forward_backward", 0.0) + ph.get("extra_pass", 0.0)
    opt = ph.get("factor_updates", 0.0) + ph.get("precondition", 0.0)
    fall = ph.get("fallback", 0.0) + ph.get("update", 0.0)
    rest = rec["step_ms_median"] - fb - opt - fall
    return fb + max(rest, 0.0), opt, fall


def compute_ms(model: str, preset: str, records: dict, facts: dict, ops: dict,
               reference: str = REFERENCE_MODEL) -> tuple[float | None, str]:
    """Per-GPU compute time of one step (ms) and where it comes from."""
    own = records.get((model, preset))
    if own is not None:
        note = "measured" + (" (inverts every step)" if preset in INVERTING else "")
        return own["step_ms_median"], note
    ref = records.get((reference, preset))
    if ref is None or preset in INVERTING:
        return None, "not estimated"
    fb, opt, fall = _phases(ref)
    f_ref, f_new = facts[(reference, preset)], facts[(model, preset)]
    out = fb * ops[model] / ops[reference]
    if f_ref.layers:
        out += opt * f_new.layers / f_ref.layers
    else:
        out += opt * f_new.param_tensors / f_ref.param_tensors
    if f_ref.fallback_tensors:
        out += fall * f_new.fallback_tensors / f_ref.fallback_tensors
    elif f_new.fallback_tensors:   # per-tensor cost of the reference's first-order method
        adam = records.get((reference, "adam"))
        if adam is not None:
            out += _phases(adam)[2] / facts[(reference, "adam")].fallback_tensors \
                * f_new.fallback_tensors
    return out, f"estimated from {reference}"


def project(models: Sequence[str] = ("resnet32", "vgg16"), presets: Sequence[str] = PRESETS,
            gpus: Sequence[int] = (8, 64), links: dict[int, tuple[float, float, str]] | None = None,
            compute_file: Path | None = None, log: Any = print,
            reference: str = REFERENCE_MODEL) -> dict:
    """The projection: one row per (model, preset), the link assumptions, the inputs used."""
    links = {**LINKS, **(links or {})}
    missing = [n for n in gpus if n not in links]
    if missing:
        raise ValueError(f"no link figures for {missing[0]} GPUs: give --link "
                         f"{missing[0]}:GBps:us")
    path = Path(compute_file) if compute_file else benchmarks_dir() / DEFAULT_COMPUTE
    records = load_compute(path)
    facts: dict[tuple[str, str], ModelFacts] = {}
    needs_ref = any((m, p) not in records for m in models for p in presets)
    wanted = list(dict.fromkeys([*models, *([reference] if needs_ref else [])]))
    for model in wanted:
        for preset in dict.fromkeys([*presets, "adam"]):
            log(f"  {model} / {preset}: building for its layer dimensions")
            facts[(model, preset)] = model_facts(model, preset)
    ops = {m: closure_ops(m) for m in wanted} if needs_ref else {}
    rows = []
    for model in models:
        for preset in presets:
            f = facts[(model, preset)]
            t_c, source = compute_ms(model, preset, records, facts, ops, reference)
            local = records.get((model if (model, preset) in records else reference,
                                 preset), {}).get("batch")
            row: dict[str, Any] = {
                "model": model, "preset": preset, "layers": f.layers,
                "stats_calls": f.stats.calls, "stats_bytes": f.stats.bytes,
                "grad_calls": f.grad_calls, "grad_bytes": f.grad_bytes,
                "stats_breakdown": {k: [v.calls, v.bytes] for k, v in f.breakdown.items()},
                "compute_ms": t_c, "compute_source": source, "local_batch": local,
            }
            for n in gpus:
                bw, lat, _ = links[n]
                ts = allreduce_s(f.stats.calls, f.stats.bytes, n, bw, lat) * 1e3
                tg = allreduce_s(f.grad_calls, f.grad_bytes, n, bw, lat) * 1e3
                row[f"stats_ms_{n}"], row[f"grad_ms_{n}"] = ts, tg
                row[f"step_ms_{n}"] = None if t_c is None else t_c + ts + tg
                row[f"efficiency_{n}"] = None if t_c is None else t_c / (t_c + ts + tg)
            rows.append(row)
    return {"rows": rows, "gpus": list(gpus),
            "links": {str(n): {"bus_GBps": links[n][0], "latency_us": links[n][1],
                               "what": links[n][2]} for n in gpus},
            "compute_file": str(path), "closure_ops": ops, "reference_model": reference}


def _mb(n: float) -> str:
    return f"{n / 1e6:.3f}" if n < 1e6 else f"{n / 1e6:.1f}"


def _f(x: float | None, fmt: str) -> str:
    return "-" if x is None else fmt.format(x)


def projection_table(result: dict) -> str:
    """Markdown table of :func:`project`."""
    gpus = result["gpus"]
    head = ("| model | preset | layers | kfqn calls / step | kfqn MB / step | DDP grad MB / step | "
            "compute ms / GPU (1 GPU) | " +
            " | ".join(f"kfqn comm ms @{n} | DDP comm ms @{n} | step ms @{n} | efficiency @{n}"
                       for n in gpus) + " |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in result["rows"]:
        comp = _f(r["compute_ms"], "{:.1f}")
        if "inverts" in r["compute_source"]:
            comp += " (inv. every step)"
        elif r["compute_source"] != "measured" and r["compute_ms"] is not None:
            comp += " (est.)"
        cells = [r["model"], r["preset"], str(r["layers"]), f"{r['stats_calls']:g}",
                 _mb(r["stats_bytes"]), _mb(r["grad_bytes"]), comp]
        for n in gpus:
            cells += [f"{r[f'stats_ms_{n}']:.2f}", f"{r[f'grad_ms_{n}']:.2f}",
                      _f(r[f"step_ms_{n}"], "{:.1f}"),
                      _f(None if r[f"efficiency_{n}"] is None else 100 * r[f"efficiency_{n}"],
                         "{:.0f}%")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def assumptions_text(result: dict) -> str:
    """The assumptions of a projection, one per line."""
    lines = []
    for n, link in result["links"].items():
        lines.append(f"- {n} GPUs: {link['what']}; all-reduce time = {link['latency_us']:g} us "
                     f"per call + 2 ({n}-1)/{n} x bytes / {link['bus_GBps']:g} GB/s")
    ops = ", ".join(f"{k} {v}" for k, v in result["closure_ops"].items())
    estimated = sorted({r["model"] for r in result["rows"]
                        if r["compute_source"].startswith("estimated")})
    line = (f"- compute per GPU: the 1-GPU step time at the same local batch (weak scaling), "
            f"from {Path(result['compute_file']).name}")
    if estimated:
        line += (f"; {', '.join(estimated)} estimated from {result['reference_model']}'s records "
                 f"by the dispatched ops of one forward+backward ({ops}) and by the number of "
                 "preconditioned layers")
    lines.append(line + "; K-FAC / Shampoo records that invert every step are upper bounds")
    lines.append("- DDP's gradient all-reduce not overlapped with the backward (upper bound); "
                 "kfqn's statistics all-reduces are blocking and on the critical path")
    return "\n".join(lines)


def parse_link(text: str) -> tuple[int, tuple[float, float, str]]:
    """``N:GBps:us`` (``--link``)."""
    parts = text.split(":")
    if len(parts) != 3:
        raise ValueError(f"expected N:GBps:us, got {text!r}")
    n, bw, lat = int(parts[0]), float(parts[1]), float(parts[2])
    if n < 2 or bw <= 0 or lat < 0 or not math.isfinite(bw):
        raise ValueError(f"--link {text!r}: N >= 2, bandwidth > 0, latency >= 0")
    return n, (bw, lat, f"--link {text}")
