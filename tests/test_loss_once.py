"""The training loss given once: ``build_optimizer(..., loss=...)`` sets the Fisher's loss and
``opt.closure`` computes the same loss; a config naming another loss is an error."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kfqn
from helpers import quiet
from kfqn.core.errors import ConfigError, KfqnError


def autoencoder():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 6)).double()


def data():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(32, 6, generator=g, dtype=torch.float64)
    return x, (x > 0.5).double()


def test_the_loss_object_sets_the_fisher_and_computes_the_closure_loss():
    x, t = data()
    loss = kfqn.OutputLoss("sigmoid_cross_entropy")
    m1, m2 = autoencoder(), autoencoder()
    o1 = quiet(kfqn.build_optimizer, m1, "kfac", loss=loss, factor_dtype="float64")
    assert o1.config["preconditioner"]["loss"] == "sigmoid_cross_entropy"
    # the same optimizer configured by hand, with its own closure
    o2 = quiet(kfqn.build_optimizer, m2, "kfac", factor_dtype="float64",
               preconditioner={"loss": "sigmoid_cross_entropy", "loss_reduction": "batch"})
    want = F.binary_cross_entropy_with_logits(m1(x), t, reduction="sum") / 32
    torch.testing.assert_close(o1.closure(x, t)(), want)

    def closure2():
        o2.zero_grad()
        value = F.binary_cross_entropy_with_logits(m2(x), t, reduction="sum") / 32
        value.backward()
        return value
    for _ in range(4):
        o1.step(o1.closure(x, t))
        o2.step(closure2)
    for p, q in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("spec", ["mse", {"kind": "mse", "mse_scale": 1.0},
                                  kfqn.OutputLoss("cross_entropy", "mean")])
def test_a_loss_spec_in_any_form(spec):
    opt = quiet(kfqn.build_optimizer, autoencoder(), "kfac", loss=spec)
    got = opt.config["preconditioner"]
    want = kfqn.OutputLoss.of(spec)
    assert (got["loss"], got["loss_reduction"], got["mse_scale"]) == (
        want.kind, want.reduction, want.mse_scale)


def test_a_config_naming_another_loss_is_one_line_error():
    with pytest.raises(ConfigError) as e:
        kfqn.build_optimizer(autoencoder(), "kfac", loss="mse",
                             preconditioner={"loss": "cross_entropy"})
    assert "\n" not in str(e.value) and "give the loss once" in str(e.value)
    with pytest.raises(KfqnError, match="kind must be one of"):
        kfqn.build_optimizer(autoencoder(), "kfac", loss="hinge")


def test_methods_without_a_loss_option_still_use_it_in_the_closure():
    x, t = data()
    opt = quiet(kfqn.build_optimizer, autoencoder(), "kbfgs", loss="sigmoid_cross_entropy")
    assert "loss" not in opt.config["g_side"]
    before = float(opt.closure(x, t)().detach())
    for _ in range(5):
        opt.step(opt.closure(x, t))
    assert float(opt.closure(x, t)().detach()) < before
    with pytest.raises(KfqnError, match="needs the training loss"):
        quiet(kfqn.build_optimizer, autoencoder(), "kbfgs").closure(x, t)
