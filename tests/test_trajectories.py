"""Every preset's 20-step trajectory equals the one recorded before the preconditioner
redesign, bit for bit (tests/trajectories.py; float64, CPU)."""
import pytest
import torch

from helpers import all_presets
from trajectories import RECORD, STEPS, trajectory

RECORDED = torch.load(RECORD) if RECORD.exists() else {}


@pytest.mark.parametrize("preset", sorted(RECORDED))
def test_trajectory_unchanged(preset):
    got = trajectory(preset)
    assert len(got) == STEPS
    for step, (a, b) in enumerate(zip(got, RECORDED[preset])):
        assert torch.equal(a, b), (
            f"{preset}: step {step + 1} differs by {float((a - b).abs().max()):.3e}")


def test_every_preset_was_recorded():
    missing = sorted(set(all_presets()) - set(RECORDED))
    # presets added after the recording are checked by their own tests
    assert not missing or all(p not in ("kbfgs", "kbfgs_l", "kfbfgs_cnn", "kfbfgs_l_cnn",
                                        "kfbfgs_ll_cnn", "kfac", "shampoo", "sgd_m", "adam",
                                        "rmsprop") for p in missing), missing
