"""The component contract suite: test classes a plugin author points at their own component.

Each contract is a pytest test class. Subclass it and name the component::

    from kfqn.testing import FactorUpdateContract

    class TestMyRule(FactorUpdateContract):
        component = MyRule
        options = {"memory": 10}          # constructor options (default: the Option defaults)

or let a function make the class (pytest collects it under any name)::

    from kfqn.testing import factor_update_contract
    test_my_rule = factor_update_contract(MyRule, memory=10)

Every test is parametrised over the devices (cpu, and cuda when ``torch.cuda.is_available()``;
``--kfqn-devices`` or the class attribute ``devices`` restrict them) and over float32 and
float64, with the tolerances of :data:`TOLERANCES` (class attribute ``tolerances``). Tests
that draw input use hypothesis (``max_examples`` per test, class attribute). A contract that
does not apply to the component (the secant equation for a rule with ``satisfies_secant =
False``) is skipped with the reason.

What each contract checks is in its class docstring; the properties are those the optimizer
relies on (docs/algorithms.md §3 and the docstrings of :mod:`kfqn.updates.base`,
:mod:`kfqn.inversion.base` and :mod:`kfqn.layers.base`).
"""
from __future__ import annotations

from kfqn.testing import _deps  # noqa: F401  (a one-line ImportError without the test extra)

import io
import math
from dataclasses import dataclass, replace
from typing import Any, Callable, ClassVar, Mapping, Sequence

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor

from kfqn.core.components import Option, registered_kind
from kfqn.testing import strategies as kst
from kfqn.testing.sync import no_host_sync

F64 = torch.float64
DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float64)


@dataclass(frozen=True)
class Tolerance:
    """Tolerances of one dtype.

    ``rtol``/``atol``: two computations of the same quantity agree (``dense()`` and
    ``apply(I)``, an adapter's statistics and the explicit patches; ``atol`` is relative to the
    largest entry of the reference). ``secant``: ||H y - s|| <= secant (||s|| + ||H||_F ||y||).
    ``symmetry``: ||H - H^T||_F <= symmetry ||H||_F. ``pd``: lambda_min >= -pd lambda_max
    (positive definite up to rounding). ``inversion``: ||X - X_ref||_F <= inversion
    cond(F + lam I) ||X_ref||_F against the float64 reference."""

    rtol: float
    atol: float
    secant: float
    symmetry: float
    pd: float
    inversion: float


TOLERANCES: dict[torch.dtype, Tolerance] = {
    torch.float32: Tolerance(rtol=1e-4, atol=1e-5, secant=1e-3, symmetry=1e-5, pd=1e-6,
                             inversion=1e-4),
    torch.float64: Tolerance(rtol=1e-9, atol=1e-11, secant=1e-8, symmetry=1e-12, pd=1e-9,
                             inversion=1e-12),
}


def available_devices() -> list[str]:
    """``cpu``, and ``cuda`` when ``torch.cuda.is_available()``."""
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def selected_devices(config: Any = None, wanted: Sequence[str] | None = None) -> list[str]:
    """The available devices, restricted to ``wanted`` and to pytest's ``--kfqn-devices``."""
    devices = available_devices()
    option = config.getoption("kfqn_devices", None) if config is not None else None
    if option:
        keep = [d.strip() for d in option.split(",") if d.strip()]
        devices = [d for d in devices if d in keep]
    if wanted is not None:
        devices = [d for d in devices if d in wanted]
    return devices


def dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# -- helpers ----------------------------------------------------------------------------------
def _bits(t: Tensor) -> Tensor:
    """The raw bits of ``t`` (floating point: an integer view), for bit-for-bit comparison."""
    t = t.detach().contiguous()
    if t.is_floating_point() or t.is_complex():
        ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
        return t.view(ints[t.element_size()])
    return t


def _same_bits(a: Any, b: Any) -> bool:
    """``a`` and ``b`` (tensors, or dicts/lists/tuples of them) are bit for bit equal."""
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return (isinstance(a, Tensor) and isinstance(b, Tensor) and a.dtype == b.dtype
                and a.shape == b.shape and torch.equal(_bits(a).cpu(), _bits(b).cpu()))
    if isinstance(a, Mapping):
        return (isinstance(b, Mapping) and set(a) == set(b)
                and all(_same_bits(a[k], b[k]) for k in a))
    if isinstance(a, (list, tuple)):
        return (isinstance(b, (list, tuple)) and len(a) == len(b)
                and all(_same_bits(x, y) for x, y in zip(a, b)))
    return a == b


