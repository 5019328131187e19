"""A small, non-blocking MQTT link on paho-mqtt 2.x (callback API v2) that both sides use.

Rules it keeps (from the paho examples and docs/PROTOCOL.md):
- `connect_async` + `loop_start`: the network runs in paho's thread, reconnecting with backoff
  (`reconnect_delay_set`) for as long as the link lives; the broker may be down at start.
- Subscriptions are (re)made in `on_connect`, so they survive reconnects and clean sessions.
- Callbacks never block: they only put events on queues that the owner's thread drains.
- Manual ack (`manual_ack=True`): an incoming QoS1 message is acknowledged only when the owner calls
  `ack(msg)`, i.e. after it committed the message durably. An unacked message is delivered again by the
  broker after a reconnect (persistent session: `clean_session=False`).
- `publish` never blocks; paho holds at most `max_queued` messages while offline, beyond which
  `publish` raises `RuntimeError` (the caller keeps its own durable copy, e.g. the client outbox).
- MQTT 3.1.1 by default (devices, the single coordinator). `session_expiry_s` switches the link to
  MQTT 5 (`clean_start=False` + that Session Expiry Interval instead of `clean_session`): coordinator
  workers use it to share `$share/{group}/...` subscriptions (coordinator/workers.py); the broker keeps
  the session, and with it the unacked messages, that long after a disconnect.

The broker settings (url, TLS, password file and their checks) are shared/broker_settings.py, the
one-line explanations of connection failures shared/connect_errors.py; both re-exported here.
"""

from __future__ import annotations

import logging
import queue
import ssl
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from shared.broker_settings import (
    DEFAULT_PORT,
    BrokerAddress,
    TlsOptions,
    broker_settings_problems,
    is_loopback,
    read_secret,
    redact,
    tls_for,
)
from shared.connect_errors import explain_connect_error, explain_refusal
from shared.mqttread import READ_CHUNK, BufferedClient, Incoming

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Will:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


class QueueFull(RuntimeError):
    """`MqttLink.publish`: `max_queued` QoS >= 1 messages already wait for their PUBACK (nothing was queued)."""


REPEAT_EVERY = 20  # a cause that persists is logged again at WARNING every this many attempts


class _Trouble:
    """Logs connection trouble loudly but not every retry: WARNING on the first occurrence of a cause, when
    the cause changes and every REPEAT_EVERY-th repeat; DEBUG otherwise. `last` keeps the latest line."""

    def __init__(self) -> None:
        self.last: str | None = None
        self.repeats = 0
        self.failures = 0

    def report(self, line: str, level: int = logging.WARNING) -> None:
        self.failures += 1
        if line != self.last:
            self.last, self.repeats = line, 0
            log.log(level, "%s (retrying)", line)
            return
        self.repeats += 1
        if self.repeats % REPEAT_EVERY == 0:
            log.log(level, "%s (still failing after %d attempts, retrying)", line, self.repeats + 1)
        else:
            log.debug("%s (attempt %d)", line, self.repeats + 1)

    def recovered(self, address: BrokerAddress) -> None:
        if self.failures:
            log.warning("connected to %s after %d failed attempts", address, self.failures)
        self.last, self.repeats, self.failures = None, 0, 0


