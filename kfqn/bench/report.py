"""Records, ratios, target checks and the Markdown tables of ``kfqn bench``."""
from __future__ import annotations

import math
import statistics
from typing import Any, Sequence

import torch

from kfqn.bench.measure import Result
from kfqn.bench.suite import REFERENCE, TORCH_REFERENCE, ModelSpec

#: phases in table order; other keys a future optimizer reports are kept in the JSON
PHASES = ("forward_backward", "extra_pass", "factor_updates", "precondition", "fallback", "update")


def _quantiles(xs: Sequence[float]) -> tuple[float, float, float]:
    if len(xs) == 1:
        return xs[0], xs[0], xs[0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], statistics.median(xs), q[2]


def summarise(results: Sequence[Result], spec: ModelSpec, device: torch.device,
              meta: dict, ops_top: int = 0) -> list[dict]:
    """One JSON record per method (schema in the module docstring and ``tests/test_bench.py``);
    the ``ops_*`` fields of :mod:`kfqn.bench.ops` when the ops were counted (``ops_top``: keep
    the most frequent operators and kfqn functions of the optimizer's ops)."""
    records = []
    for r in results:
        c = r.case
        rec: dict[str, Any] = {
            "model": spec.key, "model_name": spec.model, "preset": c.method.label,
            "preset_name": c.method.preset or c.method.baseline,
            "overrides": list(c.method.dotlist),
            "impl": c.impl, "device": device.type, "batch": spec.batch,
            "repeats": len(r.times), "warmup": meta["warmup"], "threads": meta["threads"],
            "error": r.error,
        }
        ms = [t * 1e3 for t in r.times]
        if ms:
            q1, med, q3 = _quantiles(ms)
            keys = sorted({k for p in r.phases for k in p if k != "total"},
                          key=lambda k: (PHASES.index(k) if k in PHASES else len(PHASES), k))
            rec.update({
                "step_ms_median": med, "step_ms_q25": q1, "step_ms_q75": q3,
                "step_ms_iqr": q3 - q1, "step_ms_min": min(ms), "step_ms_max": max(ms),
                "phase_ms_median": {k: statistics.median(p.get(k, 0.0) * 1e3 for p in r.phases)
                                    for k in keys},
                "phase_ms_min": {k: min(p.get(k, 0.0) * 1e3 for p in r.phases) for k in keys},
            })
        else:
            rec.update({k: None for k in ("step_ms_median", "step_ms_q25", "step_ms_q75",
                                          "step_ms_iqr", "step_ms_min", "step_ms_max")})
            rec["phase_ms_median"] = rec["phase_ms_min"] = {}
        rec["first_step_ms"] = None if math.isnan(r.first_step_s) else r.first_step_s * 1e3
        rec["warm_start_ms"] = c.warm_start_s * 1e3
        ok = r.error is None and c.opt is not None
        rec["state_bytes"] = c.state_bytes() if ok else None
        rec["param_bytes"] = c.param_bytes()
        rec["resident_bytes"] = r.resident_bytes
        rec["transient_peak_bytes"] = r.transient_bytes
        rec["peak_bytes"] = None
        if ok and r.transient_bytes is not None:
            resident = r.resident_bytes if r.resident_bytes is not None else rec["state_bytes"]
            rec["peak_bytes"] = 2 * rec["param_bytes"] + resident + r.transient_bytes
        rec["memory_method"] = r.memory_method
        rec["host_syncs"] = None if r.host_sync is None else int(bool(r.host_sync))
        rec["host_sync_at"] = r.host_sync or None
        if r.ops is not None:
            rec.update(r.ops.record(ops_top))
        records.append(rec)
    ref = next((x for x in records if x["preset"] == REFERENCE and x["error"] is None), None)
    tref = next((x for x in records if x["preset"] == TORCH_REFERENCE and x["error"] is None),
                None)
    times = {r.case.method.label: r.times for r in results if r.error is None}
    for rec in records:
        rec["ratio_of_medians_to_adam"] = _ratio(rec["step_ms_median"],
                                                 ref and ref["step_ms_median"])
        rec["ratio_to_adam"] = _paired_ratio(times.get(rec["preset"]), times.get(REFERENCE))
        rec["ratio_to_torch_adam"] = _paired_ratio(times.get(rec["preset"]),
                                                   times.get(TORCH_REFERENCE))
        rec["state_ratio_to_adam"] = _ratio(rec["state_bytes"], ref and ref["state_bytes"])
        rec["peak_ratio_to_adam"] = _ratio(rec["peak_bytes"], ref and ref["peak_bytes"])
        if "ops_per_param_tensor" in rec:
            rec["ops_per_param_tensor_x_torch_adam"] = _ratio(
                rec["ops_per_param_tensor"], tref and tref.get("ops_per_param_tensor"))
    return records


