"""The pump's Prometheus counting: labelled increments summed per batch, and the metrics of each record.

`add` keeps metric.labels(label).inc(amount) until `apply` at the end of the batch: one inc per (metric,
label) and batch instead of ~3 per message (labels() validates and locks, inc locks). The labels are
topic kinds, statuses and reject/drop reasons: a small fixed set, so the children are cached. The totals
are the same (whole numbers, exact in a float).
"""

from __future__ import annotations

from typing import Any

from coordinator.floodgate import FloodGate
from coordinator.metrics import Metrics
from coordinator.records import LimitRecord, PlanRecord, Record, RejectRecord, ResultRecord, UpdateRecord


class Tally:
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self._children: dict[tuple[int, str], Any] = {}  # (id(metric), label) -> metric.labels(label)
        self._pending: dict[tuple[int, str], float] = {}  # labelled increments not yet applied
        self._gate_refused = 0  # the flood gate's refusals already counted (`gate`)
        self._received: dict[str, list[int]] = {}  # kind -> [messages, bytes] not yet applied (`received`)

    def add(self, metric: Any, label: str, amount: float = 1.0) -> None:
        key = (id(metric), label)
        if key not in self._children:
            self._children[key] = metric.labels(label)
        self._pending[key] = self._pending.get(key, 0.0) + amount

    def received(self, kind: str, nbytes: int) -> None:
        """One message of `kind` and its bytes (meerkat_messages_received / _bytes_received): the two `add`s of
        every message in one dict lookup."""
        got = self._received.get(kind)
        if got is None:
            self._received[kind] = [1, nbytes]
        else:
            got[0] += 1
            got[1] += nbytes

    def gate(self, inbox: object) -> None:
        """Messages the flood gate (coordinator/floodgate.py) refused since the last call ->
        meerkat_messages_dropped{reason="flood"} (an inbox that is not a gate: nothing to count)."""
        if isinstance(inbox, FloodGate):
            total = inbox.refused_total()
            if total != self._gate_refused:
                self.add(self.metrics.dropped, "flood", total - self._gate_refused)
                self._gate_refused = total

    def apply(self) -> None:
        if self._received:
            m = self.metrics
            for kind, (n, nbytes) in self._received.items():
                self.add(m.messages, kind, n)
                self.add(m.bytes_received, kind, nbytes)
            self._received.clear()
        for key, amount in self._pending.items():
            self._children[key].inc(amount)
        self._pending.clear()

    def count(self, rec: Record) -> None:
        """The metrics of one committed record."""
        m = self.metrics
        if isinstance(rec, UpdateRecord):  # the common one first
            self.add(m.updates_accepted, rec.update.status)
        elif isinstance(rec, RejectRecord):
            self.add(m.rejected, rec.reason)
        elif isinstance(rec, PlanRecord):
            m.round_open.set(1)
        elif isinstance(rec, ResultRecord):
            m.rounds_closed.inc()
            m.current_round.set(rec.result.round)
            m.round_open.set(0)
            m.round_duration.observe(rec.result.duration_s)
        elif isinstance(rec, LimitRecord):
            m.drift_limited.inc()
