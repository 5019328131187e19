"""MEERKAT-VP as the book applies it: GradIP per update, the three drift rules, and the limit decisions
they make, as durable records. No I/O, no clock (`now` is an argument).

The `DriftMonitor` (coordinator/drift.py) measures; this policy decides what the round book does with
the measures: limit a client to one local step from the next plan (`steps_for`), leave a spiked update
out of its round's aggregate (`at_close`), and log each decision (`LimitRecord` + an `EventRecord`).
With drift_control off the monitor still measures (the statistics are logged) but nothing is limited.

    vp = DriftPolicy(monitor, control=True)
    vp.restore(recovered)                       # flags and GradIP from the log, re-flags kept for start()
    records = vp.observe("c1", 3, vp.gradip(plan, grads), now, next_round=5)
    records, kept = vp.at_close(3, updates, now, next_round=4)
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from coordinator.actions import Recovered
from coordinator.config import CoordinatorConfig
from coordinator.drift import DriftMonitor, DriftStats
from coordinator.records import DriftRecord, EventRecord, LimitRecord, PlanRow, Record, UpdateRow
from shared.maskfile import Mask

log = logging.getLogger(__name__)


class DriftPolicy:
    """The MEERKAT-VP decisions over an optional monitor (None: no mask gradient, nothing measured)."""

    def __init__(self, monitor: DriftMonitor | None, control: bool) -> None:
        self.monitor = monitor
        self.on = control and monitor is not None  # drift_control with something to control with
        self._reflagged: list[tuple[str, int, DriftStats]] = []

    def restore(self, rec: Recovered) -> None:
        """Replay the logged flags, GradIP and step counts into the monitor; a client the replay flags
        anew (the thresholds changed since its update was logged) is decided at `start`."""
        drift = self.monitor
        if drift is None:
            return
        if self.on:
            for client, r in rec.limited.items():
                drift.restore_limited(client, r)
        for client, r, gradip in rec.gradip:
            st = drift.observe_gradip(client, r, gradip)
            if st is not None and self.on:
                self._reflagged.append((client, r, st))
        for client, n in rec.drift_steps.items():  # a pruned log has fewer GradIP rows than steps seen
            drift.restore_steps(client, n)

    def start(self, now: float, next_round: int) -> list[Record]:
        """The records of the re-flags found by `restore` (once)."""
        out: list[Record] = []
        for client, r, st in self._reflagged:
            out += self._limit(client, r, st, now, next_round)
        self._reflagged = []
        return out

    def limited(self) -> set[str]:
        """Clients MEERKAT-VP limits to one local step (empty with drift_control off)."""
        return self.monitor.limited() if self.on and self.monitor is not None else set()

    def steps_for(self, client: str, T: int) -> int:
        """T, or 1 for a client MEERKAT-VP limited (it keeps its data pointer: all its data is still seen)."""
        return self.monitor.steps_for(client, T) if self.on and self.monitor is not None else T

    def gradip(self, plan: PlanRow, grads: Sequence[float]) -> list[float] | None:
        """g_{k,t} * c_t with c_t = <mean pre-training gradient on the mask, z_t>; None without a monitor."""
        if self.monitor is None:
            return None
        if plan.dist != self.monitor.dist:
            log.warning("round %d ran with dist %s, the drift monitor uses %s: no GradIP", plan.round, plan.dist,
                        self.monitor.dist)  # fmt: skip
            return None
        return self.monitor.compute_gradip(plan.seeds, grads)

    def observe(self, client: str, round: int, gradip: list[float], now: float, next_round: int) -> list[Record]:
        """Feed the monitor, the client's statistics as a record, and a new limit decision's records."""
        assert self.monitor is not None
        flagged = self.monitor.observe_gradip(client, round, gradip)
        st = flagged or self.monitor.stats(client)
        if st is None:
            rec = DriftRecord(client, self.monitor.steps_seen(client), None, None, None, None, now)
        else:
            rec = DriftRecord(client, st.n_steps, st.early, st.late, st.rho_later, st.rho_quie, now)
        out: list[Record] = [rec]
        if flagged is not None and self.on:
            out += self._limit(client, round, flagged, now, next_round)
        return out

    def at_close(
        self, round: int, ups: list[UpdateRow], now: float, next_round: int
    ) -> tuple[list[Record], list[UpdateRow]]:
        """The two rules checked when a round closes (spike, then fleet decay): their records and the
        updates left for the aggregate. Nothing without a monitor."""
        if self.monitor is None:
            return [], ups
        out, keep = self._check_spikes(round, ups, now, next_round)
        return out + self._check_fleet_decay(round, ups, now, next_round), keep

    def forget_before(self, round: int) -> None:
        if self.monitor is not None:
            self.monitor.forget_before(round)

    def _check_spikes(
        self, round: int, ups: list[UpdateRow], now: float, next_round: int
    ) -> tuple[list[Record], list[UpdateRow]]:
        """The divergence rule at close: an update whose max |g| is spike_ratio x the round's median |g| flags
        its client (1 local step from the next plan, sticky) and is left out of this round's aggregate (it
        stays `accepted` in the log with no used_in). Acts only with drift_control; a round where every
        update spiked keeps them all (no outlier to leave out)."""
        assert self.monitor is not None
        was = self.monitor.limited()
        spiked = self.monitor.observe_round(round, {u.client: u.grads for u in ups})
        if not spiked or not self.on:
            return [], ups
        keep = [u for u in ups if u.client not in spiked]
        if not keep:
            log.warning("round %d: every update spiked (%d): none left out", round, len(ups))
            keep = ups
        out: list[Record] = []
        for client in sorted(spiked):
            st = spiked[client]
            left_out = len(keep) < len(ups)
            detail = (f"client={client} max_abs_g={st.peak:.4g} ratio={st.ratio:.3g} median={st.median:.4g} "
                      f"left_out={str(left_out).lower()}")  # fmt: skip
            if client not in was:
                out += self._limit(client, round, f"{detail} reason=spike", now, next_round)
            else:
                log.info("drift_spike %s (already limited)", detail)
                out.append(EventRecord("drift_spike", detail, round, now))
        return out, keep

    def _check_fleet_decay(self, round: int, ups: list[UpdateRow], now: float, next_round: int) -> list[Record]:
        """The fleet-relative decay rule at close (drift_decay_rule = "fleet"): a client whose rho_later is
        drift_fleet_ratio x the median of the round's clients is flagged (1 local step from the next plan,
        sticky); its update stays in this round's aggregate. Acts only with drift_control; not computed
        under another decay_rule."""
        assert self.monitor is not None
        if self.monitor.thresholds.decay_rule != "fleet":
            return []  # O(clients x window) per close: only when the rule is on
        flagged = self.monitor.observe_fleet(round, [u.client for u in ups])
        out: list[Record] = []
        for client in sorted(flagged) if self.on else ():
            fs = flagged[client]
            out += self._limit(client, round, f"rho_later={fs.rho_later:.3g} fleet_median={fs.median:.3g} "
                               f"ratio={fs.ratio:.3g} n_steps={fs.n_steps} reason=decay", now, next_round)  # fmt: skip
        return out

    def _limit(self, client: str, round: int, why: str | DriftStats, now: float, next_round: int) -> list[Record]:
        """The log line, event and durable flag of one decision (`why`: the decay statistics or the text of
        the spike rule); `next_round`: the first plan it applies to (the next one not yet published)."""
        detail = f"client={client} steps=1 from_round={next_round} " + (
            _decay_detail(why) if isinstance(why, DriftStats) else why
        )
        log.info("drift_limit %s", detail)
        return [LimitRecord(client, round, now), EventRecord("drift_limit", detail, round, now)]


def monitor_for(config: CoordinatorConfig, mask: Mask) -> DriftMonitor | None:
    """The MEERKAT-VP monitor of a book built from `config` (coordinator/server.py, bench/inproc.py): from the
    mask's pre-training gradient; none in the mask: no monitor (and MEERKAT-VP off, said once)."""
    grad = mask.flat_grad()
    if grad is None:
        if config.drift_control:
            log.info("drift_control: the mask has no pre-training gradient (grad.*), so MEERKAT-VP is off")
        return None
    # keep_history=False: the book needs each client's last statistics only (its memory stays flat)
    return DriftMonitor(grad, config.dist, config.drift_thresholds(), keep_history=False)


def _decay_detail(st: DriftStats) -> str:
    return f"rho_later={st.rho_later:.3g} rho_quie={st.rho_quie:.2f} n_steps={st.n_steps} reason=decay"
