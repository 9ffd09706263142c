"""Evaluation passes and the L2 term of the reported training loss."""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn
from torch.utils.data import TensorDataset

from kfqn.runner.data.base import DataSplits
from kfqn.runner.loader import eval_batches


@torch.no_grad()
def evaluate(model: nn.Module, component: Any, options: dict, splits: DataSplits,
             dataset: TensorDataset, batch_size: int,
             limit: Optional[int] = None) -> tuple[float, Optional[float]]:
    """Mean loss over ``dataset`` (first ``limit`` samples) and accuracy for classifiers.

    Runs in eval mode (BatchNorm uses running statistics) and restores the previous mode.
    """
    was_training = model.training
    model.eval()
    total, correct, n = 0.0, 0, 0
    classify = component.task == "classification"
    try:
        for xb, yb in eval_batches(dataset, batch_size, limit):
            x = splits.prepare(xb)
            out = model(x)
            total += float(component.loss(out, x, yb, **options)) * len(xb)
            if classify:
                correct += component.correct(out, yb)
            n += len(xb)
    finally:
        model.train(was_training)
    if n == 0:
        return float("nan"), None
    return total / n, (correct / n if classify else None)


def l2_coefficients(optimizer: torch.optim.Optimizer, spec: dict,
                    override: Optional[float]) -> list[float]:
    """tau of each param group for the reported L2 term (tau/2)||theta||^2.

    ``override`` (config ``eval.weight_decay``) wins; otherwise each group's
    ``weight_decay``, then the optimizer's ``defaults``, then the spec's ``weight_decay``.
    """
    if override is not None:
        return [float(override)] * len(optimizer.param_groups)
    fallback = getattr(optimizer, "defaults", {}).get("weight_decay", spec.get("weight_decay", 0.0))
    return [float(g.get("weight_decay", fallback) or 0.0) for g in optimizer.param_groups]


@torch.no_grad()
def l2_term(optimizer: torch.optim.Optimizer, taus: list[float]) -> float:
    """sum over param groups of (tau_g / 2) ||theta_g||^2."""
    total = 0.0
    for tau, group in zip(taus, optimizer.param_groups):
        if tau:
            total += 0.5 * tau * float(sum(p.detach().pow(2).sum() for p in group["params"]))
    return total
