"""When a device may Join and ask again: refused-Join back-off, RATE_LIMITED slow-down, silence warnings.

`JoinBackoff` is the part of the client's round core (`ClientRounds`) that answers a coordinator saying no,
or saying nothing. It does no I/O; every event takes `now` (unix seconds) like the core's.

Refused Joins (PROTOCOL.md §8 client 3): the refusal is REAL (`refused` returns why, and the core exits
with EXIT_MISMATCH) when the retained plan names another fingerprint/mask than ours, or when
REFUSALS_TO_EXIT Joins in a row were refused with no plan to check against (QUANT_MISMATCH: the plan
carries no quant) and no sign we are joined (an answered SyncRequest). A refusal while the plan matches
what we hold is not our doing (a Join spoofed under our id without the broker ACL, a coordinator
restart): logged at ERROR, Join again after 2, 4, 8 ... 60 s from the refusal.

RATE_LIMITED: no SyncRequest and no Join for 10, 20, 40 ... 120 s from the answer (the streak ends with
the next sign we are joined). Connected SILENT_WARN_S without a word from any coordinator: an ERROR naming
the fleet we wait on, then again 60, 120 ... s apart.
"""

from __future__ import annotations

import logging
import math
from collections import Counter

from shared.messages import ErrorCode, ErrorMsg, RoundPlan

log = logging.getLogger(__name__)

REFUSALS = (ErrorCode.FINGERPRINT_MISMATCH, ErrorCode.MASK_MISMATCH, ErrorCode.QUANT_MISMATCH)  # of a Join
REFUSALS_TO_EXIT = 3  # refused Joins in a row, no plan contradicting them, no sign we are joined: believe them
REJOIN_FIRST_S = 2.0  # back-off after a refused Join: 2, 4, 8 ... s
REJOIN_MAX_S = 60.0
SLOW_FIRST_S = 10.0  # after RATE_LIMITED (the coordinator says so at most once per 10 s): 10, 20 ... s
SLOW_MAX_S = 120.0
SILENT_WARN_S = 30.0  # connected this long without a word from any coordinator: say what we wait for


