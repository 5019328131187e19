"""MEERKAT-VP decay detector: rho_later / rho_quie over one client's GradIP history (the "absolute" rule).

A client holding a single label fits its data quickly: its loss saturates, g shrinks and |GradIP| decays
to ~0, while a balanced client's GradIP keeps oscillating. Over the client's GradIP history h_1..h_n
(in observation order, rounds concatenated), with w = thresholds.window:

    early     = mean |h_1..h_w|           late = mean |h_{n-w+1}..h_n|
    rho_later = early / late              (large: the magnitude decayed)
    rho_quie  = share of the last w steps with |h| < quiet_ratio * early

Under decay_rule "absolute" (the paper's) a client is flagged when its update brings n >= min_steps with
rho_later >= later_min and rho_quie >= quie_min. rho_later is also what the fleet-relative rule compares
(coordinator/drift_fleet.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from coordinator.drift_thresholds import DriftThresholds


@dataclass(frozen=True)
class DriftStats:
    """One client's detection statistics at the moment they were computed."""

    n_steps: int
    early: float
    late: float
    rho_later: float  # inf when the late window is exactly 0 and the early one is not
    rho_quie: float
    flagged: bool  # by the "absolute" rule (always False under decay_rule "fleet" / "off")


def drift_stats(
    history: Sequence[float], th: DriftThresholds, n_steps: int | None = None
) -> DriftStats | None:
    """rho_later / rho_quie of a GradIP history; None while it is shorter than 2 * window.

    `n_steps`: the true history length when `history` holds only its first and last window (compact).
    """
    n = len(history) if n_steps is None else n_steps
    w = th.window
    if n < 2 * w:
        return None
    return window_stats(early_mean(history[:w], w), history[-w:], th, n)


def early_mean(first: Sequence[float], w: int) -> float:
    """`early`: the mean |h| of the first window (fixed once it is full: a history keeps it)."""
    return math.fsum([abs(h) for h in first]) / w


def window_stats(early: float, last: Sequence[float], th: DriftThresholds, n: int) -> DriftStats:
    """The statistics of a history of n >= 2 * window values from its `early` mean and its last window."""
    w = th.window
    mags = [abs(h) for h in last]
    late = math.fsum(mags) / w
    if late > 0:
        rho_later = early / late
    else:
        rho_later = math.inf if early > 0 else 1.0
    quiet = sum(1 for m in mags if m < th.quiet_ratio * early)
    rho_quie = quiet / w
    flagged = (
        th.decay_rule == "absolute" and n >= th.min_steps and rho_later >= th.later_min and rho_quie >= th.quie_min
    )
    return DriftStats(n, early, late, rho_later, rho_quie, flagged)
