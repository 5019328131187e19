"""MEERKAT-VP: spot clients whose steps stop carrying signal (extreme Non-IID) and limit them to 1 step.

For client k at local step t of a round with seeds s_1..s_T:

    c_t          = <grad_pretrain on the mask, z_t>        z_t = shared.prng.directions(s_t, nnz, dist)
    GradIP_{k,t} = g_{k,t} * c_t                           = <grad_pretrain, g_{k,t} z_t>  (the ZO step)

c_t depends on the seed only, so it is computed once per seed and cached (float64 dot product).
A client holding a single label fits its data quickly: its loss saturates, g shrinks and |GradIP| decays
to ~0, while a balanced client's GradIP keeps oscillating. Over the client's GradIP history h_1..h_n
(in observation order, rounds concatenated), with w = thresholds.window:

    early     = mean |h_1..h_w|           late = mean |h_{n-w+1}..h_n|
    rho_later = early / late              (large: the magnitude decayed)
    rho_quie  = share of the last w steps with |h| < quiet_ratio * early

Which decay rule acts is `decay_rule` (default "off", see "Defaults"): "absolute" (the paper's) flags a
client when its update brings n >= min_steps with rho_later >= later_min and rho_quie >= quie_min;
"fleet" (below, "Fleet-relative decay") compares rho_later with the fleet's at round close; "off"
measures both and acts on neither. A flag is sticky (the paper limits a drifting client for the rest
of the run). `steps_for(client, T)` is what the
round scheduler puts into `RoundPlan.steps`: 1 for a flagged client, T otherwise. The client keeps its
data pointer, so it still sees all of its data, one batch per round.

In the coordinator the monitor owns c_t: `compute_gradip` gives the values stored with each update and
`observe_gradip` records them (no second projection); after a restart the history is rebuilt from the
logged GradIP and the flags from SQLite (`restore_limited`). It keeps only each client's first and last
window (`keep_history=False`): O(window) per observation however long the run.

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

Fleet-relative decay (decay_rule = "fleet"; BENCHMARKS.md "MEERKAT-VP: a fleet-relative decay rule").
On real runs GradIP decays for every device once the fleet has converged (the loss is low everywhere),
so the absolute rule flags converged ordinary devices. When a round closes, over the clients whose
update it received that are not limited and have n >= min_steps (at least fleet_min_clients of them):

    M_r          = median rho_later_j over those clients        (a decay the fleet shares raises M_r)
    ratio_{k,r}  = rho_later_k / M_r

ratio >= fleet_ratio flags client k (sticky, `steps_for` -> 1; its update stays in the aggregate;
RoundBook._check_fleet_decay). O(clients x window) per round, deterministic (sorted clients).

Defaults. decay_rule = "off": replayed offline through this monitor on the recorded probe runs
(`bench/learning/vp_replay.py`), no threshold separates. The absolute rule flags only converged
devices (held-out seed 0: 1 true, 6 false). The fleet ratio of the devices that hurt (single-label, or
first to diverge) on tuning seed 100 stays at most 1.66 with the spike rule on, below the converged
ordinary devices' 2.04; with the spike rule off they reach 2.53 / 4.45 only after the fleet collapsed.
fleet_ratio = 3.0 (for "fleet" when an operator turns it on) lies above every ordinary device's ratio
on seeds 100 (2.04) and 0 (2.37); fleet_min_clients = 5 is a choice, not calibrated (a median of fewer
is one or two devices' value). The absolute rule's thresholds come from synthetic sequences
(tests/learning/test_drift.py), NOT from real runs: on the tiny models they flag nobody where it matters (BENCHMARKS.md, "MEERKAT-VP: why the extreme
split collapses": the harmful devices' |g| GROWS). spike_ratio = 15 was chosen on tuning seed 100 only
(`small`, topic, T = 10, budget 100, extreme and Dirichlet, lr 1e-2 and 5e-3; BENCHMARKS.md "MEERKAT-VP:
a divergence detector"): updates of rounds before any device diverged reached at most 9.8x, the first
diverging device 29.7x (extreme) and 39.1x (Dirichlet); 15 lies between (geometric mean of 9.8 and 29.7:
17). What it does on held-out seeds, and what it does not fix (at lr 1e-2 the whole fleet diverges a few
rounds later), is in the same section. Override the thresholds for another model/task.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Literal

import numpy as np
import torch

from shared.prng import DISTS, Dist, directions

log = logging.getLogger(__name__)

Reason = Literal["decay", "spike"]
DecayRule = Literal["fleet", "absolute", "off"]
DECAY_RULES: tuple[DecayRule, ...] = ("fleet", "absolute", "off")
LATE_ROUNDS = 64  # observe_round remembers this many round numbers (a round closes once; replays are ignored)
COEF_CACHE = 4096  # cached c_t values (seeds are fresh every round: only recent rounds are ever looked up)


@dataclass(frozen=True)
class DriftThresholds:
    """When a client is flagged (decay and spike rules). Where each default comes from: the module doc."""

    window: int = 20  # steps in the early and in the late window (10 is too noisy: c_t alone varies ~3x)
    min_steps: int = 40  # observed steps before a client can be flagged (>= 2 * window)
    later_min: float = 3.0  # rho_later must reach this (early magnitude / late magnitude)
    quiet_ratio: float = 0.25  # a step is quiet when |GradIP| < quiet_ratio * early mean
    quie_min: float = 0.6  # share of quiet steps in the late window needed to flag
    # divergence (the module doc, "Divergence"): max |g| of an update / median |g| of its round's updates
    spike_ratio: float = 15.0  # flag (and leave out of that round's aggregate) at this ratio; 0 = off
    spike_min_updates: int = 5  # updates a round needs before its median means anything (module doc)
    # decay, which rule (the module doc, "Fleet-relative decay"): "fleet" = rho_later against the fleet's
    # median at round close; "absolute" = the paper's later_min / quie_min per update; "off" = measured only
    decay_rule: DecayRule = "off"  # no threshold separated on real runs (module doc): measured, never acted on
    fleet_ratio: float = 3.0  # "fleet": flag at rho_later >= fleet_ratio x the median rho_later of the round
    fleet_min_clients: int = 5  # "fleet": clients with >= min_steps (not limited) a round needs

    def __post_init__(self) -> None:
        if self.decay_rule not in DECAY_RULES:
            raise ValueError(f"DriftThresholds.decay_rule: expected one of {DECAY_RULES}, got {self.decay_rule!r}")
        if (
            isinstance(self.fleet_min_clients, bool)
            or not isinstance(self.fleet_min_clients, int)
            or self.fleet_min_clients < 2
        ):
            raise ValueError(
                f"DriftThresholds.fleet_min_clients: expected an int >= 2, got {self.fleet_min_clients!r}"
            )
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 1:
            raise ValueError(f"DriftThresholds.window: expected an int >= 1, got {self.window!r}")
        if (
            isinstance(self.min_steps, bool)
            or not isinstance(self.min_steps, int)
            or self.min_steps < 2 * self.window
        ):
            raise ValueError(
                f"DriftThresholds.min_steps: expected an int >= 2 * window = {2 * self.window}, got {self.min_steps!r}"
            )
        if (
            isinstance(self.spike_min_updates, bool)
            or not isinstance(self.spike_min_updates, int)
            or self.spike_min_updates < 2
        ):
            raise ValueError(
                f"DriftThresholds.spike_min_updates: expected an int >= 2, got {self.spike_min_updates!r}"
            )
        for name, lo, hi in (
            ("later_min", 1.0, math.inf),
            ("quiet_ratio", 0.0, 1.0),
            ("quie_min", 0.0, 1.0),
            ("spike_ratio", 0.0, math.inf),
            ("fleet_ratio", 1.0, math.inf),
        ):
            v = getattr(self, name)
            if (
                isinstance(v, bool)
                or not isinstance(v, (int, float))
                or not math.isfinite(v)
                or not lo <= v <= hi
            ):
                raise ValueError(
                    f"DriftThresholds.{name}: expected a finite number in [{lo}, {hi}], got {v!r}"
                )
        if 0 < self.spike_ratio < 1:
            raise ValueError(f"DriftThresholds.spike_ratio: expected 0 (off) or >= 1, got {self.spike_ratio!r}")


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
    mags = [abs(h) for h in history]
    early = math.fsum(mags[:w]) / w
    late = math.fsum(mags[-w:]) / w
    if late > 0:
        rho_later = early / late
    else:
        rho_later = math.inf if early > 0 else 1.0
    quiet = sum(1 for m in mags[-w:] if m < th.quiet_ratio * early)
    rho_quie = quiet / w
    flagged = (
        th.decay_rule == "absolute" and n >= th.min_steps and rho_later >= th.later_min and rho_quie >= th.quie_min
    )
    return DriftStats(n, early, late, rho_later, rho_quie, flagged)


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


class _History:
    """One client's GradIP values: all of them, or (compact) the first and last window plus the count."""

    def __init__(self, window: int, compact: bool) -> None:
        self.w, self.compact, self.n = window, compact, 0
        self.head: list[float] = []  # everything, or the first w values when compact
        self.tail: deque[float] = deque(maxlen=window)  # the last w values (compact only)
        self.stats_at: tuple[int, DriftStats | None] | None = None  # (n, drift_stats at n): computed once per n

    def extend(self, values: Iterable[float]) -> None:
        vals = list(values)
        self.n += len(vals)
        if not self.compact:
            self.head += vals
            return
        if len(self.head) < self.w:
            self.head += vals[: self.w - len(self.head)]
        self.tail.extend(vals)  # maxlen w: keeps the last w

    def values(self) -> list[float]:
        """What drift_stats needs: every value, or first + last window (disjoint once n >= 2w)."""
        if not self.compact:
            return list(self.head)
        if self.n <= 2 * self.w:
            return self.head + list(self.tail)[len(self.head) + len(self.tail) - self.n :]
        return self.head + list(self.tail)


