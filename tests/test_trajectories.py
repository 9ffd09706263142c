"""Every preset's 20-step trajectory against recordings (tests/trajectories.py; float64, CPU).

* Before the preconditioner redesign (BatchNorm model): bit for bit, except where the
  arithmetic was changed on purpose (``CHANGED``, with the reason); those agree bit for bit at
  the first step.
* Before the layers' vectors were joined for the op budget (model without BatchNorm, 75c2893):
  every preset within 1e-12 of the parameters' scale over all 20 steps.
* The batched code as recorded (BatchNorm model): bit for bit, the guard of later changes."""
import pytest
import torch

from helpers import all_presets
from trajectories import RECORD, RECORD_NOW, RECORD_PLAIN, STEPS, trajectory

RECORDED = torch.load(RECORD) if RECORD.exists() else {}
RECORDED_PLAIN = torch.load(RECORD_PLAIN) if RECORD_PLAIN.exists() else {}
RECORDED_NOW = torch.load(RECORD_NOW) if RECORD_NOW.exists() else {}
#: presets that cannot be bit-equal to the recording before the redesign, with the bound and
#: the reason: the rmsprop fallback ran torch's private fused AdamW kernel, which rounds with
#: fused multiply-adds; the public torch._foreach_* operations that replaced it round once more
#: (step 1: one entry of 353 off by one unit in the last place; 6.2e-12 after 20 steps)
TOLERANCE = {"rmsprop": 1e-10}
#: presets whose arithmetic changed for the op budget (issue 11): the layers' dot products are
#: one segmented sum in float64 instead of a BLAS dot per layer (secant pairs, damping, BFGS
#: guards), the EMA of A adds abar^T abar by addmm_ with the bias row inside the product (was
#: add_ of a product and a separate sum), L-BFGS products go through its cached middle matrix
#: M, BFGS's rank-2 update reads its operands in another layout. Each rounds differently
#: in the last bits. On this model the first convolution feeds BatchNorm, which normalises its
#: mean output away: its G-side pairs are rounding noise (s^T y about 1e-27), so a last-bit
#: difference flips its pair tests and the runs part from step 2-3 (up to 6e-3 after 20 steps).
#: Without BatchNorm (RECORD_PLAIN) every preset stays within 1e-13 for all 20 steps.
CHANGED = {"kbfgs", "kbfgs_l", "kfbfgs_cnn", "kfbfgs_l_cnn", "kfbfgs_ll_cnn"}
QUASI_NEWTON = sorted(CHANGED)


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.view(torch.int64), b.view(torch.int64))


@pytest.mark.parametrize("preset", sorted(RECORDED))
def test_trajectory_unchanged(preset):
    got = trajectory(preset)
    assert len(got) == STEPS
    if preset in CHANGED:  # the first step has no pair yet: still bit for bit
        assert _bits_equal(got[0], RECORDED[preset][0]), f"{preset}: step 1 differs"
        return
    tol = TOLERANCE.get(preset)
    for step, (a, b) in enumerate(zip(got, RECORDED[preset])):
        err = float((a - b).abs().max())
        if tol is None:
            assert _bits_equal(a, b), f"{preset}: step {step + 1} differs by {err:.3e}"
        else:
            assert err <= tol, f"{preset}: step {step + 1} differs by {err:.3e} > {tol}"


@pytest.mark.parametrize("preset", sorted(RECORDED_PLAIN))
def test_plain_trajectory_within_rounding(preset):
    got = trajectory(preset, plain=True)
    for step, (a, b) in enumerate(zip(got, RECORDED_PLAIN[preset])):
        err = float((a - b).abs().max() / b.abs().max())
        assert err <= 1e-12, f"{preset}: step {step + 1} differs by {err:.3e} (relative)"


@pytest.mark.parametrize("preset", sorted(RECORDED_NOW))
def test_trajectory_as_recorded_now(preset):
    got = trajectory(preset)
    for step, (a, b) in enumerate(zip(got, RECORDED_NOW[preset])):
        assert _bits_equal(a, b), \
            f"{preset}: step {step + 1} differs by {float((a - b).abs().max()):.3e}"


def test_every_preset_was_recorded():
    missing = sorted(set(all_presets()) - set(RECORDED))
    # presets added after the recording are checked by their own tests
    assert not missing or all(p not in ("kbfgs", "kbfgs_l", "kfbfgs_cnn", "kfbfgs_l_cnn",
                                        "kfbfgs_ll_cnn", "kfac", "shampoo", "sgd_m", "adam",
                                        "rmsprop") for p in missing), missing
    assert set(all_presets()) <= set(RECORDED_NOW) and set(all_presets()) <= set(RECORDED_PLAIN)
    assert set(QUASI_NEWTON) <= set(RECORDED)
