"""The coordinator's run lifecycle as this device sees it: the retained RunState on `run` (protocol 1.3),
what it means for the device (docs/CLIENT.md "The end of a run") and the one line it logs on a change."""

from __future__ import annotations

import logging

from shared.messages import RunState

log = logging.getLogger(__name__)


class RunWatch:
    """The newest RunState (None: never heard, a running fleet) and whether the run is over for a device."""

    def __init__(self, fleet: str) -> None:
        self.fleet = fleet
        self.state: RunState | None = None

    def note(self, rs: RunState, round: int) -> bool:
        """A RunState arrived while the device holds `round`; True when it is news (not a re-delivery).
        finished/stopped: the device idles once it holds the final round, after catching up."""
        prev, self.state = self.state, rs
        if prev is not None and (prev.state, prev.last_round) == (rs.state, rs.last_round):
            return False
        if rs.over:
            log.info("run %s by the coordinator after round %d (%s): %s", rs.state, rs.last_round, rs.reason or "-",
                     "idle, nothing more to train" if round >= rs.last_round
                     else f"catching up from round {round} first")  # fmt: skip
        elif rs.state == "finishing":
            log.info("the coordinator is finishing the run: round %d is the last (%s)", rs.last_round, rs.reason or "-")
        elif prev is not None and prev.over:
            log.info("a new run started on fleet %s", self.fleet)
        return True

    def over_at(self, round: int) -> bool:
        """The run ended and a device holding `round` holds its final round: nothing left to do."""
        return self.state is not None and self.state.over and round >= self.state.last_round
