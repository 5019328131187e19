"""What the event log may forget: the round bounds of `EventLog.prune` (`retention_bounds`, a pure
function) and `prune_log`, which the pump calls after each checkpoint (docs/COORDINATOR.md "Retention").

    before          rounds < before lose their updates, plans, events and per-round counters: the
                    audit window is the last `retain_rounds` rounds (>= the 64-round late/dedupe window
                    recovery reads)
    results_before  results < results_before are deleted: recovery needs those after the OLDEST kept
                    checkpoint (the fallback when a newer one fails to verify) and Replay the last
                    replay_max; results are small, so they are also kept for the audit window

    before, results_before = retention_bounds(last_round=499, retain_rounds=256, replay_max=50,
                                              checkpoint_rounds=[479, 489, 499])   # -> (244, 244)
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from coordinator.eventlog import EventLog

log = logging.getLogger(__name__)


def retention_bounds(
    last_round: int, retain_rounds: int, replay_max: int, checkpoint_rounds: Sequence[int]
) -> tuple[int, int]:
    """(before, results_before) after `last_round` closed; (0, 0) = nothing to prune (retain_rounds 0 = off)."""
    if retain_rounds <= 0:
        return 0, 0
    before = max(0, last_round + 1 - retain_rounds)
    oldest_ckpt = min(checkpoint_rounds) + 1 if checkpoint_rounds else 0
    return before, max(0, min(before, last_round + 1 - replay_max, oldest_ckpt))


def prune_log(events: EventLog, last_round: int, retain_rounds: int, replay_max: int, drift_window: int) -> dict[str, int]:
    """Drop what recovery and the audit window of retain_rounds no longer need, so a long run's disk stays
    flat; returns the rows deleted per table ({} when nothing is due)."""
    ckpts = [r for r, _, _ in events.checkpoints()]
    before, results_before = retention_bounds(last_round, retain_rounds, replay_max, ckpts)
    if before <= 0 and results_before <= 0:
        return {}
    with events.transaction():
        gone = events.prune(before, results_before, drift_window)
    log.info("retention: pruned rounds < %d (results < %d): %s", before, results_before,
             " ".join(f"{k}={v}" for k, v in gone.items()))  # fmt: skip
    return gone