def _same_values(a: Tensor, b: Tensor) -> bool:
    """Same dtype, shape and values (+0 == -0)."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.cpu(), b.cpu())


def _copy(state: Any) -> Any:
    """A deep copy of a state dict (tensors cloned)."""
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def _poison(state: Any) -> Any:
    """``state`` with every floating point tensor filled with NaN."""
    if isinstance(state, Tensor):
        return state.clone().fill_(float("nan")) if state.is_floating_point() else state.clone()
    if isinstance(state, Mapping):
        return {k: _poison(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(_poison(v) for v in state)
    return state


def _has_float(state: Any) -> bool:
    if isinstance(state, Tensor):
        return state.is_floating_point()
    if isinstance(state, Mapping):
        return any(_has_float(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return any(_has_float(v) for v in state)
    return False


def _finite(t: Tensor) -> bool:
    return bool(torch.isfinite(t).all())


def assert_close(actual: Tensor, expected: Tensor, tol: Tolerance, what: str) -> None:
    """``actual`` == ``expected`` within ``tol.rtol`` and ``tol.atol`` times the largest entry
    of ``expected`` (compared in float64 on the CPU)."""
    a, e = actual.detach().to("cpu", F64), expected.detach().to("cpu", F64)
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    scale = max(1.0, float(e.abs().max())) if e.numel() else 1.0
    if bool(((a - e).abs() <= tol.atol * scale + tol.rtol * e.abs()).all()):
        return                                  # (fast path: torch.testing is slow)
    torch.testing.assert_close(a, e, rtol=tol.rtol, atol=tol.atol * scale,
                               msg=lambda m: f"{what}: {m}")


def _unit(h: Tensor) -> Tensor:
    """``h`` in float64 on the CPU, divided by its largest entry (norms and eigenvalues of a
    finite matrix with entries near the dtype's largest value must not overflow)."""
    h = h.detach().to("cpu", F64)
    top = float(h.abs().max()) if h.numel() else 0.0
    return h / top if 0.0 < top < math.inf else h


def _sym_defect(h: Tensor) -> float:
    h = _unit(h)
    norm = max(float(torch.linalg.matrix_norm(h)), 1e-300)
    return float(torch.linalg.matrix_norm(h - h.T)) / norm


def _check_pd(h: Tensor, tol: Tolerance, what: str) -> None:
    assert _finite(h), f"{what}: H is not finite"
    e = torch.linalg.eigvalsh(_unit(h))
    assert float(e[-1]) > 0 and float(e[0]) >= -tol.pd * float(e[-1]), \
        f"{what}: not positive definite, eigenvalues {e.tolist()}"


# -- the base class ---------------------------------------------------------------------------
class ComponentContract:
    """Base of the contracts: parametrisation, options, hypothesis settings."""

    __test__ = False
    #: the component kind this contract checks
    kind: ClassVar[str] = ""
    #: the component class under test (set it in the subclass)
    component: ClassVar[Any] = None
    #: constructor options beside the component's Option defaults
    options: ClassVar[Mapping[str, Any]] = {}
    #: devices to run on (None: cpu, and cuda where available)
    devices: ClassVar[Sequence[str] | None] = None
    dtypes: ClassVar[Sequence[torch.dtype]] = DTYPES
    tolerances: ClassVar[Mapping[torch.dtype, Tolerance]] = TOLERANCES
    #: hypothesis examples per test that draws input (at most the loaded hypothesis profile's
    #: ``max_examples``)
    max_examples: ClassVar[int] = 20
    #: seed of the fixed (non-hypothesis) draws
    seed: ClassVar[int] = 0
    _kfqn_contract: ClassVar[bool] = True
    pytestmark = [pytest.mark.kfqn_contract]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "__test__" not in cls.__dict__:
            cls.__test__ = getattr(cls, "component", None) is not None

    # pytest calls this for each test of the class (it parametrises device and dtype)
    def pytest_generate_tests(self, metafunc: Any) -> None:
        if self.component is None:
            raise TypeError(f"{type(self).__name__}: set the class attribute 'component' to "
                            "the component class under test")
        names = metafunc.fixturenames
        if "kfqn_device" in names:
            devices = selected_devices(metafunc.config, self.devices)
            metafunc.parametrize("kfqn_device", [torch.device(d) for d in devices], ids=devices)
        if "kfqn_dtype" in names:
            metafunc.parametrize("kfqn_dtype", list(self.dtypes),
                                 ids=[dtype_id(d) for d in self.dtypes])

    def component_options(self) -> dict[str, Any]:
        """The component's Option defaults, overridden (and validated) by ``options``."""
        table = getattr(self.component, "options", {}) or {}
        out = {k: o.default for k, o in table.items() if isinstance(o, Option)}
        for key, value in self.options.items():
            opt = table.get(key)
            out[key] = opt.validate(key, value) if isinstance(opt, Option) else value
        return out

    def tol(self, dtype: torch.dtype) -> Tolerance:
        return self.tolerances[dtype]

    def given(self, *args: Any, **kwargs: Any) -> Callable:
        """``hypothesis.given`` with this contract's settings, for an inner test function."""
        def wrap(fn: Callable) -> Callable:
            n = min(self.max_examples, settings.default.max_examples)
            return settings(max_examples=n, deadline=None,
                            suppress_health_check=list(HealthCheck))(given(*args, **kwargs)(fn))
        return wrap

    def generator(self, salt: int = 0) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1000 + salt)

    @staticmethod
    def _name(component: Any) -> str:
        return getattr(component, "name", None) or getattr(component, "__name__", repr(component))


