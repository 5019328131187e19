"""Heartbeats held back from the event log: the newest per client, written together (the pump's write
budget at 10,000 devices is 667 heartbeats/s otherwise). Pure bookkeeping: the caller writes what
`defer` returns and what `take` hands back.

The rule: the newest heartbeat per client waits here and goes out with the next write after HB_FLUSH_S,
or AHEAD of any record that sets a client's online state (Join, Status, offline marking), so the log's
final state is what writing each in order gives (the heartbeat SQL never moves seen_at back). A
device's first heartbeat and a heartbeat with a new evaluation are written at once. A kill -9 loses at
most HB_FLUSH_S of telemetry and last-seen times, nothing a round or an update depends on.
"""

from __future__ import annotations

import time
from typing import Any

from coordinator.records import HeartbeatRecord, JoinRecord, OfflineRecord, OnlineRecord, Record

HB_FLUSH_S = 2.0  # heartbeats are written at most this late (telemetry, last seen)


class HeartbeatBuffer:
    """The held heartbeats (insertion order = the order of each client's newest beat)."""

    def __init__(self) -> None:
        self.held: dict[str, HeartbeatRecord] = {}  # newest per client, not yet written
        self._written: dict[str, Any] = {}  # client -> eval_round of its last written heartbeat (this process)
        self.flushed = time.monotonic()

    def defer(self, records: list[Record], stopping: bool = False) -> list[Record]:
        """`records` less the heartbeats held back, plus the held ones now due (see the module doc)."""
        now = time.monotonic()
        out: list[Record] = []
        for rec in records:
            if isinstance(rec, HeartbeatRecord):
                ev = rec.telemetry.get("eval_round")
                if rec.client not in self._written or (ev is not None and self._written[rec.client] != ev):
                    # a device's first telemetry, and each new evaluation (rare: every eval_every rounds), are
                    # written at once: the newest-wins deferral below would drop an evaluation point
                    self._written[rec.client] = ev
                    self.held.pop(rec.client, None)
                    out.append(rec)
                    continue
                self.held.pop(rec.client, None)  # re-insert: flush order = order of the newest beat
                self.held[rec.client] = rec
                continue
            if isinstance(rec, (JoinRecord, OnlineRecord, OfflineRecord)) and self.held:
                out += self.take()
            out.append(rec)
        if self.held and (now - self.flushed >= HB_FLUSH_S or stopping):
            out += self.take()
        if not self.held:
            self.flushed = now
        return out

    def due(self) -> bool:
        """Held heartbeats older than HB_FLUSH_S (a quiet fleet: no other write to carry them)."""
        return bool(self.held) and time.monotonic() - self.flushed >= HB_FLUSH_S

    def take(self) -> list[Record]:
        """Hand back every held heartbeat (the caller writes them)."""
        out: list[Record] = list(self.held.values())
        self.held = {}
        return out