class DriftMonitor:
    """GradIP per client per step, rho statistics, and the set of clients limited to one local step."""

    def __init__(
        self,
        grad_on_mask: torch.Tensor,
        dist: Dist = "rademacher",
        thresholds: DriftThresholds | None = None,
        *,
        keep_history: bool = True,
    ) -> None:
        """keep_history=False (the coordinator: runs forever) keeps only each client's first and last
        window and its step count: O(window) memory and work per observation instead of O(history)."""
        if not isinstance(grad_on_mask, torch.Tensor) or grad_on_mask.dim() != 1:
            raise ValueError(
                "grad_on_mask must be a 1-D tensor: the mask's mean pre-training gradient, flat order"
            )
        if not bool(torch.isfinite(grad_on_mask).all()):
            raise ValueError("grad_on_mask has NaN or inf")
        if dist not in DISTS:
            raise ValueError(f"dist must be one of {DISTS}, got {dist!r}")
        self.grad = grad_on_mask.detach().to("cpu", torch.float64)  # (nnz,)
        self.dist: Dist = dist
        self.thresholds = thresholds or DriftThresholds()
        self._coef: dict[int, float] = {}
        self._round_seeds: tuple[int, ...] | None = None  # compute_gradip: the seeds of the last call...
        self._round_coefs: list[float] = []  # ...and their coefficients (a prefix)
        self.keep_history = keep_history
        self._hist: dict[str, _History] = {}
        self._seen: dict[int, set[str]] = {}  # round -> clients observed in it (dedupe; forget_before drops rounds)
        self._limited: dict[str, int] = {}  # client -> round in which it was flagged
        self._reason: dict[str, Reason] = {}  # client -> why (not persisted: restored flags have none)
        self._spikes: dict[str, list[SpikeStats]] = {}  # client -> its spike statistics (last one unless keep_history)
        self._spike_rounds: deque[int] = deque(maxlen=LATE_ROUNDS)  # rounds observed by observe_round (dedupe)
        self._fleet: dict[str, FleetDecayStats] = {}  # client -> its last fleet-relative decay statistic
        self._fleet_rounds: deque[int] = deque(maxlen=LATE_ROUNDS)  # rounds checked by observe_fleet (dedupe)

    @classmethod
    def from_mask(
        cls, mask: object, dist: Dist = "rademacher", thresholds: DriftThresholds | None = None
    ) -> DriftMonitor:
        """Monitor for a `shared.maskfile.Mask`; raises ValueError when the mask carries no gradient."""
        flat = getattr(mask, "flat_grad", None)
        g = flat() if callable(flat) else None
        if not isinstance(g, torch.Tensor):
            raise ValueError("this mask has no mean pre-training gradient (grad.*): MEERKAT-VP needs one")
        return cls(g, dist, thresholds)

    def coefficient(self, seed: int) -> float:
        """c = <grad_pretrain on the mask, z(seed)> in float64, cached per seed (the newest COEF_CACHE)."""
        c = self._coef.get(seed)
        if c is None:
            z = directions(int(seed), int(self.grad.numel()), self.dist).to(torch.float64)  # (nnz,)
            c = float(torch.dot(self.grad, z))
            if len(self._coef) >= COEF_CACHE:
                del self._coef[next(iter(self._coef))]  # oldest insertion first
            self._coef[seed] = c
        return c

    def compute_gradip(self, seeds: Sequence[int], grads: Sequence[float]) -> list[float]:
        """GradIP_t = g_t * c_t of one update (step t used seeds[t]; a limited client sends fewer grads)."""
        if len(grads) > len(seeds):
            raise ValueError(f"{len(grads)} grads but only {len(seeds)} seeds")
        if not isinstance(seeds, tuple):
            return [float(g) * self.coefficient(s) for s, g in zip(seeds, grads, strict=False)]
        if seeds is not self._round_seeds:  # every update of a round passes the plan's one seeds tuple
            self._round_seeds, self._round_coefs = seeds, []
        coefs = self._round_coefs  # c_t of seeds[:len(coefs)], filled as far as an update needs
        while len(coefs) < len(grads):
            coefs.append(self.coefficient(seeds[len(coefs)]))
        return [float(g) * c for g, c in zip(grads, coefs, strict=False)]

    def observe(
        self, client: str, round: int, seeds: Sequence[int], grads: Sequence[float]
    ) -> DriftStats | None:
        """Record client's projected gradients g_1..g_Tk of `round` (step t used seeds[t]); re-flag.

        Returns the statistics when this observation flagged the client, else None. A second report for
        the same (client, round) is ignored (replays after a restart are harmless).
        """
        if len(grads) > len(seeds):
            raise ValueError(
                f"client {client!r} round {round}: {len(grads)} grads but only {len(seeds)} seeds"
            )
        for t, g in enumerate(grads):
            if not math.isfinite(g):
                raise ValueError(f"client {client!r} round {round}: grads[{t}] is not finite: {g!r}")
        if client in self._seen.get(int(round), ()):
            log.debug("drift: client %s round %d already observed; ignored", client, round)
            return None
        return self.observe_gradip(client, round, self.compute_gradip(seeds, grads))

    def observe_gradip(self, client: str, round: int, gradip: Sequence[float]) -> DriftStats | None:
        """Record already computed GradIP values of (client, round); same contract as `observe`."""
        if client in self._seen.get(int(round), ()):
            log.debug("drift: client %s round %d already observed; ignored", client, round)
            return None
        for t, h in enumerate(gradip):
            if not math.isfinite(h):
                raise ValueError(f"client {client!r} round {round}: gradip[{t}] is not finite: {h!r}")
        self._seen.setdefault(int(round), set()).add(client)
        hist = self._hist.setdefault(client, _History(self.thresholds.window, not self.keep_history))
        hist.extend(float(h) for h in gradip)
        if client in self._limited:
            return None
        st = self._stats_of(hist)
        if st is None or not st.flagged:
            return None
        self._limited[client] = int(round)
        self._reason[client] = "decay"
        log.debug("drift: client %s flagged in round %d (rho_later %.3g, rho_quie %.2f, %d steps)",
                  client, round, st.rho_later, st.rho_quie, st.n_steps)  # fmt: skip
        return st

    def observe_round(self, round: int, updates: Mapping[str, Sequence[float]]) -> dict[str, SpikeStats]:
        """The divergence check of one closing round: `updates` = client -> its grads g_1..g_Tk (the
        updates the round would aggregate). Records every client's SpikeStats and flags (sticky, like the
        decay rule) each client whose ratio reaches spike_ratio; returns the statistics of the flagged
        updates, already-limited clients included (the caller leaves all of them out of the aggregate).
        A second call for the same round returns {} and changes nothing."""
        if int(round) in self._spike_rounds:
            log.debug("drift: round %d already checked for spikes; ignored", round)
            return {}
        self._spike_rounds.append(int(round))
        stats = spike_stats(round, updates, self.thresholds)
        out = {}
        for client, st in stats.items():
            hist = self._spikes.setdefault(client, [])
            if not self.keep_history:
                hist.clear()
            hist.append(st)
            if not st.flagged:
                continue
            out[client] = st
            if client not in self._limited:
                self._limited[client] = int(round)
                self._reason[client] = "spike"
                log.debug("drift: client %s flagged in round %d (max |g| %.3g = %.1fx the round median %.3g)",
                          client, round, st.peak, st.ratio, st.median)  # fmt: skip
        return out

    def observe_fleet(self, round: int, clients: Iterable[str]) -> dict[str, FleetDecayStats]:
        """The fleet-relative decay check of one closing round over `clients` (those whose update the round
        received; their GradIP already observed): the fleet is those of them not limited with >= min_steps
        values. Records each one's FleetDecayStats, flags (sticky) each one whose rho_later reaches
        fleet_ratio x the fleet's median under decay_rule "fleet", and returns the flagged ones' statistics.
        O(clients x window). A second call for the same round returns {} and changes nothing."""
        if int(round) in self._fleet_rounds:
            log.debug("drift: round %d already checked for fleet decay; ignored", round)
            return {}
        self._fleet_rounds.append(int(round))
        stats = {}
        for client in sorted(set(clients)):
            st = None if client in self._limited else self.stats(client)
            if st is not None:
                stats[client] = st
        out = {}
        for client, fs in fleet_decay_stats(round, stats, self.thresholds).items():
            self._fleet[client] = fs
            if fs.flagged and client not in self._limited:
                out[client] = fs
                self._limited[client] = int(round)
                self._reason[client] = "decay"
                log.debug("drift: client %s flagged in round %d (rho_later %.3g = %.2fx the fleet median %.3g)",
                          client, round, fs.rho_later, fs.ratio, fs.median)  # fmt: skip
        return out

    def fleet(self, client: str) -> FleetDecayStats | None:
        """The client's last fleet-relative decay statistic (None before its first full window in a checked round)."""
        return self._fleet.get(client)

    def spikes(self, client: str) -> list[SpikeStats]:
        """The client's SpikeStats per checked round, oldest first (without keep_history: the last one)."""
        return list(self._spikes.get(client, ()))

    def reason(self, client: str) -> Reason | None:
        """Why `client` is limited in this process ("decay" | "spike"); None when not, or restored."""
        return self._reason.get(client)

    def restore_limited(self, client: str, round: int) -> None:
        """Mark `client` limited since `round` (a flag persisted before a restart; flags are sticky)."""
        self._limited.setdefault(client, int(round))

    def gradip(self, client: str) -> list[float]:
        """The client's GradIP values in observation order (a copy; without keep_history: first + last window)."""
        h = self._hist.get(client)
        return [] if h is None else h.values()

    def restore_steps(self, client: str, n_steps: int) -> None:
        """After a restart from a pruned log (retention keeps each client's first and last `window` updates
        with GradIP, not the middle): the logged step count, so n and the statistics are as before."""
        h = self._hist.get(client)
        if h is not None and h.compact and n_steps > h.n:
            h.n = n_steps

    def forget_before(self, round: int) -> None:
        """Forget the (client, round) observation keys of rounds < round (the round book no longer
        accepts updates for them): the key set stays O(clients x late window), not O(history)."""
        for r in [r for r in self._seen if r < round]:
            del self._seen[r]

    def steps_seen(self, client: str) -> int:
        """Number of GradIP values observed for `client`."""
        h = self._hist.get(client)
        return 0 if h is None else h.n

    def stats(self, client: str) -> DriftStats | None:
        h = self._hist.get(client)
        return None if h is None else self._stats_of(h)

    def _stats_of(self, h: _History) -> DriftStats | None:
        """drift_stats of a history, computed once per value count (observe_gradip, then the coordinator's
        DriftRecord via `stats`, ask for the same one)."""
        if h.stats_at is None or h.stats_at[0] != h.n:
            h.stats_at = (h.n, drift_stats(h.values(), self.thresholds, h.n))
        return h.stats_at[1]

    def limited(self) -> set[str]:
        """Clients flagged so far (they run 1 local step per round)."""
        return set(self._limited)

    def flagged_round(self, client: str) -> int | None:
        return self._limited.get(client)

    def steps_for(self, client: str, T: int) -> int:
        """Local steps to plan for `client`: 1 when limited, else T."""
        return 1 if client in self._limited else T

    def clients(self) -> Iterable[str]:
        return sorted(self._hist)


__all__ = [
    "DECAY_RULES",
    "DriftMonitor",
    "DriftStats",
    "DriftThresholds",
    "FleetDecayStats",
    "SpikeStats",
    "drift_stats",
    "fleet_decay_stats",
    "spike_stats",
]