# -- factor update rules ----------------------------------------------------------------------
class FactorUpdateContract(ComponentContract):
    """Contract of an inverse-factor update rule (:class:`kfqn.updates.base.InverseFactor`):

    * ``update`` returns a 0-dim bool tensor on the factor's device, and neither ``update``
      nor ``apply``/``apply_right`` reads a value back to the host (checked with
      :func:`kfqn.testing.sync.no_host_sync`: ``.item()``, ``bool(t)``, data-dependent shapes;
      on CUDA also ``torch.cuda.set_sync_debug_mode('error')``);
    * ``dense()`` agrees with ``apply(I)``, ``apply`` on vectors and matrices with
      ``dense() @``, ``apply_right(m)`` with ``m dense()^T``; H is symmetric;
    * when ``satisfies_secant``: a well-conditioned first pair is accepted, and every accepted
      update gives H+ y = s (within ``Tolerance.secant``);
    * when ``keeps_positive_definite``: H stays positive definite under pairs with s^T y > 0
      (and under adversarial pairs);
    * pairs an update rule must reject (s^T y <= 0, the zero pair that a failed damping
      returns, NaN or inf entries, ``allow`` false) are rejected and leave the state bit for
      bit unchanged; so does every other rejected pair;
    * adversarial pairs (NaN, +-inf, zeros, huge, tiny, subnormal entries) never make H or
      H v non-finite and never raise;
    * ``state_dict`` / ``load_state_dict`` round trip (through ``torch.save``): the loaded
      factor behaves bit for bit as the original on the following pairs; loading copies;
    * ``reset()`` restores the initial value; ``reset(H0)`` (when ``accepts_dense_init``, or
      the class attribute ``takes_dense_init``) takes H0; a non-finite H0 or loaded state
      becomes the initial value and is counted in
      ``stats()['resets']``.
    """

    kind = "factor_update"
    #: dimension of the factors under test
    dim: ClassVar[int] = 5
    #: whether reset(H0) makes H = H0 (None: the component's ``accepts_dense_init``; False for
    #: a rule that takes H0 and ignores it, like ``identity``)
    takes_dense_init: ClassVar[bool | None] = None

    def make(self, device: torch.device, dtype: torch.dtype):
        return self.component(self.dim, dtype, device, **self.component_options())

    def _good_pair(self, device, dtype, salt: int = 0) -> tuple[Tensor, Tensor]:
        """s ~ N(0, I), y = B s with B's eigenvalues in [2, 4]: every rule should take it."""
        g = self.generator(salt)
        q, _ = torch.linalg.qr(torch.randn(self.dim, self.dim, generator=g, dtype=F64))
        b = (q * torch.linspace(2.0, 4.0, self.dim, dtype=F64)) @ q.T
        s = torch.randn(self.dim, generator=g, dtype=F64)
        return s.to(device, dtype), (b @ s).to(device, dtype)

    def _pair_seq(self, n_max: int = 4, n_min: int = 1):
        return kst.curvature_pairs(self.dim, n_min, n_max)

    def _check_update_result(self, acc: Any, f: Any, device: torch.device) -> None:
        assert isinstance(acc, Tensor), f"update must return a tensor, got {type(acc).__name__}"
        assert acc.dtype == torch.bool and acc.dim() == 0, \
            f"update must return a 0-dim bool tensor, got {acc.dtype} of shape {tuple(acc.shape)}"
        assert acc.device.type == device.type, f"update returned a tensor on {acc.device}"

    def _check_secant(self, f: Any, s: Tensor, y: Tensor, tol: Tolerance) -> None:
        h = f.dense().detach().to("cpu", F64)
        s64, y64 = s.to("cpu", F64), y.to("cpu", F64)
        # in units of the largest entries (no overflow of the norms)
        hs, ss, ys = (float(t.abs().max()) or 1.0 for t in (h, s64, y64))
        res = float(torch.linalg.vector_norm((h / hs) @ (y64 / ys) - s64 / (hs * ys)))
        scale = float(torch.linalg.vector_norm(s64 / (hs * ys))) + \
            float(torch.linalg.matrix_norm(h / hs)) * float(torch.linalg.vector_norm(y64 / ys))
        assert res <= tol.secant * scale, \
            f"secant equation H+ y = s violated after an accepted update: ||H+ y - s|| = " \
            f"{res * hs * ys:.3e}, allowed {tol.secant:.1e} * {scale * hs * ys:.3e}"

    # -- tests ----------------------------------------------------------------------------
    def test_types_devices_and_stats(self, kfqn_device, kfqn_dtype):
        f = self.make(kfqn_device, kfqn_dtype)
        s, y = self._good_pair(kfqn_device, kfqn_dtype)
        closed = torch.zeros((), dtype=torch.bool, device=kfqn_device)
        for acc in (f.update(s, y), f.update(s, y, closed), f.update(s * float("nan"), y)):
            self._check_update_result(acc, f, kfqn_device)
        h = f.dense()
        assert h.shape == (self.dim, self.dim) and h.dtype == kfqn_dtype
        assert h.device.type == kfqn_device.type
        v = f.apply(torch.ones(self.dim, dtype=kfqn_dtype, device=kfqn_device))
        assert v.shape == (self.dim,) and v.dtype == kfqn_dtype and v.device.type == kfqn_device.type
        stats = f.stats()
        assert "resets" in stats
        for key, t in stats.items():
            assert isinstance(t, Tensor) and t.dim() == 0 and t.device.type == kfqn_device.type, key
        assert stats["resets"].dtype == torch.long
        assert isinstance(f.state_bytes(), int) and f.state_bytes() >= 0

    def test_no_host_sync(self, kfqn_device, kfqn_dtype):
        f = self.make(kfqn_device, kfqn_dtype)
        s, y = self._good_pair(kfqn_device, kfqn_dtype)
        s2, y2 = self._good_pair(kfqn_device, kfqn_dtype, salt=1)
        zero = torch.zeros_like(s)
        closed = torch.zeros((), dtype=torch.bool, device=kfqn_device)
        m = torch.ones(self.dim, 3, dtype=kfqn_dtype, device=kfqn_device)
        with no_host_sync(kfqn_device):
            results = [f.update(s, y), f.update(s2, y2), f.update(s * float("nan"), y),
                       f.update(zero, zero), f.update(s, y, closed), f.update(s2, -y2)]
            f.apply(s)
            f.apply(m)
            f.apply_right(m.T)
        for acc in results:
            self._check_update_result(acc, f, kfqn_device)

    def test_dense_agrees_with_apply(self, kfqn_device, kfqn_dtype):
        tol = self.tol(kfqn_dtype)

        @self.given(pairs=self._pair_seq(), probe=st.integers(0, 2**16))
        def run(pairs, probe):
            f = self.make(kfqn_device, kfqn_dtype)
            g = torch.Generator().manual_seed(probe)
            for s, y in pairs:
                f.update(s.to(kfqn_device, kfqn_dtype), y.to(kfqn_device, kfqn_dtype))
                h = f.dense()
                eye = torch.eye(self.dim, dtype=kfqn_dtype, device=kfqn_device)
                assert_close(h, f.apply(eye), tol, "dense() vs apply(I)")
                m = torch.randn(self.dim, 3, generator=g, dtype=F64).to(kfqn_device, kfqn_dtype)
                assert_close(f.apply(m[:, 0]), h @ m[:, 0], tol, "apply(v) vs dense() @ v")
                assert_close(f.apply(m), h @ m, tol, "apply(M) vs dense() @ M")
                assert_close(f.apply_right(m.T), m.T @ h.T, tol, "apply_right(M^T) vs M^T dense()^T")
        run()

    def test_symmetric(self, kfqn_device, kfqn_dtype):
        tol = self.tol(kfqn_dtype)

        @self.given(pairs=self._pair_seq(6))
        def run(pairs):
            f = self.make(kfqn_device, kfqn_dtype)
            for s, y in pairs:
                f.update(s.to(kfqn_device, kfqn_dtype), y.to(kfqn_device, kfqn_dtype))
                d = _sym_defect(f.dense())
                assert d <= tol.symmetry, f"H is not symmetric: ||H - H^T|| / ||H|| = {d:.3e}"
        run()

    def test_secant_equation(self, kfqn_device, kfqn_dtype):
        if not getattr(self.component, "satisfies_secant", True):
            pytest.skip(f"{self._name(self.component)} does not claim the secant equation "
                        "(satisfies_secant = False)")
        tol = self.tol(kfqn_dtype)
        f = self.make(kfqn_device, kfqn_dtype)
        s, y = self._good_pair(kfqn_device, kfqn_dtype)
        assert bool(f.update(s, y)), ("a well-conditioned pair (y = B s, eigenvalues of B in "
                                      "[2, 4]) was rejected by a fresh factor")
        self._check_secant(f, s, y, tol)

        @self.given(pairs=self._pair_seq(6))
        def run(pairs):
            f = self.make(kfqn_device, kfqn_dtype)
            for s, y in pairs:
                s, y = s.to(kfqn_device, kfqn_dtype), y.to(kfqn_device, kfqn_dtype)
                if bool(f.update(s, y)):
                    self._check_secant(f, s, y, tol)
        run()

    def test_positive_definite_kept(self, kfqn_device, kfqn_dtype):
        if not getattr(self.component, "keeps_positive_definite", True):
            pytest.skip(f"{self._name(self.component)} does not claim to keep H positive "
                        "definite (keeps_positive_definite = False)")
        tol = self.tol(kfqn_dtype)

        @self.given(pairs=self._pair_seq(6))
        def run(pairs):
            f = self.make(kfqn_device, kfqn_dtype)
            for s, y in pairs:
                s, y = s.to(kfqn_device, kfqn_dtype), y.to(kfqn_device, kfqn_dtype)
                f.update(s, y)
                sy = float(s.double() @ y.double())
                _check_pd(f.dense(), tol, f"after a pair with s^T y = {sy:.3e}")
        run()

    def test_rejects_unusable_pairs_bit_for_bit(self, kfqn_device, kfqn_dtype):
        f = self.make(kfqn_device, kfqn_dtype)
        s, y = self._good_pair(kfqn_device, kfqn_dtype)
        s2, y2 = self._good_pair(kfqn_device, kfqn_dtype, salt=1)
        f.update(s, y)
        f.update(s2, y2)
        e = torch.zeros_like(s)
        e1, e2 = e.clone(), e.clone()
        e1[0], e2[1] = 1.0, 1.0
        nan, inf = float("nan"), float("inf")
        closed = torch.zeros((), dtype=torch.bool, device=kfqn_device)
        cases = {
            "s^T y < 0": (s, -y, None),
            "s^T y = 0": (e1, e2, None),
            "zero pair (a failed damping)": (e, e.clone(), None),
            "NaN in s": (s * torch.where(e1 > 0, nan, 1.0), y, None),
            "inf in y": (s, y * torch.where(e2 > 0, inf, 1.0), None),
            "NaN everywhere": (s * nan, y * nan, None),
            "allow = False": (s, y, closed),
        }
        for what, (a, b, allow) in cases.items():
            before, dense = _copy(f.state_dict()), f.dense().clone()
            acc = f.update(a, b, allow)
            assert not bool(acc), f"{what}: the pair was accepted"
            assert _same_bits(f.state_dict(), before), f"{what}: rejected, but the state changed"
            assert _same_bits(f.dense(), dense), f"{what}: rejected, but H changed"

    def test_adversarial_pairs_stay_finite(self, kfqn_device, kfqn_dtype):
        tol = self.tol(kfqn_dtype)
        pd = getattr(self.component, "keeps_positive_definite", True)
        item = st.one_of(kst.one_curvature_pair(self.dim),
                         kst.adversarial_pair(self.dim, kfqn_dtype))

        @self.given(pairs=st.lists(st.tuples(item, st.sampled_from([None, True, False])),
                                   min_size=1, max_size=6))
        def run(pairs):
            f = self.make(kfqn_device, kfqn_dtype)
            ones = torch.ones(self.dim, dtype=kfqn_dtype, device=kfqn_device)
            for (s, y), allow in pairs:
                s, y = s.to(kfqn_device, kfqn_dtype), y.to(kfqn_device, kfqn_dtype)
                gate = None if allow is None else torch.tensor(allow, device=kfqn_device)
                before = _copy(f.state_dict())
                acc = f.update(s, y, gate)
                self._check_update_result(acc, f, kfqn_device)
                h = f.dense()
                assert _finite(h), f"H became non-finite: {h}"
                assert _finite(f.apply(ones)), "H v became non-finite"
                if allow is False:
                    assert not bool(acc), "accepted a pair with allow = False"
                if not bool(acc):
                    assert _same_bits(f.state_dict(), before), "rejected, but the state changed"
                else:   # s^T y > 0 up to the rounding of the dot product in the dtype
                    s64, y64 = s.double(), y.double()
                    sy = float(s64 @ y64)
                    slack = 2 * self.dim * torch.finfo(kfqn_dtype).eps * float((s64 * y64).abs().sum())
                    assert sy > -slack, f"accepted a pair with s^T y = {sy}"
                d = _sym_defect(h)
                assert d <= tol.symmetry, f"H is not symmetric: ||H - H^T|| / ||H|| = {d:.3e}"
                if pd:
                    _check_pd(h, tol, "after an adversarial pair")
        run()

    def test_state_dict_round_trip(self, kfqn_device, kfqn_dtype):
        item = st.one_of(kst.one_curvature_pair(self.dim),
                         kst.adversarial_pair(self.dim, kfqn_dtype))

        @self.given(first=self._pair_seq(4, n_min=0),
                    then=st.lists(item, min_size=1, max_size=4))
        def run(first, then):
            dev, dt = kfqn_device, kfqn_dtype
            f = self.make(dev, dt)
            for s, y in first:
                f.update(s.to(dev, dt), y.to(dev, dt))
            g = self.make(dev, dt)
            g.load_state_dict(_copy(f.state_dict()))
            live = self.make(dev, dt)
            live.load_state_dict(f.state_dict())      # not serialised: must copy, not alias
            frozen = live.dense().clone()
            assert _same_bits(g.dense(), f.dense()), "a loaded factor differs from the original"
            probe = torch.linspace(-1.0, 1.0, self.dim, dtype=dt, device=dev)
            for s, y in then:
                s, y = s.to(dev, dt), y.to(dev, dt)
                a, b = f.update(s, y), g.update(s, y)
                assert bool(a) == bool(b), "the loaded factor accepted differently"
                assert _same_bits(f.dense(), g.dense()), "the loaded factor diverged (dense)"
                assert _same_bits(f.apply(probe), g.apply(probe)), "the loaded factor diverged (apply)"
            assert _same_bits(live.dense(), frozen), \
                "load_state_dict kept references to the given tensors: updating the original " \
                "changed the loaded factor"
        run()

    def test_reset_and_nonfinite_start(self, kfqn_device, kfqn_dtype):
        dev, dt = kfqn_device, kfqn_dtype
        tol = self.tol(dt)
        fresh = self.make(dev, dt)
        f = self.make(dev, dt)
        s, y = self._good_pair(dev, dt)
        f.update(s, y)
        f.reset()
        assert _same_bits(f.dense(), fresh.dense()), "reset() did not restore the initial value"
        takes = self.takes_dense_init
        if takes is None:
            takes = getattr(self.component, "accepts_dense_init", True)
        if takes:
            g = self.generator(7)
            m = torch.randn(self.dim, self.dim, generator=g, dtype=F64)
            h0 = m @ m.T + 0.5 * torch.eye(self.dim, dtype=F64)
            f.reset(h0.to(dev, dt))
            assert_close(f.dense(), h0, tol, "reset(H0) then dense()")
            v = torch.randn(self.dim, generator=g, dtype=F64)
            assert_close(f.apply(v.to(dev, dt)), h0 @ v, tol, "reset(H0) then apply(v)")
            before = int(f.stats()["resets"])
            bad = h0.clone()
            bad[0, 1] = bad[1, 0] = float("nan")
            f.reset(bad.to(dev, dt))
            assert _finite(f.dense()), "reset with a non-finite H0 left H non-finite"
            assert int(f.stats()["resets"]) == before + 1, "a non-finite H0 was not counted in resets"
        state = f.state_dict()
        if _has_float(state):
            g = self.make(dev, dt)
            g.load_state_dict(_poison(state))
            assert _finite(g.dense()), "a non-finite loaded state left H non-finite"
            assert _same_bits(g.dense(), fresh.dense()), \
                "a non-finite loaded state was not replaced by the initial value"
            assert int(g.stats()["resets"]) >= 1, "a non-finite loaded state was not counted in resets"


