"""The pump's way out: where each `Publish` goes on the broker, and which QoS 1 publishes still wait for
their PUBACK (so a pump that exits can wait for them).

    out = Publisher(topics, tally, metrics)
    out.link = link          # a started MqttLink (None until the pump starts)
    out.send(Publish(result))    # result/{r} + retained result/latest
    out.collect(0.0)             # forget the publishes the broker acknowledged
"""

from __future__ import annotations

import logging
import queue
import time

from coordinator.actions import Publish
from coordinator.metrics import Metrics
from coordinator.tally import Tally
from shared.codec import encode
from shared.messages import RoundPlan, RoundResult, RunState
from shared.mqtt import MqttLink, QueueFull
from shared.topics import Topics

log = logging.getLogger(__name__)


class Publisher:
    def __init__(self, topics: Topics, tally: Tally, metrics: Metrics) -> None:
        self.topics, self.tally, self.metrics = topics, tally, metrics
        self.link: MqttLink | None = None
        self.pending: set[int] = set()  # mids of QoS 1 publishes not PUBACKed yet

    def send(self, p: Publish) -> None:
        """A plan retained on `plan`; a result on `result/{r}` and retained on `result/latest`; the run's
        state retained on `run`; else `to/{c}`."""
        payload = encode(p.message)
        if p.to is not None:  # an answer to one device: dropped, not fatal, when the link's queue is full
            try:
                self._publish(self.topics.to(p.to), payload, 1, False)
            except QueueFull as exc:  # the device asks again (SyncRequest retry, a re-nag every 10 s)
                self.tally.add(self.metrics.dropped, "out_queue_full")
                log.warning("%s: %s to %s dropped", exc, type(p.message).__name__, p.to)
        elif isinstance(p.message, RoundPlan):
            self._publish(self.topics.plan, payload, 1, True)
        elif isinstance(p.message, RoundResult):
            self._publish(self.topics.result(p.message.round), payload, 1, False)
            self._publish(self.topics.result_latest, payload, 1, True)
        elif isinstance(p.message, RunState):
            self._publish(self.topics.run, payload, 1, True)
        else:
            raise TypeError(f"cannot broadcast a {type(p.message).__name__}")

    def collect(self, timeout: float) -> None:
        """Forget the publishes acknowledged so far (waiting up to `timeout` for the first)."""
        assert self.link is not None
        published = self.link.published
        try:
            self.pending.discard(published.get(timeout=timeout) if timeout else published.get_nowait())
            while True:
                self.pending.discard(published.get_nowait())
        except queue.Empty:
            pass

    def wait(self, timeout: float) -> None:
        """Until every QoS 1 publish so far is PUBACKed, or `timeout` (then a warning)."""
        end = time.monotonic() + timeout
        while self.pending and time.monotonic() < end:
            self.collect(0.05)
        if self.pending:
            log.warning("%d publishes not acknowledged by the broker at shutdown", len(self.pending))

    def _publish(self, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        assert self.link is not None
        mid = self.link.publish(topic, payload, qos, retain)
        self.tally.add(self.metrics.bytes_sent, self.topics.parse(topic)[0], len(payload))
        if qos > 0:
            self.pending.add(mid)
