"""Full optimizer steps under adversarial input, every preset (the step-level stress figure).

Each step draws one fault: a normal batch, inputs scaled by 1e-30 / 1e4 / 1e15, identical samples
(a rank-one batch), all-zero inputs, a NaN or inf input, the loss scaled by 1e15 or 1e-30, a NaN
or inf loss, a NaN or inf gradient, labels all equal. After every step: no exception, every
parameter finite, every dense factor of ``opt.factors()`` finite. Faulty steps are skipped or
absorbed (and counted), never poisonous.

    python benchmarks/adversarial_steps.py [--steps-per-preset 1000] [--seed 0]

prints a table (one row per preset) and exits 1 if any raise or non-finite value was seen.
"""
from __future__ import annotations

import argparse
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

import kfqn

FAULTS = ["none", "none", "none", "tiny_input", "big_input", "huge_input", "identical",
          "zero_input", "nan_input", "inf_input", "huge_loss", "tiny_loss", "nan_loss",
          "inf_loss", "nan_grad", "inf_grad", "one_label"]


@dataclass
class Row:
    steps: int = 0
    faults: int = 0
    raises: int = 0
    nonfinite_params: int = 0
    nonfinite_factors: int = 0
    skipped: int = 0
    final_loss: float = float("nan")
    examples: list = field(default_factory=list)


def model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 8),
                         nn.Tanh(), nn.Linear(8, 3))


def batch(fault: str, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(16, 1, 6, 6, generator=g)
    y = (x.flatten(1)[:, :3]).argmax(1)
    scale = {"tiny_input": 1e-30, "big_input": 1e4, "huge_input": 1e15}.get(fault)
    if scale is not None:
        x = x * scale
    if fault == "identical":
        x = x[:1].expand_as(x).clone()
    elif fault == "zero_input":
        x = torch.zeros_like(x)
    elif fault in ("nan_input", "inf_input"):
        x[3, 0, 2, 2] = float("nan") if fault == "nan_input" else float("inf")
    elif fault == "one_label":
        y = torch.zeros_like(y)
    return x, y


def run_preset(preset: str, steps: int, seed: int) -> Row:
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    net = model()
    row = Row()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = kfqn.build_optimizer(net, preset)
        if opt.needs_warm_start:
            with opt.warm_start():
                net(batch("none", g)[0])
        for k in range(steps):
            fault = FAULTS[int(torch.randint(len(FAULTS), (1,), generator=g))]
            x, y = batch(fault, g)
            row.steps += 1
            row.faults += fault != "none"

            def closure(x=x, y=y, fault=fault):
                opt.zero_grad()
                loss = F.cross_entropy(net(x), y)
                loss = {"huge_loss": loss * 1e15, "tiny_loss": loss * 1e-30,
                        "nan_loss": loss * float("nan"),
                        "inf_loss": loss + float("inf")}.get(fault, loss)
                loss.backward()
                w = net[3].weight.grad
                if w is not None and fault in ("nan_grad", "inf_grad"):
                    w[0, 0] = float("nan") if fault == "nan_grad" else float("inf")
                return loss
            try:
                loss = opt.step(closure)
                row.final_loss = float(loss)
            except Exception as exc:  # noqa: BLE001 -- counted, that is the figure
                row.raises += 1
                if len(row.examples) < 3:
                    row.examples.append(f"step {k} ({fault}): {type(exc).__name__}: {exc}\n"
                                        + traceback.format_exc(limit=3))
                continue
            if not all(bool(torch.isfinite(p).all()) for p in net.parameters()):
                row.nonfinite_params += 1
                if len(row.examples) < 3:
                    row.examples.append(f"step {k} ({fault}): non-finite parameter")
            bad = [f"{n}.{key}" for n, fs in opt.factors().items() for key, t in fs.items()
                   if not bool(torch.isfinite(t).all())]
            if bad:
                row.nonfinite_factors += 1
                if len(row.examples) < 3:
                    row.examples.append(f"step {k} ({fault}): non-finite factors {bad}")
        row.skipped = int(opt.stats()["_global"]["nonfinite_steps"])
    return row


def run(presets: list[str], steps: int, seed: int) -> dict[str, Row]:
    return {p: run_preset(p, steps, seed) for p in presets}


def table(rows: dict[str, Row]) -> str:
    lines = ["| preset | steps | faulty | skipped (non-finite) | raises | non-finite params "
             "| non-finite factors |", "|---|---|---|---|---|---|---|"]
    for p, r in rows.items():
        lines.append(f"| {p} | {r.steps} | {r.faults} | {r.skipped} | {r.raises} | "
                     f"{r.nonfinite_params} | {r.nonfinite_factors} |")
    t = {k: sum(getattr(r, k) for r in rows.values())
         for k in ("steps", "faults", "skipped", "raises", "nonfinite_params", "nonfinite_factors")}
    lines.append(f"| all | {t['steps']} | {t['faults']} | {t['skipped']} | {t['raises']} | "
                 f"{t['nonfinite_params']} | {t['nonfinite_factors']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps-per-preset", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--presets", default=None, help="comma-separated (default: every preset)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    presets = (args.presets.split(",") if args.presets else
               sorted(n for kind, n, _ in kfqn.components() if kind == "preset"))
    t0 = time.perf_counter()
    rows = run(presets, args.steps_per_preset, args.seed)
    print(table(rows))
    print(f"{time.perf_counter() - t0:.0f} s")
    for p, r in rows.items():
        for e in r.examples:
            print(f"[{p}] {e}")
    bad = sum(r.raises + r.nonfinite_params + r.nonfinite_factors for r in rows.values())
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
