"""Adversarial (s, y) pairs through every factor update rule and damping (issue 10).

Each run is a sequence of pairs fed to one factor -- dense BFGS, L-BFGS in its dense-H form
(d <= 4p) and in its compact form -- through one damping (none, powell, dd, ddv2, with the
factor's own H y), in float32 and float64. The pairs are drawn from adversarial families: zeros,
1e-30, 1e30, s^T y < 0, collinear (y = c s, c of either sign), NaN / inf entries, denormals,
mixed scales within a vector, plus ordinary pairs so that the factors have something to lose.
BFGS runs start from I or from an SPD H0 at a scale of 1e-20..1e20 (1e-12..1e12 in float32)
with a condition number the dtype can hold (up to 1 / (1000 eps)). mu2 (the damping's second constant) is drawn from {0, 1e-4, 0.3, 1, 2}.

After every update it checks: no exception, the damped pair finite, H (dense) finite, and
lambda_min(H) >= -1e-6 lambda_max(H) (float64 eigenvalues of the stored H). It prints one row
per (rule, damping, dtype) and a total; the exit status is 1 if any check failed.

    .venv/bin/python benchmarks/adversarial_pairs.py                  # >= 30,000 pairs, ~2 min
    .venv/bin/python benchmarks/adversarial_pairs.py --pairs 3000     # quick

``tests/test_adversarial_stress.py`` runs :func:`run` on a smaller budget.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass, field

import torch

from kfqn.updates.bfgs import BFGSFactor
from kfqn.updates.damping import DDV2Damping, DoubleDamping, NoDamping, PowellDamping
from kfqn.updates.lbfgs import LBFGSFactor

REL_EIG = 1e-6
ILL_START = 0.5
DTYPES = {"float32": torch.float32, "float64": torch.float64}
DAMPINGS = {"none": NoDamping(), "powell": PowellDamping(mu1=0.2), "dd": DoubleDamping(mu1=0.2),
            "ddv2": DDV2Damping(mu1=0.2)}
RULES = ("bfgs", "lbfgs_dense", "lbfgs_compact")
MU2 = (0.0, 1e-4, 0.3, 1.0, 2.0)
KINDS = ("normal", "zeros", "tiny", "huge", "negative_curvature", "collinear", "nonfinite",
         "denormal", "mixed_scales")


def make_factor(rule: str, dim: int, dtype: torch.dtype, g: torch.Generator):
    if rule == "bfgs":
        f = BFGSFactor(dim, dtype, "cpu")
        if torch.rand((), generator=g) < ILL_START:       # ill-scaled SPD start
            # an SPD H0 the dtype can hold (condition <= 1 / (1000 eps)), at a scale 1e-20..1e20
            # (1e-12..1e12 in float32)
            top = 20.0 if dtype == torch.float64 else 12.0
            cond = math.log10(1.0 / (1000 * torch.finfo(dtype).eps))
            q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
            scale = 10.0 ** (float(torch.rand((), generator=g)) * 2 * top - top)
            ev = scale * 10.0 ** (torch.rand(dim, generator=g, dtype=torch.float64) * cond)
            f.reset(((q * ev) @ q.T).to(dtype))
        return f
    memory = int(torch.randint(1, 6, (), generator=g))
    form = {"lbfgs_dense": 10**9, "lbfgs_compact": 0}[rule]
    gamma = "scaled" if torch.rand((), generator=g) < 0.3 else "one"
    return LBFGSFactor(dim, dtype, "cpu", memory=memory, gamma=gamma, dense_factor=form)


def adversarial_pair(kind: str, dim: int, dtype: torch.dtype, g: torch.Generator
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    f64 = torch.float64
    rn = lambda: torch.randn(dim, generator=g, dtype=f64)  # noqa: E731
    fi = torch.finfo(dtype)
    if kind == "normal":
        s = rn()
        b = torch.rand(dim, generator=g, dtype=f64) * 3 + 0.1
        s, y = s, b * s + 0.3 * rn()
    elif kind == "zeros":
        choice = int(torch.randint(0, 3, (), generator=g))
        s, y = rn(), rn()
        if choice in (0, 2):
            s = torch.zeros(dim, dtype=f64)
        if choice in (1, 2):
            y = torch.zeros(dim, dtype=f64)
    elif kind == "tiny":
        s, y = rn() * 1e-30, rn() * 1e-30
        if torch.rand((), generator=g) < 0.5:
            y = s * 1e-30 * float(torch.rand((), generator=g) + 0.1) / 1e-30
    elif kind == "huge":
        scale = 1e30 if dtype == torch.float64 else float(10 ** (30 + 8 * torch.rand((), generator=g)))
        s = rn() * scale
        y = s * float(torch.rand((), generator=g) + 0.5) if torch.rand((), generator=g) < 0.5 else rn() * scale
    elif kind == "negative_curvature":
        s = rn()
        y = -s * float(torch.rand((), generator=g) * 10) + 0.1 * rn()
    elif kind == "collinear":
        s = rn() * float(10 ** (torch.randint(-10, 11, (), generator=g)))
        c = float(torch.randn((), generator=g)) * float(10 ** (torch.randint(-8, 9, (), generator=g)))
        y = c * s
        if torch.rand((), generator=g) < 0.2:
            y = s.clone()                                   # y == s exactly (mu2 = 2: no theta2)
    elif kind == "nonfinite":
        s, y = rn(), rn()
        bad = [float("nan"), float("inf"), -float("inf")][int(torch.randint(0, 3, (), generator=g))]
        (s if torch.rand((), generator=g) < 0.5 else y)[int(torch.randint(0, dim, (), generator=g))] = bad
    elif kind == "denormal":
        tiny = fi.tiny * 1e-3
        s, y = rn() * tiny, rn() * tiny
        if torch.rand((), generator=g) < 0.5:
            y = s * 0.5                                     # collinear denormals
    elif kind == "mixed_scales":
        top = 30 if dtype == torch.float64 else 18
        sc_s = 10.0 ** torch.randint(-top, top + 1, (dim,), generator=g).to(f64)
        sc_y = 10.0 ** torch.randint(-top, top + 1, (dim,), generator=g).to(f64)
        s, y = rn() * sc_s, rn() * sc_y
        if torch.rand((), generator=g) < 0.5:
            y = s * sc_y                                    # y = D s, D > 0 of mixed scales
    else:
        raise ValueError(kind)
    return s.to(dtype), y.to(dtype)


@dataclass
class Row:
    pairs: int = 0
    accepted: int = 0
    damping_rejected: int = 0
    raises: int = 0
    nonfinite_pairs: int = 0
    nonfinite_factors: int = 0
    pd_violations: int = 0
    worst_ratio: float = math.inf          # min over updates of lambda_min / lambda_max
    examples: list = field(default_factory=list)

    def add(self, other: "Row") -> None:
        for k in ("pairs", "accepted", "damping_rejected", "raises", "nonfinite_pairs",
                  "nonfinite_factors", "pd_violations"):
            setattr(self, k, getattr(self, k) + getattr(other, k))
        self.worst_ratio = min(self.worst_ratio, other.worst_ratio)
        self.examples += other.examples[: max(0, 5 - len(self.examples))]

    @property
    def failures(self) -> int:
        return self.raises + self.nonfinite_pairs + self.nonfinite_factors + self.pd_violations


def run_sequence(rule: str, damping: str, dtype: torch.dtype, n: int, g: torch.Generator,
                 row: Row) -> None:
    """One factor, ``n`` pairs through ``damping``; tallies into ``row``."""
    dim = int(torch.randint(1, 9, (), generator=g))
    rule_damp = DAMPINGS[damping]
    f = make_factor(rule, dim, dtype, g)
    for _ in range(n):
        kind = KINDS[int(torch.randint(0, len(KINDS), (), generator=g))]
        mu2 = MU2[int(torch.randint(0, len(MU2), (), generator=g))]
        s, y = adversarial_pair(kind, dim, dtype, g)
        row.pairs += 1
        try:
            out = rule_damp(s, y, f.apply, mu2)
            if out.ok is not None and not bool(out.ok):
                row.damping_rejected += 1
            finite_in = bool(torch.isfinite(s).all() and torch.isfinite(y).all())
            if finite_in and not bool(torch.isfinite(out.s).all() and torch.isfinite(out.y).all()):
                row.nonfinite_pairs += 1
                row.examples.append(("nonfinite pair", kind, mu2, s.tolist(), y.tolist()))
            accepted = f.update(out.s, out.y)
            row.accepted += int(bool(accepted))
            h = f.dense().double()
        except Exception as exc:  # noqa: BLE001 - counted, that is the point
            row.raises += 1
            row.examples.append(("raise", kind, mu2, repr(exc)[:200]))
            continue
        if not bool(torch.isfinite(h).all()):
            row.nonfinite_factors += 1
            row.examples.append(("nonfinite H", kind, mu2, s.tolist(), y.tolist()))
            f = make_factor(rule, dim, dtype, g)          # go on from a fresh factor
            continue
        e = torch.linalg.eigvalsh(0.5 * (h + h.T))
        ratio = float(e[0] / e[-1]) if float(e[-1]) > 0 else -math.inf
        row.worst_ratio = min(row.worst_ratio, ratio)
        if ratio < -REL_EIG:
            row.pd_violations += 1
            row.examples.append(("lost PD", kind, mu2, ratio, s.tolist(), y.tolist()))


def run(n_pairs: int = 30_000, seed: int = 0, seq_len: int = 25) -> dict[tuple, Row]:
    """At least ``n_pairs`` pairs spread evenly over (rule, damping, dtype)."""
    g = torch.Generator().manual_seed(seed)
    combos = [(r, d, t) for r in RULES for d in DAMPINGS for t in DTYPES]
    per = math.ceil(n_pairs / len(combos))
    rows: dict[tuple, Row] = {}
    for combo in combos:
        row = rows.setdefault(combo, Row())
        while row.pairs < per:
            run_sequence(combo[0], combo[1], DTYPES[combo[2]], min(seq_len, per - row.pairs),
                         g, row)
    return rows


def table(rows: dict[tuple, Row]) -> str:
    head = ("| rule | damping | dtype | pairs | accepted | damping rejected | raises | "
            "non-finite pairs | non-finite H | lost PD | worst lmin/lmax |")
    lines = [head, "|" + "---|" * 11]
    total = Row()
    for (rule, damp, dt), r in rows.items():
        total.add(r)
        lines.append(f"| {rule} | {damp} | {dt} | {r.pairs} | {r.accepted} | "
                     f"{r.damping_rejected} | {r.raises} | {r.nonfinite_pairs} | "
                     f"{r.nonfinite_factors} | {r.pd_violations} | {r.worst_ratio:.2e} |")
    lines.append(f"| **total** | | | {total.pairs} | {total.accepted} | "
                 f"{total.damping_rejected} | {total.raises} | {total.nonfinite_pairs} | "
                 f"{total.nonfinite_factors} | {total.pd_violations} | "
                 f"{total.worst_ratio:.2e} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=30_000, help="total pairs (default 30000)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    rows = run(args.pairs, args.seed)
    print(table(rows))
    fails = [ex for r in rows.values() for ex in r.examples]
    total = sum(r.failures for r in rows.values())
    print(f"\n{sum(r.pairs for r in rows.values())} pairs, {total} failures "
          f"(raises + non-finite pairs + non-finite H + lost PD beyond {REL_EIG:g}), "
          f"{time.perf_counter() - t0:.0f} s")
    for ex in fails[:10]:
        print("  e.g.", ex)
    return 1 if total else 0


if __name__ == "__main__":
    sys.exit(main())
