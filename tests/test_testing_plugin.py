"""kfqn.testing as a plugin author uses it: the public contract suite on the example DFP plugin
(examples/dfp_update.py), a deliberately broken rule that the suite must fail, the pytest
plugin (entry point, fixtures, marker, option), and the test extra staying optional."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

import kfqn
from dfp_update import DFPFactor  # examples/dfp_update.py, on sys.path via conftest
from kfqn.testing import FactorUpdateContract, factor_update_contract

pytest_plugins = ["pytester"]

# -- what a plugin author writes --------------------------------------------------------------
test_dfp_contract = factor_update_contract(DFPFactor)


class BrokenSecantDFP(DFPFactor):
    """Updates from (s, 2y): H+ (2y) = s, so H+ y = s / 2 -- symmetric, positive definite,
    finite, everything but the secant equation it claims."""

    name = "broken_dfp"

    def update(self, s, y, allow=None):
        return super().update(s, 2.0 * y, allow)


BROKEN_MODULE = textwrap.dedent('''
    from dfp_update import DFPFactor
    from kfqn.testing import factor_update_contract


    class BrokenSecantDFP(DFPFactor):
        name = "broken_dfp"

        def update(self, s, y, allow=None):
            return super().update(s, 2.0 * y, allow)


    test_broken = factor_update_contract(BrokenSecantDFP)
''')


def test_broken_rule_fails_the_contract_called_directly():
    contract = factor_update_contract(BrokenSecantDFP)()
    with pytest.raises(AssertionError, match="secant equation"):
        contract.test_secant_equation(torch.device("cpu"), torch.float64)
    contract.test_symmetric(torch.device("cpu"), torch.float64)    # the rest holds


def test_broken_rule_fails_the_suite_under_pytest(pytester):
    pytester.makepyfile(test_broken_plugin=BROKEN_MODULE)
    result = pytester.runpytest_inprocess("-q", "-p", "no:cacheprovider", "--kfqn-devices=cpu",
                                          "-k", "secant_equation or symmetric")
    result.assert_outcomes(passed=2, failed=2)
    result.stdout.fnmatch_lines(["*test_broken.test_secant_equation[[]cpu-float32[]]*",
                                 "*secant equation H+ y = s violated*"])


def test_dfp_registers_without_hooks():
    import dfp_update

    from kfqn.core.registry import Registry

    reg = Registry(load_entry_points=False)
    reg.register(dfp_update)
    assert reg.get("factor_update", "dfp") is DFPFactor
    assert not hasattr(dfp_update, "kfqn_factor_updates")


def test_subclass_form_and_contract_for():
    class TestDFP(FactorUpdateContract):
        component = DFPFactor

    assert TestDFP.__test__ and not FactorUpdateContract.__test__
    made = kfqn.testing.contract_for(DFPFactor)
    assert issubclass(made, FactorUpdateContract) and made.component is DFPFactor
    from kfqn.testing import DampingContract, InversionContract, LayerAdapterContract
    from kfqn.inversion import EighInversion
    from kfqn.layers import LinearAdapter
    from kfqn.updates import PowellDamping
    assert issubclass(kfqn.testing.contract_for(PowellDamping), DampingContract)
    assert issubclass(kfqn.testing.contract_for(EighInversion), InversionContract)
    assert issubclass(kfqn.testing.contract_for(LinearAdapter), LayerAdapterContract)
    with pytest.raises(TypeError, match="no contract"):
        kfqn.testing.contract_for(int)


# -- the pytest plugin --------------------------------------------------------------------------
def test_plugin_is_registered_through_its_entry_point(pytestconfig):
    import kfqn.testing.plugin

    assert pytestconfig.pluginmanager.get_plugin("kfqn") is kfqn.testing.plugin


def test_fixtures_marker_and_device_option(pytester):
    pytester.makepyfile(test_fixtures=textwrap.dedent('''
        import torch
        from kfqn.testing import damping_contract
        from kfqn.updates import NoDamping

        test_none = damping_contract(NoDamping)

        def test_uses_fixtures(kfqn_device, kfqn_dtype):
            assert isinstance(kfqn_device, torch.device)
            assert kfqn_dtype in (torch.float32, torch.float64)
    '''))
    n_dev = 1 + int(torch.cuda.is_available())
    result = pytester.runpytest_inprocess("-q", "-p", "no:cacheprovider", "--collect-only",
                                          "-k", "uses_fixtures")
    result.stdout.fnmatch_lines(["*test_uses_fixtures[[]cpu-float32[]]*",
                                 f"{2 * n_dev}/{6 * n_dev} tests collected ({4 * n_dev} deselected)*"])
    result = pytester.runpytest_inprocess("-q", "-p", "no:cacheprovider", "--collect-only",
                                          "--kfqn-devices=cpu", "-m", "kfqn_contract")
    result.stdout.fnmatch_lines(["*test_none::test_postcondition_or_rejected[[]cpu-float32[]]*",
                                 "4/6 tests collected (2 deselected)*"])


# -- the test extra stays optional -------------------------------------------------------------
def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)


def test_kfqn_imports_without_the_test_extra():
    code = textwrap.dedent('''
        import sys
        sys.modules["hypothesis"] = None          # as if not installed
        import kfqn, kfqn.testing.plugin
        kfqn.default_registry().names("factor_update")
        assert "pytest" not in sys.modules, "kfqn imported pytest"
        try:
            from kfqn.testing import factor_update_contract
        except ImportError as exc:
            print(exc)
        else:
            raise SystemExit("kfqn.testing imported without hypothesis")
    ''')
    out = _python(code)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1 and "pip install kfqn[test]" in lines[0], out.stdout
