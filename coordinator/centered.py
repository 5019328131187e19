"""Centred clipping of a round's per-step scalars: the coordinator's default aggregation rule ("centered").

Every client of a round shares its seeds, so g_{k,t} of all clients are estimates of ONE number (the
projected gradient along z_t). Per step t, over the contributors with T_k > t (a MEERKAT-VP-limited client's
path stopped after its last step, as in FedAvg):

    m_t   = median_k g_{k,t}                   (middle value; mean of the two middle ones for an even count)
    tau_t = center_clip_k * median_k |g_{k,t} - m_t|          (the MAD: a statistic one client moves by at most
                                                               one order statistic of the others)
    g'_{k,t} = min(max(g_{k,t}, m_t - tau_t), m_t + tau_t)     (each scalar clipped into the centred band)
    trust_k = (judged_k - clipped_k) / judged_k                (center_discount: the share of k's scalars that
                                                               had a band and were inside it; 1 when none had)
    G_t   = fsum_k w_k * g'_{k,t}, w_k from n_k * trust_k   (then exactly the FedAvg formula, docs/PROTOCOL.md §5.1)

center_clip_k 2 (the default): 2 MAD ~ 1.35 sigma of Gaussian values, Huber's tuning (~95 % of the mean's
efficiency), so a clean fleet loses little; one device moves G_t by at most its weight x tau_t, and a device
that sends outliers (scaled, flipped or offset g: its scalars leave the band) also loses their share of its
weight in that round: every scalar clipped, weight 0. The trust is per round (no state across rounds).

Only outliers move: a round where no scalar leaves its band is FedAvg bit for bit. With fewer than
MIN_CLIENTS values at a step nothing is clipped nor judged (two values are each exactly half their gap from
their median, inside any band with center_clip_k >= 1: a two-device fleet cannot tell which one is the
outlier) and the caller logs the fallback.

Karimireddy et al. 2021 clip around a momentum reference; the round's own coordinate median is the reference
here, so the rule needs no state across rounds (a replica or a restarted coordinator recomputes it from the
stored updates alone).

Late updates (another round's seeds, no band of their own): each scalar is clipped to +-`late_bound`, the
on-time contributors' center_clip_k x median |g| (`late_bound`), and its trust is the share inside that
bound, so a device cannot dodge the band by answering late.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

MIN_CLIENTS = 3  # fewer values at a step: no outlier can be told apart, nothing clipped (FedAvg)


def _median(xs: Sequence[float]) -> float:
    """np.median of float64 values: the middle one, or (a + b) / 2 of the two middle ones."""
    return float(np.median(np.asarray(xs, dtype=np.float64)))


def band(values: Sequence[float], k: float) -> tuple[float, float] | None:
    """(m - tau, m + tau) of one step's values (see module docstring); None below MIN_CLIENTS values."""
    if len(values) < MIN_CLIENTS:
        return None
    m = _median(values)
    tau = k * _median([abs(v - m) for v in values])
    return m - tau, m + tau


def clipped_steps(
    per_client: Mapping[str, Sequence[float]], T: int, k: float
) -> tuple[Mapping[str, Sequence[float]], int]:
    """Each client's scalars with every g_{k,t} clipped into its step's band (only the clipped clients'
    lists are new; `per_client` itself when nothing was clipped); and how many scalars were clipped."""
    got = clip_round(per_client, T, k)
    return got.values, sum(got.clipped.values())


@dataclass(frozen=True)
class Clipped:
    """What centred clipping did to one round's on-time scalars (`clip_round`)."""

    values: Mapping[str, Sequence[float]]  # each client's scalars, clipped into their bands
    clipped: Mapping[str, int]  # client -> how many of its scalars were outside their band
    judged: Mapping[str, int]  # client -> how many of its scalars had a band (>= MIN_CLIENTS values at the step)

    def trust(self, client: str) -> float:
        """The share of the client's judged scalars inside their bands: (judged - clipped) / judged, one
        float64 division; 1.0 when none was judged."""
        j = self.judged.get(client, 0)
        return (j - self.clipped.get(client, 0)) / j if j else 1.0


def clip_round(per_client: Mapping[str, Sequence[float]], T: int, k: float) -> Clipped:
    """Every g_{k,t} clipped into its step's band, counted per client. One numpy median pair per step and one
    clip over the (N, T) matrix (10,000 updates x T = 10: tens of ms): the same float64 medians, differences
    and comparisons as `band`, elementwise."""
    names = list(per_client)
    m = np.full((len(names), T), np.nan)  # (N, T); NaN = the client's path stopped before step t
    for i, c in enumerate(names):
        gs = per_client[c]
        m[i, : len(gs)] = gs
    present = ~np.isnan(m)  # (N, T)
    banded = present.sum(axis=0) >= MIN_CLIENTS  # (T,): the steps with a band
    lo, hi = np.full(T, -np.inf), np.full(T, np.inf)  # (T,): no band = nothing clipped
    for t in np.flatnonzero(banded).tolist():
        vals = m[present[:, t], t]
        med = float(np.median(vals))
        tau = k * float(np.median(np.abs(vals - med)))
        lo[t], hi[t] = med - tau, med + tau
    with np.errstate(invalid="ignore"):  # NaN compares False: a missing step is never clipped
        out = (m < lo) | (m > hi)  # (N, T)
    n_out = out.sum(axis=1)  # (N,)
    judged = dict(zip(names, present[:, banded].sum(axis=1).tolist(), strict=True))
    rows = np.flatnonzero(n_out).tolist()
    if not rows:
        return Clipped(per_client, {}, judged)
    fixed = np.minimum(np.maximum(m[rows], lo), hi)  # (R, T): min(max(g, lo), hi) per value, as `band`
    changed = {names[i]: fixed[j, : len(per_client[names[i]])].tolist() for j, i in enumerate(rows)}
    return Clipped({**per_client, **changed}, {names[i]: int(n_out[i]) for i in rows}, judged)


def late_bound(on_time: Mapping[str, Sequence[float]], k: float) -> float | None:
    """k x the median |g| over every on-time scalar of the round: the bound of a late update's scalars
    (None below MIN_CLIENTS on-time contributors: no bound, as FedAvg)."""
    if len(on_time) < MIN_CLIENTS:
        return None
    return k * _median([abs(g) for gs in on_time.values() for g in gs])


def clamp_all(per_client: Mapping[str, Sequence[float]], bound: float) -> Clipped:
    """Every scalar clipped to [-bound, +bound] (each one judged)."""
    return Clipped({c: [min(max(g, -bound), bound) for g in gs] for c, gs in per_client.items()},
                   {c: sum(1 for g in gs if not -bound <= g <= bound) for c, gs in per_client.items()},
                   {c: len(gs) for c, gs in per_client.items()})


def is_small(per_client: Mapping[str, Sequence[float]]) -> bool:
    """True when the round is too small for centred clipping to tell an outlier (it then is FedAvg)."""
    return len(per_client) < MIN_CLIENTS


FALLBACK_NOTE = {  # the book logs the fallback when it starts and when it ends (not every round)
    True: f"centred clipping needs {MIN_CLIENTS} to tell an outlier: plain FedAvg (bounded by the weight and |g| caps only)",
    False: "centred clipping again",
}


__all__ = ["FALLBACK_NOTE", "MIN_CLIENTS", "Clipped", "band", "clamp_all", "clip_round", "clipped_steps", "is_small",
           "late_bound"]
