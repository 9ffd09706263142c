"""K-FAC (docs/algorithms.md §4) against exact oracles: for one datum A ⊗ G is the exact Fisher / GGN block
(torch.func), for Linear and for Conv2d where the KFC assumptions hold exactly; deep linear
networks with squared error; the Conv2d A factor against explicit unfold sums; the sampled-label
machinery; cadences; warm start; pi-split damping; preconditioning off = SGD; resume."""
from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import hessian

import kfqn
from kfqn.core.errors import ConfigError, KfqnError
from kfqn.curvature.counter_rng import CounterRNG
from kfqn.curvature.output_losses import OutputLoss
from exact_curvature import ggn_block, gradient_outer, loss_jacobian
from helpers import batches, make_closure, quiet, small_cnn, teacher_data

F64 = torch.float64


def kfac(model: nn.Module, loss: OutputLoss, fisher: str = "exact", **kw):
    """A kfac optimizer in float64 with lr 0 (factors at the initial point), no warm start."""
    section = {"fisher": fisher, "loss": loss.kind, "loss_reduction": loss.reduction,
               "mse_scale": loss.mse_scale, "warm_start": False,
               **kw.pop("preconditioner", {})}
    spec = {"preset": "kfac", "lr": 0.0, "weight_decay": 0.0, "factor_dtype": "float64",
            "preconditioner": section, **kw}
    return kfqn.build_optimizer(model, spec)


def one_step(model: nn.Module, x, y, loss: OutputLoss, fisher: str = "exact", **kw):
    opt = kfac(model, loss, fisher, **kw)

    def closure():
        opt.zero_grad()
        out = loss.value(model(x), y)
        out.backward()
        return out

    opt.step(closure)
    opt.remove_hooks()  # the oracles below call the model again
    return opt


def kron_of(opt, name: str) -> torch.Tensor:
    f = opt.factors()[name]
    return torch.kron(f["G"], f["A"])


def mlp(d_out: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, d_out)).double()


def targets(kind: str, z_shape, gen=None):
    gen = gen or torch.Generator().manual_seed(3)
    if kind == "cross_entropy":
        return torch.randint(0, z_shape[1], (z_shape[0], *z_shape[2:]), generator=gen)
    if kind == "sigmoid_cross_entropy":
        return torch.rand(z_shape, generator=gen, dtype=F64)
    return torch.randn(z_shape, generator=gen, dtype=F64)


LOSSES = [OutputLoss("cross_entropy"), OutputLoss("sigmoid_cross_entropy"),
          OutputLoss("mse", mse_scale=0.5), OutputLoss("mse", "mean", mse_scale=1.0),
          OutputLoss("sigmoid_cross_entropy", "mean")]


