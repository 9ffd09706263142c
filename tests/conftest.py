"""Shared fixtures: devices (CPU always, CUDA when present), hypothesis profile, small models."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

settings.register_profile("ci", deadline=None, max_examples=40,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", deadline=None, max_examples=15,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    return torch.device(request.param)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield



@pytest.fixture(params=["compact", "dense"])
def lbfgs_form(request, monkeypatch) -> str:
    """Whole-optimizer tests: L-BFGS factors keep H dense between updates, or never do."""
    from kfqn.updates.lbfgs import LBFGSFactor
    from strategies import LBFGS_FORMS
    monkeypatch.setattr(LBFGSFactor, "dense_factor", LBFGS_FORMS[request.param]["dense_factor"])
    return request.param
