"""A read-only MQTT observer of one fleet: what crossed the wire, in bytes and in messages.

The demo uses it to show progress and to measure, not estimate, the traffic: every payload published
under `meerkat/v1/{fleet}/#` is counted once, by topic kind. Downlink kinds (plan, result, to) are counted
as published by the coordinator; what the broker delivers to N subscribed clients is N times that.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from shared.codec import DecodeError, decode
from shared.messages import Heartbeat, RoundResult, Update
from shared.mqtt import MqttLink
from shared.topics import CLIENT_KINDS, KINDS, Topics

log = logging.getLogger(__name__)

# derived from the topic scheme: every kind a client publishes on its own topic is uplink ("to" is the
# coordinator's message to one client), everything else is downlink
UPLINK = tuple(k for k in CLIENT_KINDS if k != "to")
DOWNLINK = tuple(k for k in KINDS if k not in UPLINK)


@dataclass
class FleetTraffic:
    bytes_by_kind: Counter[str] = field(default_factory=Counter)
    msgs_by_kind: Counter[str] = field(default_factory=Counter)
    results: dict[int, RoundResult] = field(default_factory=dict)
    result_sha256: dict[int, str] = field(default_factory=dict)  # of the exact payload on result/{r}
    updates: dict[int, dict[str, Update]] = field(default_factory=lambda: defaultdict(dict))
    heartbeats: dict[str, list[Heartbeat]] = field(default_factory=lambda: defaultdict(list))
    undecodable: int = 0

    def uplink_bytes(self) -> int:
        return sum(self.bytes_by_kind[k] for k in UPLINK)

    def downlink_bytes(self) -> int:
        return sum(self.bytes_by_kind[k] for k in DOWNLINK)


class FleetObserver:
    """Subscribe to a fleet's whole topic tree; `traffic` fills from a background thread."""

    def __init__(self, broker_url: str, fleet: str) -> None:
        self.topics = Topics(fleet)
        self.traffic = FleetTraffic()
        self.new_results: queue.Queue[RoundResult] = queue.Queue()
        self._lock = threading.Lock()
        self._link = MqttLink(
            broker_url, f"observer-{uuid.uuid4().hex[:10]}", subscriptions=[(f"{self.topics.base}/#", 1)]
        )
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._drain, name="fleet-observer", daemon=True)

    def start(self, timeout: float = 10.0) -> None:
        self._link.start()
        if not self._link.wait_connected(timeout):
            raise RuntimeError(f"observer could not connect to {self._link.address}")
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._link.stop()

    def _drain(self) -> None:
        while not self._stop.is_set():
            try:
                msg = self._link.inbox.get(timeout=0.2)
            except queue.Empty:
                continue
            if msg.retain:  # a retained message from an earlier run is not traffic of this run
                continue
            try:
                kind, arg = self.topics.parse(msg.topic)
            except ValueError:
                continue
            with self._lock:
                self.traffic.bytes_by_kind[kind] += len(msg.payload)
                self.traffic.msgs_by_kind[kind] += 1
            if not msg.payload:
                continue
            try:
                body: object = decode(msg.payload, client=arg if kind in UPLINK and isinstance(arg, str) else "")
            except DecodeError as exc:
                with self._lock:
                    self.traffic.undecodable += 1
                log.debug("undecodable %s: %s", msg.topic, exc)
                continue
            with self._lock:
                if isinstance(body, RoundResult) and kind == "result":
                    self.traffic.results[body.round] = body
                    self.traffic.result_sha256[body.round] = hashlib.sha256(msg.payload).hexdigest()
                    self.new_results.put(body)
                elif isinstance(body, Update) and isinstance(arg, str):
                    self.traffic.updates[body.round][arg] = body
                elif isinstance(body, Heartbeat) and isinstance(arg, str):
                    self.traffic.heartbeats[arg].append(body)