class MqttLink:
    """One MQTT connection. Drain `inbox` (Incoming) and `published` (mids PUBACKed) from your thread."""

    def __init__(
        self,
        url: str,
        client_id: str,
        *,
        subscriptions: list[tuple[str, int]] | None = None,
        username: str | None = None,
        password: str | None = None,
        tls: TlsOptions | None = None,
        will: Will | None = None,
        on_connect_publish: list[tuple[str, bytes, int, bool]] | None = None,
        manual_ack: bool = False,
        clean_session: bool = True,
        max_queued: int = 1000,
        keepalive: int = 30,
        reconnect_min_s: float = 0.5,
        reconnect_max_s: float = 30.0,
        session_expiry_s: int | None = None,
        inbox: queue.Queue[Incoming] | None = None,
        read_pause_s: float = 0.0,
    ) -> None:
        """`inbox`: where incoming messages go (a plain queue when None; the coordinator's flood gate
        filters and orders them in its `put`, in paho's thread). `read_pause_s`: the least time between two
        reads of the socket (the coordinator: a trickle of messages is read a few at a time, one wake-up of
        each thread for several; 0: read as soon as there is something)."""
        if session_expiry_s is not None and not 0 <= session_expiry_s <= 0xFFFFFFFF:
            raise ValueError(f"session_expiry_s must be in 0..2^32-1, got {session_expiry_s}")
        self.address = BrokerAddress.parse(url)
        self.client_id = client_id
        self.subscriptions = list(subscriptions or [])
        self.on_connect_publish = list(on_connect_publish or [])
        self.inbox: queue.Queue[Incoming] = queue.Queue() if inbox is None else inbox
        self.published: queue.Queue[int] = queue.Queue()
        self.connected = threading.Event()
        self.connect_count = 0
        self.trouble = _Trouble()  # `trouble.last`: the latest connection problem, one line
        self.refused_subscriptions: list[str] = []
        self._got_connack = False
        self._keepalive = keepalive
        self._started = False
        self._stopping = False
        self.session_expiry_s = session_expiry_s
        if session_expiry_s is None:
            c = BufferedClient(
                callback_api_version=CallbackAPIVersion.VERSION2,
                client_id=client_id,
                clean_session=clean_session,
                protocol=mqtt.MQTTv311,
                manual_ack=manual_ack,
            )
        else:  # MQTT 5: the session is kept by clean_start=False + expiry (connect_async in start())
            c = BufferedClient(
                callback_api_version=CallbackAPIVersion.VERSION2,
                client_id=client_id,
                protocol=mqtt.MQTTv5,
                manual_ack=manual_ack,
            )
        c.max_queued_messages_set(max_queued)
        c.max_inflight_messages_set(20)
        c.reconnect_delay_set(min_delay=max(1, int(reconnect_min_s)), max_delay=max(1, int(reconnect_max_s)))
        user = username if username is not None else self.address.username
        pw = password if password is not None else self.address.password
        if user is not None:
            c.username_pw_set(user, pw)
        self._client_cert = tls is not None and tls.certfile is not None
        if self.address.tls or tls is not None:
            t = tls or TlsOptions()
            c.tls_set(
                ca_certs=str(t.ca_certs) if t.ca_certs else None,
                certfile=str(t.certfile) if t.certfile else None,
                keyfile=str(t.keyfile) if t.keyfile else None,
                cert_reqs=ssl.CERT_REQUIRED,
            )
            if t.insecure:
                c.tls_insecure_set(True)
        if will is not None:
            c.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)
        c.on_connect = self._on_connect
        c.on_connect_fail = self._on_connect_fail
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        c.on_publish = self._on_publish
        c.on_subscribe = self._on_subscribe
        c.deliver = self._on_messages
        c.read_pause_s = read_pause_s
        self._sub_mid = -1
        self._client = c

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        if self._started:
            raise RuntimeError("MqttLink already started")
        self._started = True
        log.info("connecting to %s as %s", self.address, self.client_id)
        if self.session_expiry_s is None:
            self._client.connect_async(self.address.host, self.address.port, keepalive=self._keepalive)
        else:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = self.session_expiry_s
            self._client.connect_async(
                self.address.host, self.address.port, keepalive=self._keepalive, clean_start=False, properties=props
            )
        self._client.loop_start()

    def wait_connected(self, timeout: float | None = None) -> bool:
        return self.connected.wait(timeout)

    def stop(self, final: list[tuple[str, bytes, int, bool]] | None = None, timeout: float = 5.0) -> None:
        """Publish `final` messages (e.g. offline status) if connected, then disconnect cleanly."""
        if not self._started:
            return
        infos = []
        if self.connected.is_set():
            for topic, payload, qos, retain in final or []:
                infos.append(self._client.publish(topic, payload, qos=qos, retain=retain))
        for info in infos:
            try:
                info.wait_for_publish(timeout)
            except (ValueError, RuntimeError) as exc:
                log.warning("final publish not confirmed: %s", exc)
        self._stopping = True
        self._client.disconnect()
        self._client.loop_stop()
        self._stopping = False
        self._started = False
        self.connected.clear()

    # -- traffic ---------------------------------------------------------------------------------
    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> int:
        """Queue a message; returns its mid (watch `published` for the PUBACK of QoS >= 1)."""
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc == MQTTErrorCode.MQTT_ERR_QUEUE_SIZE:
            raise QueueFull(f"outgoing queue full ({topic}); retry later")
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            raise RuntimeError(f"publish to {topic} failed: {mqtt.error_string(info.rc)}")
        return int(info.mid)

    def ack(self, msg: Incoming) -> None:
        """Acknowledge a message received with manual_ack (no-op for QoS 0)."""
        if msg.qos > 0:
            self._client.ack(msg.mid, msg.qos)

    def ack_many(self, msgs: Sequence[Incoming]) -> None:
        """`ack` each of `msgs`: the QoS 1 ones in their order with one write (the pump acks a committed batch:
        one wake-up of paho's thread and one send() instead of one of each per message; the same bytes)."""
        ones = [m.mid for m in msgs if m.qos == 1]
        if ones:
            self._client.puback_many(ones)
        for m in msgs:
            if m.qos > 1:
                self._client.ack(m.mid, m.qos)

    def subscribe(self, topic: str, qos: int = 1) -> None:
        self.subscriptions.append((topic, qos))
        if self.connected.is_set():
            self._client.subscribe(topic, qos)

    def unsubscribe(self, topic: str) -> None:
        self.subscriptions = [(t, q) for t, q in self.subscriptions if t != topic]
        if self.connected.is_set():
            self._client.unsubscribe(topic)

    @property
    def username(self) -> str | None:
        """The login name in use (None: anonymous)."""
        return self._client.username

    # -- callbacks: never block ------------------------------------------------------------------
    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode, props: Any) -> None:
        self._got_connack = True
        if reason.is_failure:
            self.trouble.report(f"{self.address}: {explain_refusal(reason)}", logging.ERROR)
            return
        self.connect_count += 1
        self.trouble.recovered(self.address)
        log.info("connected to %s (session present: %s)", self.address, getattr(flags, "session_present", "?"))
        for topic, payload, qos, retain in self.on_connect_publish:
            client.publish(topic, payload, qos=qos, retain=retain)
        if self.subscriptions:
            _, mid = client.subscribe(self.subscriptions)
            self._sub_mid = -1 if mid is None else mid
        else:
            self.connected.set()

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reasons: Any, props: Any) -> None:
        # `connected` means "subscribed too": nothing published to us after this is missed
        if mid == self._sub_mid:
            log.debug("SUBACK %s for %s", [str(r) for r in reasons], self.subscriptions)
            refused = [t for (t, _q), r in zip(self.subscriptions, reasons, strict=False) if r.is_failure]
            self.refused_subscriptions = refused
            if refused:
                log.error(
                    "broker %s refused the subscriptions %s (SUBACK 0x80): the broker ACL does not let user %r "
                    "read them; fix the ACL entry for this user or the fleet/client_id", self.address,
                    " ".join(refused), self._client.username or self.client_id,
                )
            self.connected.set()

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode, props: Any) -> None:
        was_connected = self.connected.is_set()
        self.connected.clear()
        if not self._got_connack:
            # closed before any CONNACK: typically plain MQTT sent to a TLS port, or a refused client cert
            if self._client_cert:  # TLS 1.3: a refused client certificate shows up only as this close
                hint = ("the broker rejected this client certificate (revoked, expired or signed by another CA: "
                        "check tls_cert/tls_key and the broker's log)")
            else:
                hint = "if that port is a TLS listener use mqtts:// and tls_ca; else check the broker's log"
            self.trouble.report(f"{self.address} closed the connection before answering the login ({reason}): {hint}")
        elif was_connected and not self._stopping:
            log.warning("disconnected from %s: %s (reconnecting)", self.address, reason)
        self._got_connack = False

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        # paho calls this inside its `except OSError:` block without passing the error: exc_info has it
        self.trouble.report(explain_connect_error(sys.exc_info()[1], self.address))

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        self.inbox.put(Incoming(message.topic, bytes(message.payload), message.mid, message.qos, bool(message.retain)))

    def _on_messages(self, batch: list[Incoming]) -> None:
        """The PUBLISH packets the client parsed in one network turn (shared/mqttread.py), in wire order."""
        put_many = getattr(self.inbox, "put_many", None)  # the coordinator's flood gate takes a batch at once
        if put_many is not None:
            put_many(batch)
        else:
            for m in batch:
                self.inbox.put(m)

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: ReasonCode, props: Any) -> None:
        self.published.put(mid)


__all__ = [  # the settings and error texts live in their own modules; callers import them from here too
    "DEFAULT_PORT",
    "READ_CHUNK",
    "REPEAT_EVERY",
    "BrokerAddress",
    "Incoming",
    "MqttLink",
    "TlsOptions",
    "Will",
    "broker_settings_problems",
    "explain_connect_error",
    "explain_refusal",
    "is_loopback",
    "read_secret",
    "redact",
    "tls_for",
]