# -- damping rules ----------------------------------------------------------------------------
class DampingContract(ComponentContract):
    """Contract of a damping rule (:class:`kfqn.updates.base.Damping`):

    * the result's pair has the input's shape, dtype and device; ``ok`` is None (no
      postcondition) or a 0-dim bool tensor; the ``active`` flags are 0-dim bool tensors;
    * for finite input (adversarial: zeros, huge, tiny entries; H of scale 1e-20 to 1e20) the
      pair is finite; where ``ok`` holds it meets the rule's postcondition
      (``rule.guarantee``, e.g. s^T y >= mu1 y^T H y for Powell); where it does not, the pair
      is zero (so every update rule rejects it); no step active means the pair is unchanged;
    * no host synchronisation; non-finite input never raises and never gives ``ok`` with a
      non-finite pair.
    """

    kind = "damping"
    dim: ClassVar[int] = 4
    #: the layer's second damping constant mu2 (sqrt(lambda)) to try
    mu2_values: ClassVar[Sequence[float]] = (0.0, 1e-4, 0.3, 1.0, 2.0)

    def make(self):
        return self.component(**self.component_options())

    def _run(self, rule, s, y, h, mu2, device):
        hy = lambda v: h @ v  # noqa: E731
        with no_host_sync(device):
            out = rule(s, y, hy, mu2)
        return out, hy

    def _check_types(self, out, s, device):
        for name in ("s", "y"):
            t = getattr(out, name)
            assert isinstance(t, Tensor) and t.shape == s.shape and t.dtype == s.dtype, name
            assert t.device.type == device.type, name
        if out.ok is not None:
            assert out.ok.dtype == torch.bool and out.ok.dim() == 0, "ok must be a 0-dim bool tensor"
            assert out.ok.device.type == device.type
        for key, flag in out.active.items():
            assert isinstance(flag, Tensor) and flag.dtype == torch.bool and flag.dim() == 0, \
                f"active[{key!r}] must be a 0-dim bool tensor"

    def test_postcondition_or_rejected(self, kfqn_device, kfqn_dtype):
        dev, dt = kfqn_device, kfqn_dtype
        rule = self.make()
        pair = st.one_of(kst.any_pair(self.dim), kst.one_curvature_pair(self.dim),
                         kst.adversarial_pair(self.dim, dt, finite_only=True))

        @self.given(pair=pair, h=kst.spd(dim=self.dim), hscale=st.sampled_from([1e-20, 1.0, 1e20]),
                    mu2=st.sampled_from(list(self.mu2_values)))
        def run(pair, h, hscale, mu2):
            s, y = pair[0].to(dev, dt), pair[1].to(dev, dt)
            hm = (h * hscale).to(dev, dt)
            out, hy = self._run(rule, s, y, hm, mu2, dev)
            self._check_types(out, s, dev)
            if not (_finite(s) and _finite(y)):
                return
            assert _finite(out.s) and _finite(out.y), "finite input gave a non-finite pair"
            if out.ok is not None and not bool(out.ok):
                assert not bool(out.s.any()) and not bool(out.y.any()), \
                    "ok is false but the pair is not zero (an update rule could take it)"
                return
            if out.ok is not None:
                assert bool(rule.guarantee(out.s, out.y, hy, mu2)), \
                    "ok is true but the pair misses the rule's postcondition (guarantee)"
            if not any(bool(a) for a in out.active.values()):
                # equal values (s, y are finite here); a zero may come back with the other
                # sign (a mixture lerp(H y, s, 1) = s - (s - H y) * 0 gives +0 for s = -0),
                # which no later product, sum or comparison can tell apart
                assert _same_values(out.s, s) and _same_values(out.y, y), \
                    "no damping step was active, but the pair changed"
        run()

    def test_nonfinite_input(self, kfqn_device, kfqn_dtype):
        dev, dt = kfqn_device, kfqn_dtype
        rule = self.make()
        h = torch.eye(self.dim, dtype=dt, device=dev)
        one = torch.ones(self.dim, dtype=dt, device=dev)
        for s, y in [(one * float("nan"), one), (one, one * float("inf")),
                     (one * -float("inf"), one * float("nan"))]:
            out, _ = self._run(rule, s, y, h, 0.3, dev)
            self._check_types(out, s, dev)
            if out.ok is not None and bool(out.ok):
                assert _finite(out.s) and _finite(out.y), "ok with a non-finite pair"


