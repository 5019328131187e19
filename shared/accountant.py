"""Privacy accounting with Google's `dp-accounting` (RDP): epsilon after k noisy steps, and the noise for a target.

A device's DP step (shared/dp.py) is the sampled Gaussian mechanism: each local example joins the step's
batch independently with probability q = B / n (Poisson sampling, exactly how `shared.dp.poisson_sample`
draws it), the clipped per-example scalars are summed (sensitivity C under add/remove-one), and
N(0, (sigma C)^2) is added. One step is therefore `PoissonSampledDpEvent(q, GaussianDpEvent(sigma))`;
a device's whole history is the composition of those events, one `Spend` (q, sigma, steps) per
distinct (q, sigma). The RDP accountant (Mironov et al. 2019) converts it to (epsilon, delta).

`epsilon` and `noise_multiplier` are thin: the tests check them against dp-accounting called directly.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass

log = logging.getLogger(__name__)

# dp-accounting logs (through absl) a WARNING for each fractional RDP order whose series does not converge
# and leaves that order out: the bound stays valid, the warning is noise on every device heartbeat
logging.getLogger("absl").setLevel(logging.ERROR)


class AccountingError(ValueError):
    """Parameters no accountant can take (q outside (0, 1], sigma < 0, delta outside (0, 1)...)."""


@dataclass(frozen=True)
class Spend:
    """`steps` steps of the sampled Gaussian mechanism with sampling rate q and noise multiplier sigma."""

    q: float
    sigma: float
    steps: int

    def __post_init__(self) -> None:
        if not (0.0 < self.q <= 1.0):
            raise AccountingError(f"Spend.q: sampling rate must be in (0, 1], got {self.q!r}")
        if not (math.isfinite(self.sigma) and self.sigma > 0.0):
            raise AccountingError(f"Spend.sigma: noise multiplier must be a finite float > 0, got {self.sigma!r}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            raise AccountingError(f"Spend.steps: must be an int >= 0, got {self.steps!r}")


def _check_delta(delta: float) -> None:
    if not (0.0 < delta < 1.0):
        raise AccountingError(f"delta must be in (0, 1), got {delta!r}")


def default_delta(n: int) -> float:
    """1 / n^1.1: below 1/n (a mechanism that publishes one random example meets delta = 1/n)."""
    if n < 2:
        raise AccountingError(f"default delta needs n >= 2 local examples, got {n}")
    return math.pow(n, -1.1)


def epsilon(spends: Iterable[Spend], delta: float) -> float:
    """epsilon at `delta` of the composition of every spend (0.0 for none)."""
    import dp_accounting
    from dp_accounting import rdp

    _check_delta(delta)
    acc = rdp.RdpAccountant()
    any_step = False
    for s in spends:
        if s.steps:
            acc.compose(dp_accounting.PoissonSampledDpEvent(s.q, dp_accounting.GaussianDpEvent(s.sigma)), s.steps)
            any_step = True
    return float(acc.get_epsilon(delta)) if any_step else 0.0


@functools.lru_cache(maxsize=64)
def noise_multiplier(target_epsilon: float, delta: float, q: float, steps: int) -> float:
    """The smallest sigma (within 1e-4) whose `steps` steps at sampling rate q stay within target_epsilon."""
    import dp_accounting
    from dp_accounting import mechanism_calibration, rdp

    _check_delta(delta)
    if not (math.isfinite(target_epsilon) and target_epsilon > 0):
        raise AccountingError(f"target epsilon must be a finite float > 0, got {target_epsilon!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise AccountingError(f"planned steps must be an int >= 1, got {steps!r}")
    Spend(q, 1.0, steps)  # validates q

    def event(sigma: float) -> dp_accounting.DpEvent:
        return dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)

    sigma = mechanism_calibration.calibrate_dp_mechanism(
        rdp.RdpAccountant, event, target_epsilon, delta,
        mechanism_calibration.LowerEndpointAndGuess(1e-2, 1.0), tol=1e-4,
    )  # fmt: skip
    # the bisection returns a point within tol of the boundary on the SAFE side; check it, never trust it blindly
    sigma = float(sigma)
    for _ in range(100):
        if epsilon([Spend(q, sigma, steps)], delta) <= target_epsilon:
            return sigma
        sigma += 1e-4
    raise AccountingError(f"no noise multiplier found for epsilon {target_epsilon} at delta {delta}, q {q}, {steps} steps")


__all__ = ["AccountingError", "Spend", "default_delta", "epsilon", "noise_multiplier"]