def _paired_ratio(times: Sequence[float] | None, ref: Sequence[float] | None) -> float | None:
    """Median over timed rounds of (this method's step time / the reference's in the same
    round). Every round runs all methods back to back on the same batch, so a pair shares the
    machine's state; pairing cancels drifts of a shared machine's speed that the ratio of the
    two medians would keep."""
    if not times or not ref or len(times) != len(ref):
        return None
    return statistics.median(t / r for t, r in zip(times, ref) if r > 0)


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def evaluate_targets(records: Sequence[dict], targets: Sequence[dict]) -> list[dict]:
    """PASS / MISS (or SKIP when not run) per target and device."""
    rows = []
    devices = sorted({r["device"] for r in records}) or ["cpu"]
    for t in targets:
        for dev in devices:
            if dev not in t.get("devices", [dev]):
                continue
            rec = next((r for r in records if r["preset"] == t["method"]
                        and r["model"] == t["model"] and r["device"] == dev), None)
            value = None if rec is None else rec.get(t["metric"])
            if value is None:
                why = "not run" if rec is None else (rec.get("error") or _missing(rec, t))
                status = "SKIP"
            else:
                status = "PASS" if value <= t["max"] else "MISS"
                why = ""
            torch_value = None
            if rec is not None and t["metric"] == "ratio_to_adam":
                torch_value = rec.get("ratio_to_torch_adam")
            rows.append({"id": t["id"], "description": t.get("description", ""), "device": dev,
                         "method": t["method"], "model": t["model"], "metric": t["metric"],
                         "max": t["max"], "value": value, "status": status, "note": why,
                         "value_vs_torch_adam": torch_value})
    return rows


def _missing(rec: dict, target: dict) -> str:
    metric = target["metric"]
    if metric.startswith("ops_"):
        if "ops_step" not in rec:
            return "ops not counted: run with --ops"
        if rec.get("ops_error"):
            return rec["ops_error"]
    return f"no {metric}"


def _mb(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.1f}"


def _f(x: float | None, fmt: str = "{:.0f}") -> str:
    return "-" if x is None else fmt.format(x)