# -- inversion strategies ---------------------------------------------------------------------
class InversionContract(ComponentContract):
    """Contract of an inversion strategy (:class:`kfqn.inversion.base.Inversion`):

    * ``invert(F, lam)`` of an SPD F agrees with the float64 dense (F + lam I)^{-1} within
      ``Tolerance.inversion`` times the condition number, for lam a float or a 0-dim tensor;
      the result is symmetric positive definite, of F's dtype and device, and ``fallback`` is
      a 0-dim integer tensor;
    * ``invert_root(F, lam, p)``^p agrees with the same reference (p = 2, 4);
    * any finite symmetric F (indefinite, singular, entries near the dtype's largest value)
      gives a finite symmetric positive definite result and never raises;
    * with ``sync_free = True`` (class attribute): no host synchronisation in ``invert``.
    """

    kind = "inversion"
    max_dim: ClassVar[int] = 6
    dampings: ClassVar[Sequence[float]] = (1e-3, 0.1, 1.0, 10.0)
    #: invert() must not read back to the host (e.g. CholeskyInversion(host_reads='never'))
    sync_free: ClassVar[bool] = False

    def make(self):
        return self.component(**self.component_options())

    def _invert(self, inv, a, lam, device, root: int | None = None):
        ctx = no_host_sync(device) if self.sync_free and root is None else _nullcontext()
        with ctx:
            return inv.invert(a, lam) if root is None else inv.invert_root(a, lam, root)

    def _check_result(self, res, a, tol, what):
        x = res.inverse
        assert x.shape == a.shape and x.dtype == a.dtype and x.device.type == a.device.type, what
        assert isinstance(res.fallback, Tensor) and res.fallback.dim() == 0, \
            f"{what}: fallback must be a 0-dim tensor"
        assert not res.fallback.is_floating_point() and res.fallback.dtype != torch.bool, \
            f"{what}: fallback must be an integer code"
        assert _finite(x), f"{what}: non-finite result"
        d = _sym_defect(x)
        assert d <= tol.symmetry, f"{what}: not symmetric, ||X - X^T|| / ||X|| = {d:.3e}"
        _check_pd(x, tol, what)

    def test_inverse_matches_float64_reference(self, kfqn_device, kfqn_dtype):
        dev, dt = kfqn_device, kfqn_dtype
        tol, inv = self.tol(dt), self.make()

        @self.given(f=kst.spd(max_dim=self.max_dim), lam=st.sampled_from(list(self.dampings)),
                    as_tensor=st.booleans())
        def run(f, lam, as_tensor):
            a = f.to(dev, dt)
            damp = torch.tensor(lam, dtype=dt, device=dev) if as_tensor else lam
            res = self._invert(inv, a, damp, dev)
            self._check_result(res, a, tol, f"invert(F, {lam})")
            damped = a.to("cpu", F64) + lam * torch.eye(a.shape[0], dtype=F64)
            ref = torch.linalg.inv(damped)
            e = torch.linalg.eigvalsh(damped)
            cond = float(e[-1] / e[0])
            err = float(torch.linalg.matrix_norm(res.inverse.to("cpu", F64) - ref)
                        / torch.linalg.matrix_norm(ref))
            assert err <= tol.inversion * cond, \
                f"(F + {lam} I)^-1 off by {err:.3e} (relative), allowed {tol.inversion:.1e} * " \
                f"cond {cond:.3e}"
        run()

    def test_inverse_root(self, kfqn_device, kfqn_dtype):
        dev, dt = kfqn_device, kfqn_dtype
        tol, inv = self.tol(dt), self.make()

        @self.given(f=kst.spd(max_dim=self.max_dim), lam=st.sampled_from(list(self.dampings)),
                    root=st.sampled_from([2, 4]))
        def run(f, lam, root):
            a = f.to(dev, dt)
            res = self._invert(inv, a, lam, dev, root)
            self._check_result(res, a, tol, f"invert_root(F, {lam}, {root})")
            damped = a.to("cpu", F64) + lam * torch.eye(a.shape[0], dtype=F64)
            ref = torch.linalg.inv(damped)
            e = torch.linalg.eigvalsh(damped)
            cond = float(e[-1] / e[0])
            r = res.inverse.to("cpu", F64)
            err = float(torch.linalg.matrix_norm(torch.linalg.matrix_power(r, root) - ref)
                        / torch.linalg.matrix_norm(ref))
            assert err <= root * tol.inversion * cond, \
                f"((F + {lam} I)^(-1/{root}))^{root} off by {err:.3e} (relative)"
        run()

    def test_any_finite_symmetric_input(self, kfqn_device, kfqn_dtype):
        dev, dt = kfqn_device, kfqn_dtype
        inv = self.make()
        base = self.tol(dt)      # entries up to the dtype's largest value: rounding of that size
        tol = replace(base, pd=max(base.pd, 1e-6), symmetry=max(base.symmetry, 1e-6))
        neg = -torch.eye(3, dtype=dt, device=dev)
        self._check_result(self._invert(inv, neg, 0.1, dev), neg, tol, "invert(-I, 0.1)")

        @self.given(n=st.integers(1, 4), data=st.data(),
                    lam=st.sampled_from([1e-8, 1e-3, 0.5, 1e3]))
        def run(n, data, lam):
            a = data.draw(kst.symmetric_matrix(n, dt)).to(dev)
            res = self._invert(inv, a, lam, dev)
            self._check_result(res, a, tol, f"invert of a finite symmetric matrix, lam = {lam}")
        run()


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


