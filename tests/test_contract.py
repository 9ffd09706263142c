"""One contract suite run over every registered component (the example DFP plugin included),
in the spirit of optax's shared optimizer tests: whatever a plugin registers must pass it.

Update rules, dampings, inversions and layer adapters go through the public suite of
:mod:`kfqn.testing` (the one a plugin author runs on their own component); estimators,
fallbacks and presets are built into a real optimizer below."""
from __future__ import annotations

import io
import warnings

import pytest
import torch

import dfp_update
import kfqn
from kfqn.core.registry import Registry
from kfqn.testing import contract_for
from helpers import batches, make_closure, small_cnn, teacher_data

REG = Registry()
REG.register(dfp_update)


def names(kind: str) -> list[str]:
    return REG.names(kind)


# -- update rules, dampings, inversions, layer adapters: kfqn.testing's contract suite ---------
#: components whose own test file runs the suite (as a plugin author would)
OWN_TEST_FILE = {("factor_update", "sr1"): "tests/test_sr1.py",
                 ("factor_update", "dfp"): "tests/test_testing_plugin.py"}
#: constructor options and contract settings per component
SETTINGS = {
    # H = I always: reset(H0) takes H0 and ignores it
    ("factor_update", "identity"): {"contract_attrs": {"takes_dense_init": False}},
    # a memory shorter than the hypothesis sequences, so that pairs drop out of it
    ("factor_update", "lbfgs"): {"memory": 3},
}
#: further configurations: (test name, kind, component, settings)
VARIANTS = [
    ("lbfgs_compact", "factor_update", "lbfgs", {"memory": 3, "dense_factor": 0}),
]
#: hypothesis examples per contract test here (the public default is 20; the built-ins have
#: their own property tests besides)
EXAMPLES = 10


def _contract(kind: str, name: str, settings: dict):
    settings = dict(settings)
    attrs = {"max_examples": EXAMPLES, **settings.pop("contract_attrs", {})}
    return contract_for(REG.get(kind, name), contract_attrs=attrs, **settings)


for _kind in ("factor_update", "damping", "inversion", "layer_adapter"):
    for _name in names(_kind):
        if (_kind, _name) not in OWN_TEST_FILE:
            globals()[f"test_{_kind}_{_name}"] = _contract(_kind, _name,
                                                           SETTINGS.get((_kind, _name), {}))
for _test, _kind, _name, _settings in VARIANTS:
    globals()[f"test_{_kind}_{_test}"] = _contract(_kind, _name, _settings)


class test_inversion_cholesky_never(  # noqa: N801  (collected through __test__)
        _contract("inversion", "cholesky",
                  {"host_reads": "never", "contract_attrs": {"sync_free": True}})):
    """The sync-free configuration: invert() must not read back to the host."""

    # found by this contract (fixed in kfqn.inversion.base.guard): invert([[-finfo.max]], 1e-8)
    # returned [[0.]] -- the Gershgorin shift plus its margin overflowed, the Cholesky inverse of
    # inf is 0, finite, and was kept; guard() now also requires a positive diagonal
    def test_negative_huge_input_gives_a_positive_definite_inverse(self, kfqn_device, kfqn_dtype):
        from kfqn.inversion.cholesky import CholeskyInversion

        a = torch.full((1, 1), -torch.finfo(kfqn_dtype).max, dtype=kfqn_dtype,
                       device=kfqn_device)
        inv = CholeskyInversion(host_reads="never").invert(a, 1e-8).inverse
        assert torch.isfinite(inv).all() and float(inv[0, 0]) > 0


# -- estimators, fallbacks, presets: built into a real optimizer -------------------------------
def _fit(spec, steps=4, model=None, **kw):
    model = model or small_cnn()
    x, y = teacher_data(128)
    opt = kfqn.build_optimizer(model, spec, registry=REG, **kw)
    it = batches(x, y, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if opt.needs_warm_start:
            with opt.warm_start():
                for i in range(0, 128, 32):
                    model(x[i:i + 32])
        losses = [float(opt.step(make_closure(opt, model, *next(it))).detach()) for _ in range(steps)]
    return model, opt, losses


def _resume_matches(spec, **kw):
    model, opt, _ = _fit(spec, steps=3, **kw)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    clone = small_cnn()
    clone.load_state_dict(model.state_dict())
    opt2 = kfqn.build_optimizer(clone, spec, registry=REG, **kw)
    opt2.load_state_dict(torch.load(buf, weights_only=False))
    x, y = teacher_data(32, seed=7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt.step(make_closure(opt, model, x, y))
        opt2.step(make_closure(opt2, clone, x, y))
    for p, q in zip(model.parameters(), clone.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("name", names("a_estimator"))
def test_a_estimator_contract(name):
    spec = {"preset": "kfbfgs_cnn", "a_side": name}
    model, opt, losses = _fit(spec)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    for f in opt.factors().values():
        if "H_a" in f:
            torch.testing.assert_close(f["H_a"], f["H_a"].T, rtol=1e-5, atol=1e-6)
    _resume_matches(spec)


@pytest.mark.parametrize("name", names("g_estimator"))
def test_g_estimator_contract(name):
    spec = {"preset": "kfbfgs_cnn", "g_side": name}
    model, opt, losses = _fit(spec)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    _resume_matches(spec)


@pytest.mark.parametrize("name", names("fallback"))
def test_fallback_contract(name):
    model = small_cnn()
    bn = model[1].weight.detach().clone()
    model, opt, _ = _fit({"preset": "kfbfgs_cnn", "fallback": name}, model=model)
    assert "1.weight" in opt.fallback_params
    assert not torch.equal(model[1].weight, bn) and torch.isfinite(model[1].weight).all()


@pytest.mark.parametrize("name", names("preset"))
def test_preset_contract(name):
    model, opt, losses = _fit(name, steps=30)
    assert all(l == l for l in losses), losses
    assert sum(losses[-5:]) / 5 < losses[0], losses
    assert opt.stats()["_global"]["nonfinite_steps"] == 0
