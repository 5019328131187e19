"""MEERKAT-VP fleet-relative decay detector: a client's rho_later against its round's fleet.

Fleet-relative decay (decay_rule = "fleet"; BENCHMARKS.md "MEERKAT-VP: a fleet-relative decay rule").
On real runs GradIP decays for every device once the fleet has converged (the loss is low everywhere),
so the absolute rule flags converged ordinary devices. When a round closes, over the clients whose
update it received that are not limited and have n >= min_steps (at least fleet_min_clients of them):

    M_r          = median rho_later_j over those clients        (a decay the fleet shares raises M_r)
    ratio_{k,r}  = rho_later_k / M_r

ratio >= fleet_ratio flags client k (sticky, `steps_for` -> 1; its update stays in the aggregate;
RoundBook._check_fleet_decay). O(clients x window) per round, deterministic (sorted clients).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from coordinator.drift_decay import DriftStats
from coordinator.drift_thresholds import DriftThresholds


@dataclass(frozen=True)
class FleetDecayStats:
    """One client's fleet-relative decay statistic at the close of a round."""

    round: int
    rho_later: float  # the client's own early / late mean |GradIP| (DriftStats.rho_later)
    median: float  # median rho_later over the round's fleet (clients with >= min_steps, not limited)
    ratio: float  # rho_later / median (inf when the median is 0 and rho_later is not)
    n_steps: int
    flagged: bool


def fleet_decay_stats(round: int, stats: Mapping[str, DriftStats], th: DriftThresholds) -> dict[str, FleetDecayStats]:
    """Per client of `stats` (the round's fleet: its DriftStats, callers pass only clients with >=
    min_steps that are not limited): rho_later / the median rho_later of all of them; {} with fewer than
    th.fleet_min_clients. `flagged` when decay_rule is "fleet" and ratio >= fleet_ratio."""
    fleet = {c: s for c, s in stats.items() if s.n_steps >= th.min_steps}
    if len(fleet) < th.fleet_min_clients:
        return {}
    median = float(np.median(np.array([s.rho_later for s in fleet.values()], dtype=np.float64)))
    out = {}
    for client in sorted(fleet):
        s = fleet[client]
        if median > 0:
            ratio = s.rho_later / median
        else:
            ratio = math.inf if s.rho_later > 0 else 0.0
        flagged = th.decay_rule == "fleet" and ratio >= th.fleet_ratio
        out[client] = FleetDecayStats(int(round), s.rho_later, median, ratio, s.n_steps, flagged)
    return out