# -- layer adapters ---------------------------------------------------------------------------
class LayerAdapterContract(ComponentContract):
    """Contract of a layer adapter (:class:`kfqn.layers.base.LayerAdapter`), on each of its
    ``examples()`` (module, input shape) and on each Kronecker block of the module
    (``blocks()``: the adapter itself, or one adapter per block, e.g. per group of a grouped
    convolution):

    * ``matches`` and ``unsupported_reason`` accept the example module; each block's ``d_a``,
      ``d_g``, ``positions`` agree with its ``patches`` and ``per_sample_grad_outputs``; the
      blocks' ``targets()`` cover every element of the module's ``params()`` exactly once;
    * with the capture hooks on a forward/backward pass: (1/m) sum g abar^T = the block's
      homogeneous gradient of autograd's ``.grad`` fields; ``grad_output_mean(dL/dh)`` and the
      hooks' ``g_mean`` = the mean of the per-sample gradients; summed over the blocks,
      sum g^T Wbar abar = m sum dL/dh * h and ||Wbar abar||^2 = ||h||^2 (the layouts of g,
      the patches and the weights match the output); ``output_mean`` and the hooks'
      ``h_mean`` = the mean of Wbar abar;
    * ``input_covariance`` (also by chunks of one sample), ``add_covariance_`` and
      ``input_mean`` agree with the explicit (1/m) sum abar abar^T and mean of ``patches``;
      ``add_covariance_`` with a false ``mask`` leaves the output bit for bit unchanged, even
      for a non-finite input;
    * ``hessian_action(x, s)`` = (1/m) sum abar (abar^T s);
    * ``split(homogeneous_weight())`` gives back the block's ``targets()`` bit for bit, and
      ``split(homogeneous_grad())`` the same slices of the gradients.
    """

    kind = "layer_adapter"

    def pytest_generate_tests(self, metafunc: Any) -> None:
        super().pytest_generate_tests(metafunc)
        if "kfqn_example" in metafunc.fixturenames:
            n = len(self.component.examples())
            metafunc.parametrize("kfqn_example", list(range(n)),
                                 ids=[f"example{i}" for i in range(n)])

    def case(self, i: int, device: torch.device, dtype: torch.dtype):
        """(module, input, adapter, blocks) of example ``i`` on ``device`` in ``dtype``."""
        module, shape = self.component.examples()[i]
        module = module.to(device=device, dtype=dtype)
        g = self.generator(i)
        x = torch.randn(*shape, generator=g, dtype=F64).to(device, dtype)
        ad = self.component(module)
        blocks = [b for _, b in ad.blocks("layer")]
        assert blocks, "blocks() returned no block"
        return module, x, ad, blocks

    def _forward_backward(self, module, blocks, x):
        from kfqn.layers.capture import CaptureHooks

        hooks = [CaptureHooks(module, b, keep_grad_output=True) for b in blocks]
        try:
            out = module(x)
            out.retain_grad()
            target = torch.randn(out.shape, generator=self.generator(99), dtype=F64).to(out)
            loss = ((out - target) ** 2).sum() / x.shape[0]   # mean over the batch
            module.zero_grad()
            loss.backward()
        finally:
            for h in hooks:
                h.remove()
        return [h.slots["current"] for h in hooks], out

    @staticmethod
    def _slice_of(view: Tensor, params: Sequence[Tensor], source: Sequence[Tensor]) -> Tensor:
        """The slice of ``source[k]`` that ``view`` is of ``params[k]`` (same storage)."""
        for p, src in zip(params, source):
            if view.untyped_storage().data_ptr() == p.untyped_storage().data_ptr():
                offset = src.storage_offset() + view.storage_offset() - p.storage_offset()
                return src.as_strided(view.shape, view.stride(), offset)
        raise AssertionError("a block's targets() must be the module's parameters or views of them")

    def test_matches_and_shapes(self, kfqn_device, kfqn_dtype, kfqn_example):
        module, x, ad, blocks = self.case(kfqn_example, kfqn_device, kfqn_dtype)
        assert self.component.matches(module), "matches() rejects its own example"
        assert self.component.unsupported_reason(module) is None, \
            f"unsupported_reason() of its own example: {self.component.unsupported_reason(module)}"
        names = [n for n, _ in ad.blocks("layer")]
        assert len(set(names)) == len(names), f"block names repeat: {names}"
        params = ad.params()
        covered = [torch.zeros_like(p) for p in params]
        for b in blocks:
            abar = b.patches(x)
            assert abar.dim() == 3 and abar.shape[0] == x.shape[0], "patches must be (m, T, d_a)"
            assert abar.shape[1] == b.positions(x), "positions() != patches().shape[1]"
            assert abar.shape[2] == b.d_a, f"d_a = {b.d_a} != patches().shape[2] = {abar.shape[2]}"
            assert b.homogeneous_weight().shape == (b.d_g, b.d_a), \
                "homogeneous_weight() must be (d_g, d_a)"
            for t in b.targets():
                self._slice_of(t, params, covered).add_(1)
        for p, c in zip(params, covered):
            assert bool((c == 1).all()), \
                "the blocks' targets() must cover every parameter element exactly once"

    def test_gradients_vs_autograd(self, kfqn_device, kfqn_dtype, kfqn_example):
        tol = self.tol(kfqn_dtype)
        module, x, ad, blocks = self.case(kfqn_example, kfqn_device, kfqn_dtype)
        caps, out = self._forward_backward(module, blocks, x)
        m = x.shape[0]
        gh, hh = 0.0, 0.0
        for b, cap in zip(blocks, caps):
            abar = b.patches(x)
            g = b.per_sample_grad_outputs(out.grad)
            assert g.shape == (m, abar.shape[1], b.d_g), "per_sample_grad_outputs must be (m, T, d_g)"
            assert_close(torch.einsum("itg,ita->ga", g, abar) / m, b.homogeneous_grad(), tol,
                         "(1/m) sum g abar^T vs autograd's homogeneous gradient")
            assert_close(b.grad_output_mean(out.grad), g.mean(dim=(0, 1)), tol,
                         "grad_output_mean vs mean of per_sample_grad_outputs")
            assert_close(cap.g_mean, g.mean(dim=(0, 1)), tol, "hooks' g_mean vs per-sample mean")
            h = torch.einsum("ga,ita->itg", b.homogeneous_weight(), abar)
            gh = gh + torch.einsum("itg,itg->", g, h)
            hh = hh + (h * h).sum()
            assert_close(b.output_mean(out.detach()), h.mean(dim=(0, 1)), tol,
                         "output_mean vs mean of Wbar abar")
            assert_close(cap.h_mean, h.mean(dim=(0, 1)), tol, "hooks' h_mean vs mean of Wbar abar")
        assert_close(gh, m * (out.grad * out).sum(), tol,
                     "sum g^T Wbar abar vs m sum dL/dh * h (layout of g and the patches)")
        assert_close(hh, (out * out).sum(), tol, "||Wbar abar||^2 vs ||h||^2")

    def test_statistics_vs_patches(self, kfqn_device, kfqn_dtype, kfqn_example):
        tol = self.tol(kfqn_dtype)
        module, x, ad, blocks = self.case(kfqn_example, kfqn_device, kfqn_dtype)
        m = x.shape[0]
        for b in blocks:
            flat = b.patches(x).reshape(-1, b.d_a)
            a_ref = flat.T @ flat / m
            assert_close(b.input_covariance(x), a_ref, tol, "input_covariance vs (1/m) sum abar abar^T")
            assert_close(b.input_covariance(x, chunk=1), a_ref, tol, "input_covariance(chunk=1)")
            assert_close(b.input_mean(x), flat.mean(0), tol, "input_mean vs mean of patches")
            base = torch.randn(b.d_a, b.d_a, generator=self.generator(5), dtype=F64).to(x)
            acc = base.clone()
            b.add_covariance_(acc, x, 0.5)
            assert_close(acc, base + 0.5 * flat.T @ flat, tol, "add_covariance_")
            masked = base.clone()
            b.add_covariance_(masked, x * float("nan"), 0.5,
                              mask=torch.zeros((), dtype=torch.bool, device=x.device))
            assert _same_bits(masked, base), "add_covariance_ with mask false changed the output"

    def test_hessian_action(self, kfqn_device, kfqn_dtype, kfqn_example):
        tol = self.tol(kfqn_dtype)
        module, x, ad, blocks = self.case(kfqn_example, kfqn_device, kfqn_dtype)
        for b in blocks:
            flat = b.patches(x).reshape(-1, b.d_a)
            s = torch.randn(b.d_a, generator=self.generator(3), dtype=F64).to(x)
            assert_close(b.hessian_action(x, s), flat.T @ (flat @ s) / x.shape[0], tol,
                         "hessian_action vs (1/m) sum abar abar^T s")

    def test_split_round_trip(self, kfqn_device, kfqn_dtype, kfqn_example):
        module, x, ad, blocks = self.case(kfqn_example, kfqn_device, kfqn_dtype)
        self._forward_backward(module, blocks, x)
        params = ad.params()
        for b in blocks:
            targets = b.targets()
            parts = b.split(b.homogeneous_weight())
            assert len(parts) == len(targets), "split() must give one tensor per target"
            for p, t in zip(parts, targets):
                assert _same_bits(p, t.detach()), "split(homogeneous_weight()) != targets()"
            grads = [p.grad for p in params]
            for p, t in zip(b.split(b.homogeneous_grad()), targets):
                assert _same_bits(p, self._slice_of(t, params, grads)), \
                    "split(homogeneous_grad()) != the gradients of targets()"