# -- one datum, Linear: A ⊗ G is the exact block --------------------------------------------
@pytest.mark.parametrize("loss", LOSSES, ids=lambda l: f"{l.kind}-{l.reduction}")
@pytest.mark.parametrize("layer", ["0", "2"])
def test_linear_one_datum_exact_fisher_is_ggn_block(loss, layer):
    model = mlp()
    x = torch.randn(1, 4, dtype=F64)
    y = targets(loss.kind, (1, 3))
    opt = one_step(model, x, y, loss, "exact")
    ref = ggn_block(model, layer, x, lambda z: loss.value(z, y))
    torch.testing.assert_close(kron_of(opt, layer), ref, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("loss", LOSSES[:3], ids=lambda l: l.kind)
def test_linear_one_datum_empirical_fisher_is_gradient_outer_product(loss):
    model = mlp()
    x = torch.randn(1, 4, dtype=F64)
    y = targets(loss.kind, (1, 3))
    opt = one_step(model, x, y, loss, "empirical")
    assert opt._output_hook is None  # the empirical Fisher needs no auxiliary backward
    for layer in ("0", "2"):
        ref = gradient_outer(model, layer, x, lambda z: loss.value(z, y))
        torch.testing.assert_close(kron_of(opt, layer), ref, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("loss", LOSSES[:3], ids=lambda l: l.kind)
def test_sampled_fisher_is_outer_product_at_the_sampled_label(loss):
    """With the sampler's seed known, the one-datum sampled-label block is (J^T v)(J^T v)^T for
    v = grad_z l(z, yhat) -- the same labels the optimizer drew."""
    model = mlp()
    x = torch.randn(1, 4, dtype=F64)
    y = targets(loss.kind, (1, 3))
    opt = one_step(model, x, y, loss, "sampled", preconditioner={"seed": 11})
    for layer in ("0", "2"):
        jac, z0 = loss_jacobian(model, layer, x, lambda z: loss.value(z, y))
        v = loss.sampled_cotangent(z0, CounterRNG(11, torch.zeros((), dtype=torch.long)))
        v = v[0].reshape(-1)
        g = jac.T @ v
        torch.testing.assert_close(kron_of(opt, layer), torch.outer(g, g), rtol=1e-9, atol=1e-12)


# -- output-space oracles for the loss machinery ---------------------------------------------
@settings(max_examples=25, deadline=None)
@given(kind=st.sampled_from(["cross_entropy", "sigmoid_cross_entropy", "mse"]),
       reduction=st.sampled_from(["batch", "mean"]), m=st.integers(1, 3), k=st.integers(2, 4),
       positions=st.sampled_from([(), (2,), (2, 1)]), c=st.floats(0.1, 2.0),
       seed=st.integers(0, 2**16))
def test_hessian_sqrt_reproduces_the_output_hessian(kind, reduction, m, k, positions, c, seed):
    loss = OutputLoss(kind, reduction, c)
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(m, k, *positions, generator=gen, dtype=F64)
    y = targets(kind, z.shape, gen)
    q = loss.hessian_sqrt(z).reshape(-1, m, z[0].numel())
    gram = torch.einsum("rip,riq->ipq", q, q)               # per-sample sum_r q q^T
    hess = hessian(lambda t: loss.value(t, y))(z).reshape(m, z[0].numel(), m, z[0].numel())
    per_sample = torch.stack([hess[i, :, i, :] for i in range(m)]) * m   # Hess of l_i
    torch.testing.assert_close(gram, per_sample, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("counter", [False, True], ids=["torch_generator", "counter_rng"])
@pytest.mark.parametrize("kind", ["cross_entropy", "sigmoid_cross_entropy", "mse"])
def test_sampled_cotangents_average_to_the_output_fisher(kind, counter):
    loss = OutputLoss(kind, "batch", 0.5)
    z = torch.tensor([[0.3, -1.0, 0.8]], dtype=F64)
    n = 40000
    gen = (CounterRNG(5, torch.tensor(3)) if counter else torch.Generator().manual_seed(0))
    v = loss.sampled_cotangent(z, gen, samples=n).reshape(n, -1)
    mc = v.T @ v                          # the cotangents carry 1/sqrt(n): this is the mean
    q = loss.hessian_sqrt(z).reshape(-1, 3)
    torch.testing.assert_close(mc, q.T @ q, rtol=0, atol=0.04)  # > 5 standard errors


# -- deep linear network, squared error: K-FAC blocks are the exact GGN blocks -----------------
def test_deep_linear_network_blocks_match_exact_ggn():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 3), nn.Linear(3, 2, bias=False)).double()
    x = torch.randn(6, 4, dtype=F64)
    loss = OutputLoss("mse", "batch", 0.5)
    y = torch.randn(6, 2, dtype=F64)
    opt = one_step(model, x, y, loss, "exact")
    for layer in ("0", "1", "2"):
        ref = ggn_block(model, layer, x, lambda z: loss.value(z, y))
        torch.testing.assert_close(kron_of(opt, layer), ref, rtol=1e-9, atol=1e-12)


# -- Conv2d --------------------------------------------------------------------------------------
@pytest.mark.parametrize("conv", [
    nn.Conv2d(2, 3, 3, stride=2, padding=1),
    nn.Conv2d(2, 3, (2, 3), dilation=(2, 1), padding=(1, 0), bias=False),
    nn.Conv2d(2, 3, 3, padding="same"),
])
def test_conv_a_factor_is_the_sum_over_unfold_patches(conv):
    torch.manual_seed(0)
    conv = conv.double()
    x = torch.randn(5, 2, 6, 7, dtype=F64)
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.Linear(conv(x)[0].numel(), 4)).double()
    y = torch.randint(0, 4, (5,))
    opt = one_step(model, x, y, OutputLoss("cross_entropy"), "sampled")
    pad = conv._reversed_padding_repeated_twice if conv.padding == "same" else (0,)
    xp = F.pad(x, pad) if conv.padding == "same" else x
    cols = F.unfold(xp, conv.kernel_size, dilation=conv.dilation,
                    padding=0 if conv.padding == "same" else conv.padding, stride=conv.stride)
    if conv.bias is not None:
        cols = torch.cat([cols, torch.ones(5, 1, cols.shape[2], dtype=F64)], 1)
    ref = torch.einsum("iat,ibt->ab", cols, cols) / 5
    torch.testing.assert_close(opt.factors()["0"]["A"], ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("fisher", ["exact", "empirical"])
def test_conv_single_position_one_datum_is_exact(fisher):
    """A kernel covering the whole input leaves one position: A ⊗ G is exact for one datum."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(3, 4)).double()
    x = torch.randn(1, 2, 3, 3, dtype=F64)
    y = torch.tensor([2])
    loss = OutputLoss("cross_entropy")
    opt = one_step(model, x, y, loss, fisher)
    oracle = ggn_block if fisher == "exact" else gradient_outer
    ref = oracle(model, "0", x, lambda z: loss.value(z, y))
    torch.testing.assert_close(kron_of(opt, "0"), ref, rtol=1e-9, atol=1e-12)


def test_conv_1x1_output_layer_with_squared_error_is_exact_over_positions():
    """A 1x1 conv producing the output of a per-position squared error: Hess_z is the same at
    every position and positions do not interact, so sum_t a a^T ⊗ mean_t G is exact."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 2, 1)).double()
    x = torch.randn(1, 3, 3, 4, dtype=F64)
    y = torch.randn(1, 2, 3, 4, dtype=F64)
    loss = OutputLoss("mse", "batch", 0.5)
    opt = one_step(model, x, y, loss, "exact")
    ref = ggn_block(model, "0", x, lambda z: loss.value(z, y))
    torch.testing.assert_close(kron_of(opt, "0"), ref, rtol=1e-9, atol=1e-12)


# -- cadences, warm start, damping --------------------------------------------------------------
def _train(opt, model, steps, data=None, size=16):
    x, y = data or teacher_data(64)
    it = batches(x, y, size)
    for _ in range(steps):
        quiet(opt.step, make_closure(opt, model, *next(it)))


def test_statistics_and_inverse_cadences_follow_the_config():
    model = small_cnn()
    opt = kfqn.build_optimizer(model, "kfac", preconditioner={
        "warm_start": False, "stats_every": 3, "inverse_every": 4, "inverse_warmup": 2})
    owner = opt._sampling_layers[0].precond.g
    sampled_at: list[int] = []
    original = owner.output_cotangents

    def counting(z):
        sampled_at.append(opt._step_count)
        return original(z)

    owner.output_cotangents = counting
    layer = opt.layers["0"]
    stats_at, inverse_at = [], []
    for k in range(10):
        pre = layer.precond
        before = (int(pre.a.stat_updates), int(pre.g.stat_updates), pre.a.inversions,
                  pre.g.inversions)
        _train(opt, model, 1)
        after = (int(pre.a.stat_updates), int(pre.g.stat_updates), pre.a.inversions,
                 pre.g.inversions)
        if after[0] > before[0]:
            assert after[1] > before[1]
            stats_at.append(k)
        if after[2] > before[2]:
            assert after[3] > before[3]
            inverse_at.append(k)
    assert stats_at == [0, 3, 6, 9]
    assert sampled_at == [0, 3, 6, 9]  # the sampled-label backward runs only when needed
    assert inverse_at == [0, 1, 4, 8]


def test_warm_start_sets_a_and_iteration_zero_keeps_it():
    model = small_cnn()
    x, y = teacher_data(64)
    opt = kfqn.build_optimizer(model, "kfac", factor_dtype="float64")
    assert opt.needs_warm_start
    with opt.warm_start():
        for i in range(0, 64, 16):
            model(x[i:i + 16])
    layer = opt.layers["3"]
    parts = []  # BatchNorm in train mode normalises per batch: the inputs the warm pass saw
    with torch.no_grad():
        for i in range(0, 64, 16):
            h = model[2](model[1](model[0](x[i:i + 16])))
            parts.append(layer.adapter.input_covariance(h).double() * 16)
    warm = sum(parts) / 64
    torch.testing.assert_close(layer.precond.a.mat, warm)
    _train(opt, model, 1, (x, y))
    torch.testing.assert_close(layer.precond.a.mat, warm)            # iteration 0: kept as it is
    _train(opt, model, 1, (x, y))
    assert not torch.allclose(layer.precond.a.mat, warm)             # iteration 1: EMA update


@pytest.mark.parametrize("split", ["sqrt", "pi"])
def test_damping_split(split):
    model = mlp()
    x = torch.randn(8, 4, dtype=F64)
    y = torch.randint(0, 3, (8,))
    lam = 0.7
    opt = one_step(model, x, y, OutputLoss("cross_entropy"), "sampled", damping=lam,
                   preconditioner={"damping_split": split, "damping_split": split})
    for name, layer in opt.layers.items():
        st_ = opt.stats()[name]
        ga, gg = st_["a_damping"], st_["g_damping"]
        assert math.isclose(ga * gg, lam, rel_tol=1e-9)
        f = opt.factors()[name]
        pi2 = (torch.trace(f["A"]) / f["A"].shape[0]) / (torch.trace(f["G"]) / f["G"].shape[0])
        expected = float(pi2) if split == "pi" else 1.0
        assert math.isclose(ga / gg, expected, rel_tol=1e-9)
        d = torch.eye(f["A"].shape[0], dtype=F64)
        torch.testing.assert_close(f["H_a"], torch.linalg.inv(f["A"] + ga * d))


def test_preconditioning_off_equals_momentum_sgd():
    x, y = teacher_data(64)
    m1, m2 = small_cnn(), small_cnn()
    opt = kfqn.build_optimizer(m1, "kfac", lr=0.05, weight_decay=1e-3, momentum_init="first",
                               preconditioner={"precondition": False, "warm_start": False,
                               "precondition": False})
    ref = torch.optim.SGD(m2.parameters(), lr=0.05, momentum=0.9, dampening=0.9,  # EMA form
                          weight_decay=1e-3)
    for xb, yb in zip(*(t.split(16) for t in (x, y))):
        opt.step(make_closure(opt, m1, xb, yb))
        make_closure(ref, m2, xb, yb)()
        ref.step()
        for p, q in zip(m1.parameters(), m2.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


# -- the sampled-label backward leaves the user's gradients alone ----------------------------
def test_sampled_backward_does_not_change_gradients_or_rng():
    x, y = teacher_data(32)
    m1, m2 = small_cnn(), small_cnn()
    opt = kfqn.build_optimizer(m1, "kfac", lr=0.0, preconditioner={"warm_start": False})
    torch.manual_seed(5)
    opt.step(make_closure(opt, m1, x, y))
    after_opt = torch.rand(1)
    torch.manual_seed(5)
    m2.zero_grad()
    F.cross_entropy(m2(x), y).backward()
    after_ref = torch.rand(1)
    assert torch.equal(after_opt, after_ref)  # labels come from the estimator's own generator
    for p, q in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p.grad, q.grad)
    cap_g = opt.layers["3"].precond.g  # true-label quantities were not overwritten by the sampled pass
    assert cap_g.stat_updates == 1


def test_step_without_closure_matches_step_with_closure():
    x, y = teacher_data(48)
    m1, m2 = small_cnn(), small_cnn()
    o1 = kfqn.build_optimizer(m1, "kfac", preconditioner={"warm_start": False, "seed": 3})
    o2 = kfqn.build_optimizer(m2, "kfac", preconditioner={"warm_start": False, "seed": 3})
    for xb, yb in zip(x.split(16), y.split(16)):
        o1.step(make_closure(o1, m1, xb, yb))
        o2.zero_grad()
        F.cross_entropy(m2(xb), yb).backward()
        o2.step()
    for p, q in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(p, q)


# -- errors ---------------------------------------------------------------------------------------
def test_unsupported_loss_is_a_config_error():
    with pytest.raises(ConfigError, match=r"preconditioner.loss = 'nll'.*cross_entropy.*mse"):
        kfqn.build_optimizer(mlp(), "kfac", preconditioner={"loss": "nll"})


def test_wrong_output_shape_or_type_is_explained():
    model = nn.Sequential(nn.Linear(4, 1)).double()
    opt = kfqn.build_optimizer(model, "kfac", preconditioner={"warm_start": False})
    x = torch.randn(3, 4, dtype=F64)
    with pytest.raises(KfqnError, match="sigmoid_cross_entropy"):
        opt.step(lambda: model(x).sum())

    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x):
            return self.lin(x), None

    pair = Pair().double()
    opt = kfqn.build_optimizer(pair, "kfac", preconditioner={"warm_start": False})
    def closure():
        opt.zero_grad()
        loss = pair(x)[0].sum()
        loss.backward()
        return loss

    with pytest.raises(KfqnError, match="fisher=empirical"):
        opt.step(closure)


