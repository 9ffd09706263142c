"""Step time of the first-order fallbacks against torch.optim on the same parameters.

One process, one model of ``--params`` parameters of mixed sizes (log-uniform between 10 and
``--largest`` elements, fixed seed), every parameter in the fallback (the presets ``sgd_m``,
``adam`` and ``rmsprop`` have no preconditioned layer). Each round gives every optimizer the
same fixed gradients and times one ``fallback.step(ok)`` (the kfqn optimizer's own share of a
step) and one ``torch.optim`` ``step()`` in a rotating order; the figure is the median over
rounds of the paired ratio fallback / torch.optim, which cancels drifts of a shared machine.

    python benchmarks/fallback_speed.py [--params 50] [--rounds 200] [--device cpu]

prints one row per fallback: its median step time, the reference's, and the median ratio.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings

import torch
from torch import nn

import kfqn

#: fallback preset -> the torch.optim reference with the same rule (fused where torch has it)
REFERENCES = {
    "adam": lambda ps, fused: torch.optim.Adam(ps, lr=1e-3, betas=(0.9, 0.9), eps=1e-8,
                                               weight_decay=1e-5, fused=fused),
    "sgd_m": lambda ps, fused: torch.optim.SGD(ps, lr=0.1, momentum=0.9, dampening=0.9,
                                               weight_decay=1e-5, fused=fused),
    "rmsprop": lambda ps, fused: torch.optim.RMSprop(ps, lr=1e-3, alpha=0.9, eps=1e-8,
                                                     momentum=0.9, weight_decay=1e-5,
                                                     foreach=True),
}


def model(n: int, largest: int, device: str) -> nn.Module:
    g = torch.Generator().manual_seed(0)
    sizes = torch.logspace(1, torch.log10(torch.tensor(float(largest))), n)
    sizes = sizes[torch.randperm(n, generator=g)].round().long().tolist()
    return nn.ParameterList(
        [nn.Parameter(torch.randn(s, generator=g) * 0.1) for s in sizes]).to(device)


def set_grads(params, grads) -> None:
    for p, g in zip(params, grads):
        p.grad = g.clone()


def measure(preset: str, n: int, largest: int, rounds: int, device: str) -> dict:
    m_kfqn, m_ref = model(n, largest, device), model(n, largest, device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = kfqn.build_optimizer(m_kfqn, preset)
    fused = preset != "rmsprop"
    ref = REFERENCES[preset](list(m_ref.parameters()), fused)
    g = torch.Generator().manual_seed(1)
    grads = [torch.randn(p.shape, generator=g).to(device) * 0.01 for p in m_ref.parameters()]
    set_grads(m_kfqn.parameters(), grads)
    set_grads(m_ref.parameters(), grads)
    ok = torch.ones((), dtype=torch.bool, device=device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def time_one(step) -> float:
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        return time.perf_counter() - t0

    steps = {"fallback": lambda: opt.fallback.step(ok), "torch": ref.step}
    for _ in range(5):  # warm-up
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {k: [] for k in steps}
    order = list(steps)
    for r in range(rounds):
        for k in (order if r % 2 == 0 else order[::-1]):
            times[k].append(time_one(steps[k]))
    ratios = [a / b for a, b in zip(times["fallback"], times["torch"])]
    return {"fallback_ms": 1e3 * statistics.median(times["fallback"]),
            "torch_ms": 1e3 * statistics.median(times["torch"]),
            "ratio": statistics.median(ratios)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=int, default=50)
    ap.add_argument("--largest", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--presets", default="adam,sgd_m,rmsprop")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.device}, {args.params} parameters "
          f"(10 .. {args.largest} elements), {args.rounds} rounds, {args.threads} thread(s)")
    print("| fallback | reference | fallback ms | reference ms | median ratio |")
    print("|---|---|---|---|---|")
    for preset in args.presets.split(","):
        r = measure(preset, args.params, args.largest, args.rounds, args.device)
        name = {"adam": "Adam(fused)", "sgd_m": "SGD(fused)",
                "rmsprop": "RMSprop(foreach)"}[preset]
        print(f"| {preset} | torch.optim.{name} | {r['fallback_ms']:.3f} | "
              f"{r['torch_ms']:.3f} | {r['ratio']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