# -- making contract classes ------------------------------------------------------------------
CONTRACTS: dict[str, type[ComponentContract]] = {
    "factor_update": FactorUpdateContract,
    "damping": DampingContract,
    "inversion": InversionContract,
    "layer_adapter": LayerAdapterContract,
}


def _make(base: type[ComponentContract], component: Any, options: Mapping[str, Any],
          **attrs: Any) -> type[ComponentContract]:
    name = f"{base.__name__}[{ComponentContract._name(component)}]"
    body = {"component": component, "options": dict(options), "__test__": True, **attrs}
    return type(name, (base,), body)


def factor_update_contract(component: Any, *, contract_attrs: Mapping[str, Any] | None = None,
                           **options: Any) -> type[FactorUpdateContract]:
    """A :class:`FactorUpdateContract` test class for ``component`` built with ``options``
    (``contract_attrs``: class attributes such as ``dim`` or ``max_examples``)."""
    return _make(FactorUpdateContract, component, options, **(contract_attrs or {}))


def damping_contract(component: Any, *, contract_attrs: Mapping[str, Any] | None = None,
                     **options: Any) -> type[DampingContract]:
    """A :class:`DampingContract` test class for ``component``."""
    return _make(DampingContract, component, options, **(contract_attrs or {}))


def inversion_contract(component: Any, *, contract_attrs: Mapping[str, Any] | None = None,
                       **options: Any) -> type[InversionContract]:
    """An :class:`InversionContract` test class for ``component``."""
    return _make(InversionContract, component, options, **(contract_attrs or {}))