def markdown_table(records: Sequence[dict]) -> str:
    """One Markdown table: step time, ratio, phases and memory per (model, device, method)."""
    head = ("| model | device | method | step ms (median) | IQR | min-max | x Adam | "
            "x torch Adam | fwd+bwd | "
            "extra pass | factors | precond | fallback/update | state MB | state x Adam | "
            "peak MB |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in records:
        if r["step_ms_median"] is None:
            lines.append(f"| {r['model']} | {r['device']} | {r['preset']} | failed: "
                         f"{r['error']} |" + " |" * 12)
            continue
        ph = r["phase_ms_median"]
        other = ph.get("fallback", 0.0) + ph.get("update", 0.0)
        lines.append(
            f"| {r['model']} | {r['device']} | {r['preset']} | {r['step_ms_median']:.0f} | "
            f"{r['step_ms_iqr']:.0f} | {r['step_ms_min']:.0f}-{r['step_ms_max']:.0f} | "
            f"{_f(r['ratio_to_adam'], '{:.2f}')} | {_f(r['ratio_to_torch_adam'], '{:.2f}')} | "
            f"{_f(ph.get('forward_backward'))} | "
            f"{_f(ph.get('extra_pass'))} | {_f(ph.get('factor_updates'))} | "
            f"{_f(ph.get('precondition'))} | {other:.0f} | {_mb(r['state_bytes'])} | "
            f"{_f(r['state_ratio_to_adam'], '{:.2f}')} | {_mb(r['peak_bytes'])} |")
    return "\n".join(lines)


def targets_table(rows: Sequence[dict]) -> str:
    """PASS/MISS per target as a Markdown table."""
    lines = ["| target | device | measured | limit | result | vs torch.optim.Adam |",
             "|---|---|---|---|---|---|"]
    for t in rows:
        val = "-" if t["value"] is None else f"{t['value']:.2f}"
        note = f" ({t['note']})" if t["note"] else ""
        lines.append(f"| {t['description'] or t['id']} | {t['device']} | {val} | "
                     f"<= {t['max']} | {t['status']}{note} | "
                     f"{_f(t.get('value_vs_torch_adam'), '{:.2f}')} |")
    return "\n".join(lines)


def _budget(rec: dict, targets: Sequence[dict]) -> str:
    """PASS / FAIL of the record's op-budget targets (``ops_*`` metrics), '-' if none."""
    out = []
    for t in targets:
        if not t["metric"].startswith("ops_") or t["method"] != rec["preset"] \
                or t["model"] != rec["model"] or rec["device"] not in t.get("devices",
                                                                          [rec["device"]]):
            continue
        value = rec.get(t["metric"])
        if value is None:
            out.append(f"SKIP ({t['metric']})")
        else:
            verdict = "PASS" if value <= t["max"] else "FAIL"
            short = t["metric"].replace("ops_per_layer", "per layer").replace("_", " ")
            out.append(f"{verdict} ({short} <= {t['max']:g})")
    return "; ".join(out) or "-"


def ops_table(records: Sequence[dict], targets: Sequence[dict] = ()) -> str:
    """Dispatched-op counts per (model, device, method) as a Markdown table (``--ops``).

    Counts of the median step (the counted step whose total is the lower median) and the
    maximum over the counted steps; optimizer ops = step ops - the closure's own ops."""
    head = ("| model | device | method | precond. layers | param tensors | closure calls | "
            "step ops | step ops (max) | closure ops | closure alone x calls | optimizer ops | "
            "opt ops / layer | opt ops / layer (max) | opt ops / param tensor | "
            "x torch Adam | budget |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in records:
        if "ops_step" not in r:
            continue
        lead = f"| {r['model']} | {r['device']} | {r['preset']} |"
        if r.get("ops_step") is None:
            lines.append(f"{lead} failed: {r.get('ops_error')} |" + " |" * 12)
            continue
        alone = r["ops_closure_alone"] * r["ops_closure_calls"]
        lines.append(
            f"{lead} {r['ops_layers']} | {r['ops_param_tensors']} | {r['ops_closure_calls']} | "
            f"{r['ops_step']} | {r['ops_step_max']} | {r['ops_closure']} | {alone} | "
            f"{r['ops_optimizer']} | {_f(r['ops_per_layer'])} | {_f(r['ops_per_layer_max'])} | "
            f"{_f(r['ops_per_param_tensor'])} | "
            f"{_f(r.get('ops_per_param_tensor_x_torch_adam'), '{:.1f}')} | "
            f"{_budget(r, targets)} |")
    return "\n".join(lines)


def ops_details(records: Sequence[dict]) -> str:
    """The most frequent operators, kfqn functions and step phases of each method's optimizer
    ops (``--ops-verbose``), as plain text."""
    out = []
    for r in records:
        if not r.get("ops_top_names"):
            continue
        out.append(f"{r['model']} [{r['device']}] {r['preset']}: {r['ops_optimizer']} optimizer "
                   f"ops in the median step ({r['ops_layers']} preconditioned layers)")
        for key, what in (("ops_top_names", "operators"), ("ops_top_entries", "step phases"),
                          ("ops_top_sites", "kfqn functions")):
            items = r.get(key) or []
            out.append(f"  {what}: " + ", ".join(f"{n} {c}" for n, c in items))
    return "\n".join(out)
