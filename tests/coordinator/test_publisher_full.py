"""A full outgoing queue (paho's max_queued QoS 1 messages awaiting PUBACK) drops an answer to one device,
counted, instead of taking the coordinator down: at 19,500 devices the join nag (an ErrorMsg per device whose
Join was still queued) overflowed the old 1,000-message queue and the coordinator exited (issue 31 fleet run).
Broadcasts (plan, result, run state) still raise: losing one would stall the fleet."""

from __future__ import annotations

from typing import Any

import pytest

from coordinator.actions import Publish
from coordinator.links import OUT_QUEUE
from coordinator.metrics import Metrics
from coordinator.publisher import Publisher
from coordinator.tally import Tally
from shared.messages import ErrorCode, ErrorMsg, RoundResult
from shared.mqtt import QueueFull
from shared.topics import Topics


class FullLink:
    def __init__(self) -> None:
        self.sent: list[str] = []

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> int:
        raise QueueFull(f"outgoing queue full ({topic}); retry later")


def test_an_answer_is_dropped_and_counted_a_broadcast_raises() -> None:
    m = Metrics()
    tally = Tally(m)
    out = Publisher(Topics("f"), tally, m)
    link: Any = FullLink()
    out.link = link
    out.send(Publish(ErrorMsg(int(ErrorCode.UNKNOWN_CLIENT), "send Join"), to="d1"))
    tally.apply()
    assert m.dropped.labels("out_queue_full")._value.get() == 1.0
    with pytest.raises(QueueFull):
        out.send(Publish(RoundResult(0, (), (), 0.01, "rademacher", 0, "00" * 32)))
    assert OUT_QUEUE >= 100_000  # a nag to every device of a 100,000 fleet fits
