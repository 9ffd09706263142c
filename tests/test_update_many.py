"""Batched updates of several layers at one call (``InverseFactor.update_many``,
``Damping.many``) equal the per-layer loop bit for bit, and dispatch fewer ops."""
from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from kfqn.updates.base import DampingResult, InverseFactor
from kfqn.updates.bfgs import BFGSFactor
from kfqn.updates.damping import DDV2Damping, DoubleDamping, NoDamping, PowellDamping
from kfqn.updates.lbfgs import LBFGSFactor
from strategies import adversarial_pair
from helpers import OpCount

F32, F64 = torch.float32, torch.float64
#: the layer sizes of the autoencoder (both sides of its eight layers)
AE_A = (785, 1001, 501, 251, 31, 251, 501, 1001)
AE_G = (1000, 500, 250, 30, 250, 500, 1000, 784)

_INT = {torch.float32: torch.int32, torch.float64: torch.int64, torch.bool: torch.uint8,
        torch.long: torch.long}


def same_bits(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    """Equal shape, dtype and bit pattern (so NaN == NaN, and -0.0 != 0.0)."""
    if a is None or b is None:
        return a is None and b is None
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return torch.equal(a.contiguous().view(_INT[a.dtype]), b.contiguous().view(_INT[b.dtype]))


def assert_same_bits(a, b, what: str) -> None:
    assert same_bits(a, b), f"{what} differs:\n{a}\n{b}"


def assert_same_state(f: InverseFactor, g: InverseFactor, what: str) -> None:
    sf, sg = f.state_dict(), g.state_dict()
    assert sf.keys() == sg.keys()
    for k in sf:
        if isinstance(sf[k], torch.Tensor):
            assert_same_bits(sf[k], sg[k], f"{what}: state {k}")
    if isinstance(f, LBFGSFactor):
        for k in ("_mid", "_dense"):
            assert_same_bits(getattr(f, k), getattr(g, k), f"{what}: {k}")


def assert_same_damping(r1: list[DampingResult], r2: list[DampingResult]) -> None:
    assert len(r1) == len(r2)
    for i, (a, b) in enumerate(zip(r1, r2)):
        assert_same_bits(a.s, b.s, f"layer {i}: s")
        assert_same_bits(a.y, b.y, f"layer {i}: y")
        assert_same_bits(a.ok, b.ok, f"layer {i}: ok")
        assert a.active.keys() == b.active.keys()
        for k in a.active:
            assert_same_bits(a.active[k], b.active[k], f"layer {i}: active {k}")




# -- strategies --------------------------------------------------------------------------------
SCALES = [1.0, 1e-3, 1e3, 1e-15, 1e15, 1e30, 1e-30]


@st.composite
def spd_h(draw, d: int, dtype: torch.dtype) -> torch.Tensor | None:
    """None (the identity), or a random SPD matrix at a random (possibly extreme) scale."""
    if draw(st.booleans()):
        return None
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    m = torch.randn(d, d, generator=g, dtype=F64)
    ev = torch.logspace(0, draw(st.sampled_from([0, 2, 6])), d, dtype=F64)
    q, _ = torch.linalg.qr(m)
    h = (q * ev) @ q.T * draw(st.sampled_from(SCALES))
    return h.to(dtype)


@st.composite
def pair(draw, d: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """An ordinary curvature pair, one with s^T y <= 0, a nearly orthogonal one (s^T y near
    the guards' thresholds), or an adversarial one (NaN, inf, huge, tiny, zero entries)."""
    kind = draw(st.sampled_from(["curvature", "curvature", "negative", "orthogonal",
                                 "adversarial"]))
    if kind == "adversarial":
        return draw(adversarial_pair(d, dtype))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    if kind == "orthogonal":
        s = torch.randn(d, generator=g, dtype=F64)
        z = torch.randn(d, generator=g, dtype=F64)
        z = z - (z @ s) / (s @ s) * s
        eps = draw(st.sampled_from([1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-8, 1e-12]))
        y = z + eps * z.norm() / s.norm() * s
        return s.to(dtype), (y * draw(st.sampled_from(SCALES))).to(dtype)
    s = torch.randn(d, generator=g, dtype=F64)
    b = torch.randn(d, d, generator=g, dtype=F64)
    y = (b @ b.T / d + 0.1 * torch.eye(d, dtype=F64)) @ s + draw(st.sampled_from(
        [0.0, 0.1, 1.0])) * torch.randn(d, generator=g, dtype=F64)
    if kind == "negative":
        y = -y
    a, c = draw(st.sampled_from(SCALES)), draw(st.sampled_from(SCALES))
    return (s * a).to(dtype), (y * c).to(dtype)


@st.composite
def allow_flag(draw) -> torch.Tensor | None:
    return draw(st.sampled_from([None, None, True, False]).map(
        lambda a: None if a is None else torch.tensor(a)))


@st.composite
def layers(draw, max_layers: int = 6, max_dim: int = 40):
    """(dims, dtypes): 1..max_layers layers of sizes 1..max_dim, all float32, all float64,
    or mixed."""
    n = draw(st.integers(1, max_layers))
    dims = draw(st.lists(st.integers(1, max_dim), min_size=n, max_size=n))
    mode = draw(st.sampled_from(["f32", "f64", "mixed"]))
    if mode == "mixed":
        dtypes = draw(st.lists(st.sampled_from([F32, F64]), min_size=n, max_size=n))
    else:
        dtypes = [F32 if mode == "f32" else F64] * n
    return dims, dtypes


def _factors(draw, cls, dims, dtypes, **opts):
    out = []
    for d, dt in zip(dims, dtypes):
        f = cls(d, dt, "cpu", **opts)
        if f.accepts_dense_init:
            h = draw(spd_h(d, dt))
            if h is not None:
                f.reset(h)
        out.append(f)
    return out


def _check_update_many(cls, factors, pairs_per_round, allows_per_round):
    twins = copy.deepcopy(factors)
    for rnd, (pairs, allows) in enumerate(zip(pairs_per_round, allows_per_round)):
        s = [p[0] for p in pairs]
        y = [p[1] for p in pairs]
        loop = [f.update(si, yi, a) for f, si, yi, a in zip(factors, s, y, allows)]
        many = cls.update_many(twins, s, y, allows)
        assert len(many) == len(loop)
        for i, (a, b) in enumerate(zip(loop, many)):
            assert_same_bits(a, b, f"round {rnd}, layer {i}: accepted")
            assert_same_state(factors[i], twins[i], f"round {rnd}, layer {i}")


# -- BFGS ----------------------------------------------------------------------------------------
@given(st.data())
def test_bfgs_update_many_is_the_loop_bitwise(data):
    dims, dtypes = data.draw(layers())
    factors = _factors(data.draw, BFGSFactor, dims, dtypes)
    rounds = data.draw(st.integers(1, 3))
    pairs = [[data.draw(pair(d, dt)) for d, dt in zip(dims, dtypes)] for _ in range(rounds)]
    allows = [[data.draw(allow_flag()) for _ in dims] for _ in range(rounds)]
    _check_update_many(BFGSFactor, factors, pairs, allows)


def test_bfgs_update_many_many_ordinary_steps():
    """A long run of ordinary pairs on the autoencoder's small layers: states stay equal."""
    g = torch.Generator().manual_seed(1)
    dims = [31, 30, 7, 64, 1, 30]
    for dt in (F32, F64):
        factors = [BFGSFactor(d, dt, "cpu") for d in dims]
        twins = copy.deepcopy(factors)
        for step in range(40):
            s = [torch.randn(d, generator=g, dtype=dt) * 10.0 ** (step % 5 - 2) for d in dims]
            y = [si * torch.rand(d, generator=g, dtype=dt) + 0.1 * torch.randn(d, generator=g, dtype=dt)
                 for si, d in zip(s, dims)]
            loop = [f.update(si, yi) for f, si, yi in zip(factors, s, y)]
            many = BFGSFactor.update_many(twins, s, y, [None] * len(dims))
            for i in range(len(dims)):
                assert_same_bits(loop[i], many[i], f"step {step} layer {i}")
                assert_same_bits(factors[i].h, twins[i].h, f"step {step} layer {i}")


def test_bfgs_update_many_same_factor_twice_and_subclass():
    """A factor listed twice is updated twice in turn (the loop); a subclass with its own
    update goes through that update."""
    class Counting(BFGSFactor):
        calls = 0

        def update(self, s, y, allow=None):
            Counting.calls += 1
            return super().update(s, y, allow)

    g = torch.Generator().manual_seed(2)
    f = BFGSFactor(5, F64, "cpu")
    twin = copy.deepcopy(f)
    s = [torch.randn(5, generator=g, dtype=F64) for _ in range(2)]
    y = [si + 0.1 * torch.randn(5, generator=g, dtype=F64) for si in s]
    loop = [f.update(s[0], y[0]), f.update(s[1], y[1])]
    many = BFGSFactor.update_many([twin, twin], s, y, [None, None])
    assert all(same_bits(a, b) for a, b in zip(loop, many))
    assert_same_bits(f.h, twin.h, "H")
    mixed = [Counting(5, F64, "cpu"), BFGSFactor(5, F64, "cpu"), BFGSFactor(5, F64, "cpu")]
    BFGSFactor.update_many(mixed, s + s[:1], y + y[:1], [None] * 3)
    assert Counting.calls == 1


# -- damping -----------------------------------------------------------------------------------
RULES = [NoDamping(), PowellDamping(), PowellDamping(mu1=0.5), DoubleDamping(),
         DoubleDamping(mu1=0.05), DDV2Damping()]
MU2 = [1e-4, 0.01, 0.3, 1.0, 1.5, 0.0, 1e-30]


def _hy_fns(draw, dims, dtypes):
    fns = []
    for d, dt in zip(dims, dtypes):
        h = draw(spd_h(d, dt))
        fns.append((lambda v: v.clone()) if h is None else (lambda v, h=h: h @ v))
    return fns


@pytest.mark.parametrize("rule", RULES, ids=lambda r: f"{r.name}{r.opts or ''}")
@given(data=st.data())
def test_damping_many_is_the_loop_bitwise(rule, data):
    dims, dtypes = data.draw(layers())
    hy = _hy_fns(data.draw, dims, dtypes)
    pairs = [data.draw(pair(d, dt)) for d, dt in zip(dims, dtypes)]
    s, y = [p[0] for p in pairs], [p[1] for p in pairs]
    mu2 = [data.draw(st.sampled_from(MU2)) for _ in dims]
    assert_same_damping([rule(si, yi, hi, mi) for si, yi, hi, mi in zip(s, y, hy, mu2)],
                        rule.many(s, y, hy, mu2))


@given(st.data())
def test_kbfgs_configuration_bitwise(data):
    """K-BFGS: G side DD damping then BFGS (H of the G factor gives H y), A side BFGS without
    damping; several steps, the batched path against the loop."""
    n = data.draw(st.integers(1, 6))
    dims_a = data.draw(st.lists(st.integers(1, 40), min_size=n, max_size=n))
    dims_g = data.draw(st.lists(st.integers(1, 40), min_size=n, max_size=n))
    dt = data.draw(st.sampled_from([F32, F64]))
    a_side = _factors(data.draw, BFGSFactor, dims_a, [dt] * n)
    g_side = _factors(data.draw, BFGSFactor, dims_g, [dt] * n)
    a_twin, g_twin = copy.deepcopy(a_side), copy.deepcopy(g_side)
    dd = DoubleDamping()
    for step in range(data.draw(st.integers(1, 3))):
        mu2 = [data.draw(st.sampled_from(MU2[:4])) for _ in range(n)]
        pg = [data.draw(pair(d, dt)) for d in dims_g]
        pa = [data.draw(pair(d, dt)) for d in dims_a]
        allow = [data.draw(allow_flag()) for _ in range(n)]
        # the loop
        damped = [dd(s, y, f.apply, m) for (s, y), f, m in zip(pg, g_side, mu2)]
        ok_g = [f.update(r.s, r.y, a) for f, r, a in zip(g_side, damped, allow)]
        ok_a = [f.update(s, y, a) for f, (s, y), a in zip(a_side, pa, allow)]
        # the batched path
        damped2 = dd.many([p[0] for p in pg], [p[1] for p in pg], [f.apply for f in g_twin], mu2)
        ok_g2 = BFGSFactor.update_many(g_twin, [r.s for r in damped2], [r.y for r in damped2],
                                       allow)
        ok_a2 = BFGSFactor.update_many(a_twin, [p[0] for p in pa], [p[1] for p in pa], allow)
        assert_same_damping(damped, damped2)
        for i in range(n):
            assert_same_bits(ok_g[i], ok_g2[i], f"step {step} G layer {i}")
            assert_same_bits(ok_a[i], ok_a2[i], f"step {step} A layer {i}")
            assert_same_state(g_side[i], g_twin[i], f"step {step} G layer {i}")
            assert_same_state(a_side[i], a_twin[i], f"step {step} A layer {i}")


# -- op counts ---------------------------------------------------------------------------------
def _ae_inputs(dims, dt=F32, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = [torch.randn(d, generator=g, dtype=dt) for d in dims]
    y = [si + 0.3 * torch.randn(d, generator=g, dtype=dt) for si, d in zip(s, dims)]
    return s, y


def _count(fn) -> int:
    fn()  # caches (constants, index layouts) filled outside the count
    with OpCount() as c:
        fn()
    return c.n


@pytest.mark.parametrize("dims", [AE_A, AE_G], ids=["A", "G"])
def test_bfgs_update_many_dispatches_fewer_ops(dims):
    s, y = _ae_inputs(dims)
    factors = [BFGSFactor(d, F32, "cpu") for d in dims]
    allow = [torch.tensor(True)] * len(dims)
    loop = _count(lambda: [f.update(si, yi, a) for f, si, yi, a in zip(factors, s, y, allow)])
    many = _count(lambda: BFGSFactor.update_many(factors, s, y, allow))
    assert many < 0.6 * loop, (many, loop)


@pytest.mark.parametrize("rule", [PowellDamping(), DoubleDamping(), DDV2Damping()],
                         ids=lambda r: r.name)
def test_damping_many_dispatches_fewer_ops(rule):
    s, y = _ae_inputs(AE_G)
    factors = [BFGSFactor(d, F32, "cpu") for d in AE_G]
    hy = [f.apply for f in factors]
    mu2 = [0.01] * len(AE_G)
    loop = _count(lambda: [rule(si, yi, hi, mi) for si, yi, hi, mi in zip(s, y, hy, mu2)])
    many = _count(lambda: rule.many(s, y, hy, mu2))
    assert many < 0.6 * loop, (many, loop)


# -- L-BFGS --------------------------------------------------------------------------------------
#: dense_factor values: the default (H dense where d <= 4 p), H never dense, H always dense
LBFGS_DENSE = [None, 0, 10**9]


def _strided(v: torch.Tensor, strided: bool) -> torch.Tensor:
    """``v`` itself, or the same values as a non-contiguous view (every other entry of a
    tensor twice as long)."""
    if not strided:
        return v
    w = torch.empty(2 * v.numel(), dtype=v.dtype)
    w[::2] = v
    w[1::2] = float("nan")
    return w[::2]


@st.composite
def lbfgs_factors(draw, dims, dtypes, memory: int, gamma: str) -> list[LBFGSFactor]:
    """L-BFGS factors, each with its own product form (dense, compact or by size)."""
    return [LBFGSFactor(d, dt, "cpu", memory=memory, gamma=gamma,
                        dense_factor=draw(st.sampled_from(LBFGS_DENSE)))
            for d, dt in zip(dims, dtypes)]


@given(st.data())
def test_lbfgs_update_many_is_the_loop_bitwise(data):
    """Random layers, memories (wrapping around once full), gamma modes, product forms,
    pairs (ordinary, s^T y <= 0, nearly orthogonal, NaN / inf, huge / tiny), allow flags and
    input layouts: every returned flag and state tensor equal to the loop's bit for bit."""
    dims, dtypes = data.draw(layers())
    memory = data.draw(st.integers(1, 5))
    gamma = data.draw(st.sampled_from(["one", "scaled"]))
    factors = data.draw(lbfgs_factors(dims, dtypes, memory, gamma))
    rounds = data.draw(st.integers(1, 2 * memory + 2))
    pairs, allows = [], []
    for _ in range(rounds):
        row = []
        for d, dt in zip(dims, dtypes):
            s, y = data.draw(pair(d, dt))
            strided = data.draw(st.booleans())
            row.append((_strided(s, strided), _strided(y, strided)))
        pairs.append(row)
        allows.append([data.draw(allow_flag()) for _ in dims])
    _check_update_many(LBFGSFactor, factors, pairs, allows)


@pytest.mark.parametrize("gamma", ["one", "scaled"])
@pytest.mark.parametrize("dense_factor", LBFGS_DENSE)
def test_lbfgs_update_many_many_ordinary_steps(gamma, dense_factor):
    """Long runs of ordinary pairs (the memory full and wrapping around many times, some
    pairs disallowed): states stay equal."""
    g = torch.Generator().manual_seed(3)
    dims = [31, 30, 7, 64, 1, 30, 12]
    for dt in (F32, F64):
        for memory in (1, 3, 8):
            factors = [LBFGSFactor(d, dt, "cpu", memory=memory, gamma=gamma,
                                   dense_factor=dense_factor) for d in dims]
            twins = copy.deepcopy(factors)
            for step in range(3 * memory + 4):
                s = [torch.randn(d, generator=g, dtype=dt) * 10.0 ** (step % 5 - 2) for d in dims]
                y = [si * torch.rand(d, generator=g, dtype=dt)
                     + 0.1 * torch.randn(d, generator=g, dtype=dt) for si, d in zip(s, dims)]
                allow = [None if (i + step) % 4 else torch.tensor(step % 3 != 1)
                         for i in range(len(dims))]
                loop = [f.update(si, yi, a) for f, si, yi, a in zip(factors, s, y, allow)]
                many = LBFGSFactor.update_many(twins, s, y, allow)
                for i in range(len(dims)):
                    what = f"{dt} memory {memory} step {step} layer {i}"
                    assert_same_bits(loop[i], many[i], what)
                    assert_same_state(factors[i], twins[i], what)
            assert all(bool(f.valid.all()) for f in factors if f.dim > 1), "memory never full"


def test_lbfgs_update_many_same_factor_twice_subclass_and_other_options():
    """A factor listed twice is updated twice in turn; a subclass with its own update goes
    through it; factors of other options (memory, gamma) are batched in their own groups."""
    class Counting(LBFGSFactor):
        calls = 0

        def update(self, s, y, allow=None):
            Counting.calls += 1
            return super().update(s, y, allow)

    g = torch.Generator().manual_seed(4)
    s = [torch.randn(6, generator=g, dtype=F64) for _ in range(5)]
    y = [si + 0.1 * torch.randn(6, generator=g, dtype=F64) for si in s]
    f = LBFGSFactor(6, F64, "cpu", memory=2)
    twin = copy.deepcopy(f)
    loop = [f.update(s[0], y[0]), f.update(s[1], y[1])]
    many = LBFGSFactor.update_many([twin, twin], s[:2], y[:2], [None, None])
    assert all(same_bits(a, b) for a, b in zip(loop, many))
    assert_same_state(f, twin, "twice")
    mixed = [Counting(6, F64, "cpu", memory=2), LBFGSFactor(6, F64, "cpu", memory=2),
             LBFGSFactor(6, F64, "cpu", memory=3), LBFGSFactor(6, F64, "cpu", memory=2,
                                                               gamma="scaled"),
             LBFGSFactor(6, F64, "cpu", memory=3)]
    twins = copy.deepcopy(mixed)
    Counting.calls = 0
    loop = [f.update(si, yi) for f, si, yi in zip(mixed, s, y)]
    many = LBFGSFactor.update_many(twins, s, y, [None] * 5)
    assert Counting.calls == 2
    for i in range(5):
        assert_same_bits(loop[i], many[i], f"layer {i}")
        assert_same_state(mixed[i], twins[i], f"layer {i}")


def test_lbfgs_update_many_dispatches_fewer_ops():
    """kfbfgs_l_cnn's G side: memory 100 on the autoencoder's eight layers (H dense on the
    layers with d <= 400, the compact form on the others), a few pairs in the memory."""
    factors = [LBFGSFactor(d, F32, "cpu", memory=100, gamma="one") for d in AE_G]
    for seed in range(3):
        s, y = _ae_inputs(AE_G, seed=seed)
        LBFGSFactor.update_many(factors, s, y, [None] * len(AE_G))
    assert all(bool(f.valid[-3:].all()) for f in factors)
    s, y = _ae_inputs(AE_G, seed=9)
    allow = [torch.tensor(True)] * len(AE_G)
    twins = copy.deepcopy(factors)
    loop = _count(lambda: [f.update(si, yi, a) for f, si, yi, a in zip(factors, s, y, allow)])
    many = _count(lambda: LBFGSFactor.update_many(twins, s, y, allow))
    assert many < 0.6 * loop, (many, loop)
    for i, (f, t) in enumerate(zip(factors, twins)):   # both updated twice by _count
        assert_same_state(f, t, f"layer {i}")
