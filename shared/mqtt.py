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
"""

from __future__ import annotations

import logging
import queue
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import ParseResult, unquote, urlparse

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.reasoncodes import ReasonCode

log = logging.getLogger(__name__)

DEFAULT_PORT = {"mqtt": 1883, "tcp": 1883, "mqtts": 8883, "ssl": 8883}


@dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int
    tls: bool
    username: str | None = None
    password: str | None = None

    @classmethod
    def parse(cls, url: str) -> BrokerAddress:
        """`mqtt://[user[:pass]@]host[:port]` or `mqtts://...` (TLS); the password never gets logged."""
        parsed = _urlparse(url)
        if parsed.scheme not in DEFAULT_PORT:
            raise ValueError(f"broker url {redact(url)!r}: scheme must be mqtt:// or mqtts://")
        if not parsed.hostname:
            raise ValueError(f"broker url {redact(url)!r}: no host")
        try:
            port = parsed.port or DEFAULT_PORT[parsed.scheme]
        except ValueError as exc:
            raise ValueError(f"broker url {redact(url)!r}: bad port ({exc})") from None
        return cls(
            host=parsed.hostname,
            port=port,
            tls=parsed.scheme in ("mqtts", "ssl"),
            username=unquote(parsed.username) if parsed.username else None,
            password=unquote(parsed.password) if parsed.password else None,
        )

    def __str__(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


def _urlparse(url: str) -> ParseResult:
    """urlparse with mqtt:// assumed when the url has no scheme ("host:port")."""
    return urlparse(url if "://" in url else f"mqtt://{url}")


def redact(url: str) -> str:
    """The url with any password replaced by ***, for logs and errors."""
    parsed = _urlparse(url)
    if parsed.password is None:
        return url
    return url.replace(f":{parsed.password}@", ":***@", 1)


@dataclass(frozen=True)
class TlsOptions:
    ca_certs: Path | None = None
    certfile: Path | None = None
    keyfile: Path | None = None
    insecure: bool = False  # skip hostname check: test setups only


@dataclass(frozen=True)
class Will:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


@dataclass(frozen=True)
class Incoming:
    topic: str
    payload: bytes
    mid: int
    qos: int
    retain: bool


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
    ) -> None:
        self.address = BrokerAddress.parse(url)
        self.client_id = client_id
        self.subscriptions = list(subscriptions or [])
        self.on_connect_publish = list(on_connect_publish or [])
        self.inbox: queue.Queue[Incoming] = queue.Queue()
        self.published: queue.Queue[int] = queue.Queue()
        self.connected = threading.Event()
        self.connect_count = 0
        self._keepalive = keepalive
        self._started = False
        c = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=clean_session,
            protocol=mqtt.MQTTv311,
            manual_ack=manual_ack,
        )
        c.max_queued_messages_set(max_queued)
        c.max_inflight_messages_set(20)
        c.reconnect_delay_set(min_delay=max(1, int(reconnect_min_s)), max_delay=max(1, int(reconnect_max_s)))
        user = username if username is not None else self.address.username
        pw = password if password is not None else self.address.password
        if user is not None:
            c.username_pw_set(user, pw)
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
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        c.on_publish = self._on_publish
        c.on_subscribe = self._on_subscribe
        self._sub_mid = -1
        self._client = c

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        if self._started:
            raise RuntimeError("MqttLink already started")
        self._started = True
        log.info("connecting to %s as %s", self.address, self.client_id)
        self._client.connect_async(self.address.host, self.address.port, keepalive=self._keepalive)
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
        self._client.disconnect()
        self._client.loop_stop()
        self._started = False
        self.connected.clear()

    # -- traffic ---------------------------------------------------------------------------------
    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> int:
        """Queue a message; returns its mid (watch `published` for the PUBACK of QoS >= 1)."""
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc == MQTTErrorCode.MQTT_ERR_QUEUE_SIZE:
            raise RuntimeError(f"outgoing queue full ({topic}); retry later")
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            raise RuntimeError(f"publish to {topic} failed: {mqtt.error_string(info.rc)}")
        return int(info.mid)

    def ack(self, msg: Incoming) -> None:
        """Acknowledge a message received with manual_ack (no-op for QoS 0)."""
        if msg.qos > 0:
            self._client.ack(msg.mid, msg.qos)

    def subscribe(self, topic: str, qos: int = 1) -> None:
        self.subscriptions.append((topic, qos))
        if self.connected.is_set():
            self._client.subscribe(topic, qos)

    # -- callbacks: never block ------------------------------------------------------------------
    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode, props: Any) -> None:
        if reason.is_failure:
            log.warning("broker %s refused connection: %s", self.address, reason)
            return
        self.connect_count += 1
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
            failed = [r for r in reasons if r.is_failure]
            if failed:
                log.error("broker refused subscriptions %s: %s", self.subscriptions, failed)
            self.connected.set()

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode, props: Any) -> None:
        self.connected.clear()
        log.info("disconnected from %s: %s", self.address, reason)

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        self.inbox.put(Incoming(message.topic, bytes(message.payload), message.mid, message.qos, bool(message.retain)))

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: ReasonCode, props: Any) -> None:
        self.published.put(mid)


def tls_for(
    broker: str, ca: Path | None, cert: Path | None, key: Path | None, insecure: bool = False
) -> TlsOptions | None:
    """TLS options when the settings ask for TLS (an mqtts:// url, a CA or a client cert), else None."""
    if BrokerAddress.parse(broker).tls or ca is not None or cert is not None:
        return TlsOptions(ca, cert, key, insecure)
    return None


def broker_settings_problems(
    broker: str,
    username: str | None,
    password_file: Path | None,
    tls_ca: Path | None,
    tls_cert: Path | None,
    tls_key: Path | None,
) -> list[str]:
    """Config checks every side makes on its broker settings, each naming the key (client and coordinator)."""
    problems: list[str] = []
    try:
        if BrokerAddress.parse(broker).password is not None:
            problems.append("broker: put the password in password_file, not in the url")
    except ValueError as exc:
        problems.append(f"broker: {exc}")
    for key, p in (("password_file", password_file), ("tls_ca", tls_ca), ("tls_cert", tls_cert), ("tls_key", tls_key)):
        if p is not None and not p.is_file():
            problems.append(f"{key}: file {p} does not exist")
    if (tls_cert is None) != (tls_key is None):
        problems.append("tls_cert/tls_key: give both or neither")
    if password_file is not None and username is None:
        problems.append("password_file: set username too")
    return problems


def read_secret(path: Path | None) -> str | None:
    """A password kept in a file (first line, stripped); None without a file. Never log the result."""
    if path is None:
        return None
    return path.read_text(encoding="utf-8").strip()
