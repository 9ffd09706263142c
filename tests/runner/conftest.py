"""Fixtures of the experiment-runner tests: tiny configs and a plain-torch optimizer adapter."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import torch

from kfqn.runner import config as C


class SgdAdapter(torch.optim.SGD):
    """torch.optim.SGD with the optional kfqn optimizer attributes the runner logs.

    Deterministic, so runs with it are reproducible step for step (resume tests).
    """

    def __init__(self, model: torch.nn.Module, spec: dict[str, Any]) -> None:
        super().__init__(model.parameters(), lr=spec.get("lr", 0.05),
                         momentum=spec.get("momentum", 0.9),
                         weight_decay=spec.get("weight_decay", 1e-3))
        self.last_phase_times: dict[str, float] = {}
        self.needs_warm_start = bool(spec.get("warm", False))
        self.warm_calls = 0

    def step(self, closure=None):  # noqa: D102
        t0 = time.perf_counter()
        loss = super().step(closure)
        self.last_phase_times = {"total": time.perf_counter() - t0}
        return loss

    def stats(self) -> dict[str, dict[str, float]]:
        with torch.no_grad():
            sq = sum(float(p.norm() ** 2) for g in self.param_groups for p in g["params"])
        return {"all": {"param_norm": sq ** 0.5}}

    def warm_start(self):
        import contextlib

        self.warm_calls += 1
        self.needs_warm_start = False
        return contextlib.nullcontext()


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: tiny models gain nothing from more, and runs stay comparable."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def sgd(monkeypatch):
    """Make the runner build :class:`SgdAdapter` instead of a kfqn optimizer."""
    built: list[SgdAdapter] = []

    def factory(model, spec):
        opt = SgdAdapter(model, spec)
        built.append(opt)
        return opt

    monkeypatch.setattr("kfqn.runner.trainer.build_optimizer", factory)
    # the spec is SgdAdapter's, not a kfqn optimizer spec: preflight takes it as it is
    monkeypatch.setattr("kfqn.runner.preflight._resolve_optimizer", lambda spec: dict(spec))
    return built


def tiny_config(tmp_path: Path, **sections: Any) -> dict[str, Any]:
    """A seconds-long experiment: a small autoencoder on the embedded 8x8 digits."""
    cfg: dict[str, Any] = {
        "name": "tiny",
        "data": {"name": "digits", "root": str(tmp_path / "data"), "batch_size": 128,
                 "eval_batch_size": 2000},
        "model": {"name": "mlp_autoencoder", "options": {"hidden": [16], "code": 4}},
        "optimizer": {"preset": "kbfgs", "lr": 0.05},
        "budget": {"epochs": 2},
        "logging": {"root": str(tmp_path / "runs"), "every_steps": 2, "stats_every_steps": 3,
                    "progress": False},
    }
    for key, value in sections.items():
        cfg.setdefault(key, {})
        if isinstance(value, dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    return cfg


@pytest.fixture
def tiny(tmp_path):
    """``tiny(**sections) -> resolved run config`` for a tiny experiment under tmp_path."""

    def make(overrides=(), **sections):
        base = C.base_config(tiny_config(tmp_path, **sections), C.parse_overrides(overrides))
        return C.compose_run(base, C.parse_overrides(overrides))

    return make