def layer_adapter_contract(component: Any, *, contract_attrs: Mapping[str, Any] | None = None,
                           **options: Any) -> type[LayerAdapterContract]:
    """A :class:`LayerAdapterContract` test class for ``component``."""
    return _make(LayerAdapterContract, component, options, **(contract_attrs or {}))


def contract_for(component: Any, *, contract_attrs: Mapping[str, Any] | None = None,
                 **options: Any) -> type[ComponentContract]:
    """The contract test class for ``component``, chosen by the kind it was registered as
    (``kfqn.register(kind)``) or by its base class."""
    kind = registered_kind(component) if isinstance(component, type) else None
    if kind is None:
        from kfqn.inversion.base import Inversion
        from kfqn.layers.base import LayerAdapter
        from kfqn.updates.base import Damping, InverseFactor

        bases = {InverseFactor: "factor_update", Damping: "damping", Inversion: "inversion",
                 LayerAdapter: "layer_adapter"}
        kind = next((k for b, k in bases.items()
                     if isinstance(component, type) and issubclass(component, b)), None)
    if kind not in CONTRACTS:
        raise TypeError(f"kfqn.testing has no contract for {component!r} (kind {kind!r}); "
                        f"contracts: {', '.join(CONTRACTS)}")
    return _make(CONTRACTS[kind], component, options, **(contract_attrs or {}))
