"""Compare the quasi-Newton presets with the baselines (docs/algorithms.md §4-5), small and on the CPU.

Two problems, each trained from the same initialisation and data order by every preset:

* ``curves``: a CURVES-like autoencoder (docs/algorithms.md §7, scaled down): 16x16 images of quadratic
  curves through three random points (Hinton & Salakhutdinov's recipe), 2000 images,
  256-128-64-32-8-32-64-128-256 with ReLU hidden layers and a linear code layer, sigmoid
  cross-entropy summed over pixels and averaged over samples, batch 100;
* ``digits``: scikit-learn's 8x8 digits (all 1797 images), a small CNN (conv 16, conv 32
  stride 2, fc 64, fc 10, ReLU), cross-entropy, batch 128.

Protocol: weight decay 1e-5 for every method (inside the gradient, as in P2); all other
hyperparameters are each preset's defaults (K-FAC: ``preconditioner.loss`` set to the problem's loss and
the ``cholesky_lazy`` inversion, which on the CPU costs nothing extra) except the learning
rate, chosen per method and problem from the grid (preset lr) x {1/3, 1, 3} by the training loss after 40% of the epochs
on seed 0. The chosen lr is then run with three seeds (initialisation and data order) for
``--epochs`` epochs and at least ``--budget`` CPU seconds. Reported: the training loss on the
whole training set (without the L2 term) after the given number of epochs, and at the given
CPU time (``time.process_time``, one thread, evaluation excluded, warm start included),
mean +- standard deviation over seeds.

    .venv/bin/python benchmarks/compare_baselines.py            # ~5 min of CPU
    .venv/bin/python benchmarks/compare_baselines.py --quick    # smoke run
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import kfqn

QN = ["kbfgs", "kbfgs_l", "kfbfgs_cnn", "kfbfgs_l_cnn"]
BASELINES = ["kfac", "shampoo", "sgd_m", "adam", "rmsprop"]
GRID = (1 / 3, 1.0, 3.0)
TUNE = 0.4  # tuning runs last this fraction of the epochs
WEIGHT_DECAY = 1e-5


# -- data and models ------------------------------------------------------------------------------
def curves(n: int, size: int = 16, seed: int = 0, sigma: float = 0.7) -> torch.Tensor:
    """(n, size*size) images in [0, 1]: a quadratic through three random points, drawn as
    exp(-d^2 / (2 sigma^2)) of the distance d to the curve (chord-length parametrisation)."""
    rng = np.random.default_rng(seed)
    pts = rng.uniform(1.5, size - 2.5, size=(n, 3, 2))
    d01 = np.linalg.norm(pts[:, 1] - pts[:, 0], axis=1)
    d12 = np.linalg.norm(pts[:, 2] - pts[:, 1], axis=1)
    t1 = (d01 / np.maximum(d01 + d12, 1e-9))[:, None]
    t = np.linspace(0.0, 1.0, 48)[None, :]
    # Lagrange basis through (0, p0), (t1, p1), (1, p2)
    l0 = (t - t1) * (t - 1) / (t1 * 1.0)
    l1 = t * (t - 1) / (t1 * (t1 - 1))
    l2 = t * (t - t1) / (1.0 - t1)
    curve = (l0[..., None] * pts[:, None, 0] + l1[..., None] * pts[:, None, 1]
             + l2[..., None] * pts[:, None, 2])                              # (n, 48, 2)
    yy, xx = np.mgrid[0:size, 0:size]
    grid = np.stack([xx.ravel(), yy.ravel()], 1).astype(np.float64)       # (size^2, 2)
    d2 = ((grid[None, :, None, :] - curve[:, None, :, :]) ** 2).sum(-1).min(-1)
    return torch.tensor(np.exp(-d2 / (2 * sigma ** 2)), dtype=torch.float32)


def autoencoder(d: int = 256, widths: tuple[int, ...] = (128, 64, 32, 8)) -> nn.Module:
    enc = [d, *widths]
    layers: list[nn.Module] = []
    dims = enc + enc[-2::-1]
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(a, b))
        last = i == len(dims) - 2
        code = b == widths[-1] and i == len(widths) - 1
        if not last and not code:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def digits_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10))


def sigmoid_ce(z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(z, x, reduction="sum") / z.shape[0]


@dataclass
class Problem:
    name: str
    x: torch.Tensor
    y: torch.Tensor
    model: Callable[[], nn.Module]
    loss: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    batch: int
    kfac_g: dict = field(default_factory=dict)


def problems() -> dict[str, Problem]:
    from sklearn.datasets import load_digits

    xc = curves(2000)
    dig = load_digits()
    xd = torch.tensor(dig.images / 16.0, dtype=torch.float32)[:, None]
    yd = torch.tensor(dig.target, dtype=torch.long)
    return {
        "curves": Problem("curves", xc, xc, autoencoder, lambda z, x, y: sigmoid_ce(z, x), 100,
                          {"loss": "sigmoid_cross_entropy", "loss_reduction": "batch"}),
        "digits": Problem("digits", xd, yd, digits_cnn, lambda z, x, y: F.cross_entropy(z, y),
                          128, {"loss": "cross_entropy"}),
    }


# -- one run ---------------------------------------------------------------------------------------
def build(problem: Problem, preset: str, lr: float, model: nn.Module):
    over: dict = {"lr": lr, "weight_decay": WEIGHT_DECAY}
    if preset == "kfac":
        # on the CPU there is no device to synchronise with: retry the Cholesky only on failure
        over["preconditioner"] = {**problem.kfac_g, "inversion": "cholesky_lazy"}
    return kfqn.build_optimizer(model, preset, **over)


@torch.no_grad()
def full_loss(problem: Problem, model: nn.Module) -> float:
    total = 0.0
    for xb, yb in zip(problem.x.split(500), problem.y.split(500)):
        total += float(problem.loss(model(xb), xb, yb)) * xb.shape[0]
    return total / problem.x.shape[0]


def run(problem: Problem, preset: str, lr: float, seed: int, epochs: float, budget: float,
        evals_per_epoch: int = 4) -> list[tuple[float, float, float]]:
    """[(epoch, cpu_seconds, train_loss)] at evaluation points, until both ``epochs`` and
    ``budget`` are reached (or the loss diverges)."""
    torch.manual_seed(seed)
    model = problem.model()
    n = problem.x.shape[0]
    steps_per_epoch = math.ceil(n / problem.batch)
    every = max(1, steps_per_epoch // evals_per_epoch)
    cpu = 0.0
    t0 = time.process_time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = build(problem, preset, lr, model)
        if getattr(opt, "needs_warm_start", False):
            with opt.warm_start():
                for xb in problem.x.split(problem.batch):
                    model(xb)
    cpu += time.process_time() - t0
    history = [(0.0, cpu, full_loss(problem, model))]
    gen = torch.Generator().manual_seed(seed)
    step = 0
    while True:
        perm = torch.randperm(n, generator=gen)
        for i in range(steps_per_epoch):
            idx = perm[i * problem.batch:(i + 1) * problem.batch]
            xb, yb = problem.x[idx], problem.y[idx]

            def closure():
                opt.zero_grad()
                loss = problem.loss(model(xb), xb, yb)
                loss.backward()
                return loss

            t0 = time.process_time()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                opt.step(closure)
            cpu += time.process_time() - t0
            step += 1
            if step % every == 0 or i == steps_per_epoch - 1:
                loss = full_loss(problem, model)
                history.append((step / steps_per_epoch, cpu, loss))
                if not math.isfinite(loss) or loss > 1e6:
                    return history
                if step / steps_per_epoch >= epochs - 1e-9 and cpu >= budget:
                    return history


def at_epoch(hist, epochs: float) -> float:
    for e, _, loss in hist:
        if e >= epochs - 1e-9:
            return loss
    return math.inf


def at_time(hist, seconds: float) -> tuple[float, float]:
    """(loss, epochs) at the last evaluation point within ``seconds`` of CPU time."""
    best = (math.inf, 0.0)
    for e, t, loss in hist:
        if t <= seconds:
            best = (loss, e)
    return best


# -- the comparison ----------------------------------------------------------------------------
def fmt(values: list[float]) -> str:
    bad = sum(not math.isfinite(v) for v in values)
    if bad:
        return f"diverged ({bad}/{len(values)} seeds)"
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.4g} ± {sd:.2g}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=float, default=None,
                    help="epochs per run (default: 5 curves, 8 digits)")
    ap.add_argument("--budget", type=float, default=None,
                    help="CPU seconds per run (default: 2)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--problems", nargs="*", default=["curves", "digits"])
    ap.add_argument("--presets", nargs="*", default=QN + BASELINES)
    ap.add_argument("--quick", action="store_true", help="tiny smoke run")
    ap.add_argument("--json", type=Path, default=None, help="write every history here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    defaults = {"curves": (5.0, 2.0), "digits": (8.0, 2.0)}
    if args.quick:
        defaults = {k: (1.0, 0.0) for k in defaults}
        args.seeds = 1
    probs = problems()
    out: dict = {}
    lines = []
    started = time.process_time()
    for pname in args.problems:
        prob = probs[pname]
        epochs, budget = defaults[pname]
        epochs = args.epochs or epochs
        budget = args.budget if args.budget is not None else budget
        rows = []
        for preset in args.presets:
            base_lr = kfqn.build_optimizer(prob.model(), preset,
                                           **({"preconditioner": prob.kfac_g} if preset == "kfac" else {})
                                           ).param_groups[0]["lr"]
            tuning = {}
            for f in GRID:
                lr = base_lr * f
                hist = run(prob, preset, lr, 0, TUNE * epochs, 0.0)
                tuning[lr] = at_epoch(hist, TUNE * epochs)
            lr = min(tuning, key=lambda k: tuning[k] if math.isfinite(tuning[k]) else math.inf)
            hists = [run(prob, preset, lr, s, epochs, budget) for s in range(args.seeds)]
            ep_loss = [at_epoch(h, epochs) for h in hists]
            tm = [at_time(h, budget) for h in hists]
            sec_per_epoch = [h[-1][1] / max(h[-1][0], 1e-9) for h in hists]
            rows.append((preset, lr, fmt(ep_loss), fmt([t[0] for t in tm]),
                         statistics.fmean(t[1] for t in tm), statistics.fmean(sec_per_epoch)))
            out.setdefault(pname, {})[preset] = {"lr": lr, "tuning": tuning, "histories": hists}
            print(f"[{pname}] {preset}: lr {lr:.3g}  loss@{epochs:g}ep {rows[-1][2]}  "
                  f"loss@{budget:g}s {rows[-1][3]}", file=sys.stderr, flush=True)
        lines.append(f"\n**{pname}** — training loss after {epochs:g} epochs and after {budget:g} s "
                     f"of CPU time (mean ± sd over {args.seeds} seeds)\n")
        lines.append(f"| preset | lr (from grid) | loss @ {epochs:g} epochs | loss @ {budget:g} s CPU "
                     f"| epochs done @ {budget:g} s | CPU s / epoch |")
        lines.append("|---|---|---|---|---|---|")
        for preset, lr, e_loss, t_loss, ep_done, spe in rows:
            lines.append(f"| {preset} | {lr:.3g} | {e_loss} | {t_loss} | {ep_done:.2f} | {spe:.3f} |")
    print("\n".join(lines))
    print(f"\n(total CPU time of this comparison: {time.process_time() - started:.0f} s)")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
