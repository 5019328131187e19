"""MEERKAT-VP divergence detector: an update whose |g| spikes against its round's median.

Divergence (the second rule; BENCHMARKS.md "MEERKAT-VP: a divergence detector"). On real data the
devices that hurt the fleet do not decay: one diverges inside its own T local steps (too large lr x T for
where the aggregate put the model) and its |g| spikes while everyone else's stays put. When a round
closes, over the updates it would aggregate (at least spike_min_updates of them):

    m_r        = median |g_{j,t}| over every local step t of every update j of round r
    ratio_{k,r} = max_t |g_{k,t}| / m_r

ratio >= spike_ratio flags client k (sticky, `steps_for` -> 1, as for decay) and its update is left out
of round r's aggregate (RoundBook._check_spikes; left out also when k was limited already; a round whose
every update spiked keeps them all). GradIP = g x c(seed) with c the same for every device of a round,
so this is the GradIP ratio up to c_t's spread over the steps: |g| is used directly. The median is the
round's own, so a fleet-wide rise (everyone overshooting together) flags nobody: only outliers.
Limitation: when most updates of a round decayed (a majority of single-label devices at ~0 |g|), the
median is theirs and an ordinary device can look like a spike. The same holds for tiny fleets, hence
spike_min_updates = 5 (a choice, not calibrated; the calibration runs had 10 updates a round, so it does
not change them): at 3, a fleet of 3 with one decayed device (tests/coordinator/test_retention.py's) had
its two healthy devices flagged. A round with fewer updates gets no divergence check (the |g| cap of
`aggregate` still applies).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import chain

import numpy as np

from coordinator.drift_thresholds import DriftThresholds


@dataclass(frozen=True)
class SpikeStats:
    """One update's divergence statistic: its largest |g| against the median |g| of its round."""

    round: int
    peak: float  # max |g_t| over the update's local steps
    median: float  # median |g| over every local step of every update of the round
    ratio: float  # peak / median (inf when the median is 0 and the peak is not)
    flagged: bool


def spike_stats(round: int, updates: Mapping[str, Sequence[float]], th: DriftThresholds) -> dict[str, SpikeStats]:
    """Per client: peak |g| / the round's median |g|; {} when fewer than th.spike_min_updates updates
    (or no grads) came in. `flagged` when spike_ratio > 0 and ratio >= spike_ratio.

    One numpy pass over the round's grads (10,000 updates at a close: ~70 -> ~15 ms): the same float64
    |g|, median, peaks and IEEE divisions as a loop per client, so the same values."""
    if len(updates) < th.spike_min_updates:
        return {}
    clients = sorted(updates)
    lens = np.fromiter((len(updates[c]) for c in clients), np.int64, len(clients))  # (K,)
    flat = np.fromiter(chain.from_iterable(updates[c] for c in clients), np.float64, int(lens.sum()))
    mags = np.abs(flat)  # (sum T_k,)
    if mags.size == 0:
        return {}
    median = float(np.median(mags))
    peaks = np.zeros(len(clients))  # (K,) an update without grads has peak 0.0
    has = lens > 0
    starts = np.cumsum(lens) - lens
    peaks[has] = np.maximum.reduceat(mags, starts[has])  # a segment runs to the next non-empty one's start
    if median > 0:
        ratios = (peaks / median).tolist()
    else:
        ratios = [math.inf if p > 0 else 0.0 for p in peaks.tolist()]
    on, cut, r = th.spike_ratio > 0, th.spike_ratio, int(round)
    return {
        c: SpikeStats(r, p, median, q, on and q >= cut)
        for c, p, q in zip(clients, peaks.tolist(), ratios, strict=True)
    }
