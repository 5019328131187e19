"""shared/accountant.py against dp-accounting called directly, and the noise calibration's guarantee."""

from __future__ import annotations

import dp_accounting
import pytest
from dp_accounting import rdp

from shared.accountant import AccountingError, Spend, default_delta, epsilon, noise_multiplier


def _direct(q: float, sigma: float, steps: int, delta: float) -> float:
    acc = rdp.RdpAccountant()
    acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
    return float(acc.get_epsilon(delta))


@pytest.mark.parametrize(("q", "sigma", "steps", "delta"), [(0.05, 1.0, 100, 1e-5), (0.5, 3.0, 7, 1e-3), (1.0, 5.0, 1, 1e-6)])
def test_epsilon_equals_dp_accounting_directly(q: float, sigma: float, steps: int, delta: float) -> None:
    assert epsilon([Spend(q, sigma, steps)], delta) == _direct(q, sigma, steps, delta)


def test_composition_of_spends_equals_one_ledger() -> None:
    acc = rdp.RdpAccountant()
    acc.compose(dp_accounting.PoissonSampledDpEvent(0.1, dp_accounting.GaussianDpEvent(1.2)), 30)
    acc.compose(dp_accounting.PoissonSampledDpEvent(0.2, dp_accounting.GaussianDpEvent(2.0)), 10)
    got = epsilon([Spend(0.1, 1.2, 20), Spend(0.2, 2.0, 10), Spend(0.1, 1.2, 10)], 1e-5)
    assert got == pytest.approx(float(acc.get_epsilon(1e-5)), rel=1e-12)
    assert epsilon([], 1e-5) == 0.0 and epsilon([Spend(0.1, 1.0, 0)], 1e-5) == 0.0


@pytest.mark.parametrize("target", [2.0, 8.0])
def test_noise_multiplier_meets_the_target_tightly(target: float) -> None:
    sigma = noise_multiplier(target, 1e-5, 0.05, 200)
    assert _direct(0.05, sigma, 200, 1e-5) <= target
    assert _direct(0.05, sigma - 1e-2, 200, 1e-5) > target  # not wastefully large


def test_bad_parameters_are_named() -> None:
    with pytest.raises(AccountingError, match="delta"):
        epsilon([Spend(0.1, 1.0, 1)], 0.0)
    with pytest.raises(AccountingError, match="sampling rate"):
        Spend(1.5, 1.0, 1)
    with pytest.raises(AccountingError, match="planned steps"):
        noise_multiplier(1.0, 1e-5, 0.1, 0)
    assert default_delta(1000) == pytest.approx(1000**-1.1)