# -- checkpoints ------------------------------------------------------------------------------------
def _snapshot(model, opt):
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


@pytest.mark.parametrize("preset,kw", [
    ("kfac", {"preconditioner": {"inverse_every": 3, "inverse_warmup": 2,
              "inverse_every": 3, "inverse_warmup": 2, "stats_every": 2}}),
    ("kfac", {"preconditioner": {"damping_split": "pi", "inverse_every": 4,
              "damping_split": "pi", "fisher": "empirical", "inverse_every": 4}}),
])
def test_resume_equals_uninterrupted_run(preset, kw):
    data = teacher_data(64)

    def fresh():
        model = small_cnn()
        opt = kfqn.build_optimizer(model, preset, lr=0.2, **kw)
        with opt.warm_start():
            for i in range(0, 64, 16):
                model(data[0][i:i + 16])
        return model, opt

    def run(model, opt, start, count):
        x, y = data
        for i in range(start, start + count):
            s = (i * 16) % 64
            quiet(opt.step, make_closure(opt, model, x[s:s + 16], y[s:s + 16]))

    m1, o1 = fresh()
    run(m1, o1, 0, 9)
    m2, o2 = fresh()
    run(m2, o2, 0, 4)
    snap = _snapshot(m2, o2)
    m3 = small_cnn(seed=7)
    m3.load_state_dict(snap["model"])
    o3 = kfqn.build_optimizer(m3, preset, lr=0.2, **kw)
    o3.load_state_dict(snap["opt"])
    assert not o3.needs_warm_start
    run(m3, o3, 4, 5)
    for p, q in zip(m1.parameters(), m3.parameters()):
        assert torch.equal(p, q)
    f1, f3 = o1.factors(), o3.factors()
    for name in f1:
        for key in f1[name]:
            assert torch.equal(f1[name][key], f3[name][key]), (name, key)
