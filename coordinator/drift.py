"""MEERKAT-VP: spot clients whose steps stop carrying signal (extreme Non-IID) and limit them to 1 step.

For client k at local step t of a round with seeds s_1..s_T:

    c_t          = <grad_pretrain on the mask, z_t>        z_t = shared.prng.directions(s_t, nnz, dist)
    GradIP_{k,t} = g_{k,t} * c_t                           = <grad_pretrain, g_{k,t} z_t>  (the ZO step)

c_t depends on the seed only, so it is computed once per seed and cached (float64 dot product).

A single-label client's |GradIP| decays to ~0 (rho_later / rho_quie over its history: drift_decay.py).
Which decay rule acts is `decay_rule` (default "off", see drift_thresholds.py): "absolute" (the paper's)
flags a client when its update brings n >= min_steps with rho_later >= later_min and rho_quie >=
quie_min; "fleet" (drift_fleet.py) compares rho_later with the fleet's at round close; "off" measures
both and acts on neither. A divergence rule (drift_spike.py) flags an update whose |g| spikes. A flag is
sticky (the paper limits a drifting client for the rest of the run). `steps_for(client, T)` is what the
round scheduler puts into `RoundPlan.steps`: 1 for a flagged client, T otherwise. The client keeps its
data pointer, so it still sees all of its data, one batch per round.

In the coordinator the monitor owns c_t: `compute_gradip` gives the values stored with each update and
`observe_gradip` records them (no second projection); after a restart the history is rebuilt from the
logged GradIP and the flags from SQLite (`restore_limited`). It keeps only each client's first and last
window (`keep_history=False`): O(window) per observation however long the run.

One detector a module, all re-exported here (`from coordinator.drift import ...`):

    drift_decay.py       rho_later / rho_quie of a client's GradIP history; the "absolute" rule
    drift_fleet.py       rho_later against the round's fleet median at round close ("fleet")
    drift_spike.py       max |g| of an update against its round's median |g| (divergence)
    drift_thresholds.py  DriftThresholds: when each rule flags, and where each default comes from
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Iterable, Mapping, Sequence

import torch

from coordinator.drift_decay import DriftStats, drift_stats, early_mean, window_stats
from coordinator.drift_fleet import FleetDecayStats, fleet_decay_stats
from coordinator.drift_spike import SpikeStats, spike_stats
from coordinator.drift_thresholds import DECAY_RULES, DecayRule, DriftThresholds, Reason
from shared.prng import DISTS, Dist, directions

log = logging.getLogger(__name__)

LATE_ROUNDS = 64  # observe_round remembers this many round numbers (a round closes once; replays are ignored)
COEF_CACHE = 4096  # cached c_t values (seeds are fresh every round: only recent rounds are ever looked up)


class _History:
    """One client's GradIP values: all of them, or (compact) the first and last window plus the count."""

    def __init__(self, window: int, compact: bool) -> None:
        self.w, self.compact, self.n = window, compact, 0
        self.head: list[float] = []  # everything, or the first w values when compact
        self.tail: deque[float] = deque(maxlen=window)  # the last w values (compact only)
        self.stats_at: tuple[int, DriftStats | None] | None = None  # (n, drift_stats at n): computed once per n
        self.early: float | None = None  # early_mean of the first window, once it is full (it never changes)

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
        vals = [float(h) for h in gradip]
        if not all(map(math.isfinite, vals)):  # one C-level pass; the loop below only names the culprit
            t, h = next((t, h) for t, h in enumerate(vals) if not math.isfinite(h))
            raise ValueError(f"client {client!r} round {round}: gradip[{t}] is not finite: {h!r}")
        self._seen.setdefault(int(round), set()).add(client)
        hist = self._hist.get(client)
        if hist is None:
            hist = self._hist[client] = _History(self.thresholds.window, not self.keep_history)
        hist.extend(vals)
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
        DriftRecord via `stats`, ask for the same one): from the early mean, kept once the first window is
        full, and the last window (the same sums of the same values as drift_stats(h.values()))."""
        if h.stats_at is None or h.stats_at[0] != h.n:
            w = self.thresholds.window
            if h.n < 2 * w:
                st = None
            else:
                if h.early is None:
                    h.early = early_mean(h.head[:w], w)
                st = window_stats(h.early, h.tail if h.compact else h.head[-w:], self.thresholds, h.n)
            h.stats_at = (h.n, st)
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
    "DecayRule",
    "Reason",
    "DriftMonitor",
    "DriftStats",
    "DriftThresholds",
    "FleetDecayStats",
    "SpikeStats",
    "drift_stats",
    "fleet_decay_stats",
    "spike_stats",
]