class JoinBackoff:
    """The refusals since the last sign we are joined, and when the next Join / SyncRequest may go out.

    `fleet` names the fleet in the silence warning; `ours` = (fingerprint, mask_id) this device holds;
    `counters` are the core's (one set for the whole client)."""

    def __init__(self, fleet: str, ours: tuple[str, str], counters: Counter[str]) -> None:
        self.fleet = fleet
        self.ours = ours
        self.counters = counters
        self.refusal: ErrorMsg | None = None  # the latest refused Join since the last sign we are joined
        self.refusals = 0  # how many in a row
        self.quiet_until = -math.inf  # RATE_LIMITED: no SyncRequest / Join before then
        self._rejoin_at: float | None = None
        self._rejoin_wanted = False
        self._slow_streak = 0
        self._heard = False  # anything from a coordinator (plan, result, to/)
        self._silent_since: float | None = None
        self._silent_warn_at = -math.inf

    # -- Joins -----------------------------------------------------------------------------------
    def may_join_now(self, now: float) -> bool:
        """A Join is due (a connection, UNKNOWN_CLIENT): True to send it now; False when refused before,
        and the back-off schedule sends it (`rejoin_due`)."""
        if not self.refusals:
            return True
        self._schedule(now)
        return False

    def rejoin_due(self, now: float) -> bool:
        """The scheduled Join may go out now (never sooner than RATE_LIMITED allows)."""
        if not self._rejoin_wanted:
            return False
        self._schedule(now)
        assert self._rejoin_at is not None
        if now < max(self._rejoin_at, self.quiet_until):
            return False
        self._rejoin_wanted, self._rejoin_at = False, None
        return True

    def _schedule(self, now: float) -> None:
        self._rejoin_wanted = True
        if self._rejoin_at is None:
            self._rejoin_at = now + min(REJOIN_FIRST_S * 2 ** max(self.refusals - 1, 0), REJOIN_MAX_S)

    def refused(self, err: ErrorMsg, name: str, plan: RoundPlan | None, now: float) -> str | None:
        """A refused Join: why it is real (the caller exits), or None (logged; a Join follows the back-off).
        Real when the retained plan confirms the fleet runs another model/mask, or when our own Joins keep
        being refused with nothing to contradict it (QUANT_MISMATCH has no plan field to check). When the
        plan MATCHES what we hold, we did not cause it (a Join spoofed without the broker ACL, a coordinator
        restarting): say so loudly."""
        self.refusal = err
        self.refusals += 1
        self._schedule(now)
        fleet_differs = plan is not None and (plan.fingerprint, plan.mask_id) != self.ours
        if err.code != ErrorCode.QUANT_MISMATCH and fleet_differs:
            return f"the coordinator refused this device's Join ({name}: {err.reason})"
        if plan is not None and err.code != ErrorCode.QUANT_MISMATCH:
            log.error(
                "coordinator refused our Join (%s: %s), but its plan %d is for the model/mask we hold (%s/%s): "
                "not our doing (a Join spoofed under our id, or a coordinator restart); joining again (#%d)",
                name, err.reason, plan.round, self.ours[0][:12], self.ours[1], self.refusals,
            )  # fmt: skip
            return None
        if self.refusals >= REFUSALS_TO_EXIT:
            return f"the coordinator refused this device's Join {self.refusals} times in a row ({name}: {err.reason})"
        log.error("coordinator refused our Join (%s: %s): trying again (%d/%d) before giving up", name, err.reason,
                  self.refusals, REFUSALS_TO_EXIT)
        return None

    def contradicted(self, plan: RoundPlan) -> str | None:
        """A plan for another model/mask after a refused Join (not QUANT_MISMATCH): why the refusal is real."""
        refusal = self.refusal
        if refusal is None or refusal.code == ErrorCode.QUANT_MISMATCH or (plan.fingerprint, plan.mask_id) == self.ours:
            return None
        return f"the coordinator refused this device's Join ({ErrorCode(refusal.code).name}: {refusal.reason})"

    def joined(self) -> None:
        """A sign the coordinator accepted our Join (a sync answered): the refusals and slow-downs are over."""
        if self.refusals:
            log.warning("coordinator accepts us again after %d refused Join(s)", self.refusals)
        self.refusal, self.refusals, self._rejoin_at, self._rejoin_wanted = None, 0, None, False
        self._slow_streak = 0

    # -- RATE_LIMITED ----------------------------------------------------------------------------
    def rate_limited(self, reason: str, now: float) -> float:
        """The coordinator said RATE_LIMITED at `now`: seconds to send less (doubling, capped)."""
        self._slow_streak += 1
        seconds: float = min(SLOW_FIRST_S * 2 ** (self._slow_streak - 1), SLOW_MAX_S)
        self.quiet_until = max(self.quiet_until, now + seconds)
        log.warning("coordinator says RATE_LIMITED (%s): sending less for %.0f s", reason, seconds)
        return seconds

    def quiet(self, now: float) -> bool:
        return now < self.quiet_until

    # -- silence ---------------------------------------------------------------------------------
    def connected(self, now: float) -> None:
        self._silent_since, self._silent_warn_at = now, -math.inf

    def heard(self) -> None:
        """A coordinator said something (a plan, a result, a message on to/{client})."""
        self._heard = True

    def watch_silence(self, now: float) -> None:
        """Connected and no coordinator has said anything (no retained plan, Join/SyncRequest unanswered):
        the fleet has no coordinator, e.g. client and coordinator configs name different fleets. The
        coordinator never sees other fleets' topics, so this device is where it shows."""
        if self._heard:
            return
        if self._silent_since is None:
            self._silent_since = now
        waited = now - self._silent_since
        if waited < SILENT_WARN_S or now < self._silent_warn_at:
            return
        self._silent_warn_at = now + max(SILENT_WARN_S, waited)  # 30 s, then 60, 120 ... apart
        self.counters["coordinator_silent"] += 1
        log.error(
            "no coordinator on fleet %r for %.0f s: no retained plan on meerkat/v1/%s/plan and no answer to our "
            "Join/SyncRequest. Waiting for it; check that the coordinator runs and that its `fleet` is %r (the "
            "`fleet` key in coordinator.toml and client.toml must be equal)",
            self.fleet, waited, self.fleet, self.fleet,
        )  # fmt: skip


__all__ = [
    "REFUSALS",
    "REFUSALS_TO_EXIT",
    "REJOIN_FIRST_S",
    "REJOIN_MAX_S",
    "SILENT_WARN_S",
    "SLOW_FIRST_S",
    "SLOW_MAX_S",
    "JoinBackoff",
]
