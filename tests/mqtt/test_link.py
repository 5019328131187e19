"""MqttLink against the real Mosquitto on 127.0.0.1:1883: what crosses the wire, acks, reconnect subscriptions."""

from __future__ import annotations

import queue
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from shared.mqtt import BrokerAddress, MqttLink, redact
from shared.mqttread import Incoming


def _topic() -> str:
    return f"meerkat-test/{uuid.uuid4().hex}"


@contextmanager
def _sub_pub(broker_url: str, topic: str, qos: int, **sub_kw: Any) -> Iterator[tuple[MqttLink, MqttLink]]:
    """A started subscriber to `topic` at `qos` (and `sub_kw`) and a started publisher, both connected; stopped after."""
    sub = MqttLink(broker_url, f"t-sub-{uuid.uuid4().hex[:8]}", subscriptions=[(topic, qos)], **sub_kw)
    pub = MqttLink(broker_url, f"t-pub-{uuid.uuid4().hex[:8]}")
    sub.start()
    pub.start()
    try:
        assert sub.wait_connected(10) and pub.wait_connected(10)
        yield sub, pub
    finally:
        sub.stop()
        pub.stop()


def test_parse_urls() -> None:
    a = BrokerAddress.parse("mqtts://alice:s3cret@broker.local")
    assert (a.host, a.port, a.tls, a.username, a.password) == ("broker.local", 8883, True, "alice", "s3cret")
    assert "s3cret" not in str(a)
    assert BrokerAddress.parse("mqtt://127.0.0.1:1999").port == 1999
    assert BrokerAddress.parse("mqtt://[::1]:1999").loopback
    assert redact("mqtt://u:pw@h:1") == "mqtt://u:***@h:1"
    with pytest.raises(ValueError, match="scheme"):
        BrokerAddress.parse("http://x")
    with pytest.raises(ValueError, match="port"):
        BrokerAddress.parse("mqtt://x:notaport")


@pytest.mark.parametrize("url,why", [
    ("mqtt//127.0.0.1:18883", "not a url"),  # the typo that used to become mqtt://mqtt:1883
    ("127.0.0.1:1883", "not a url"),  # scheme required
    ("tcp://h:1883", "not supported"),
    ("mqtt://:1883", "no host"),
    ("mqtt://h:", "empty port"),
    ("mqtt://h:99999", "port"),
    ("mqtt://h:1883/path", "path"),
])
def test_bad_urls_are_refused_naming_the_key(url: str, why: str) -> None:
    from shared.mqtt import broker_settings_problems

    with pytest.raises(ValueError, match=why):
        BrokerAddress.parse(url)
    (problem,) = broker_settings_problems(url, None, None, None, None, None)
    assert problem.startswith("broker: ") and why in problem


def test_password_over_plaintext_to_a_remote_host_needs_consent(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from shared.mqtt import broker_settings_problems

    pw = tmp_path / "pw"
    pw.write_text("secret\n")
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    (problem,) = broker_settings_problems("mqtt://broker.lan:1883", "dev", pw, None, None, None)
    assert problem.startswith("password_file:") and "allow_plaintext_password" in problem
    assert broker_settings_problems("mqtt://broker.lan:1883", "dev", pw, None, None, None, True) == []
    assert broker_settings_problems("mqtt://127.0.0.1:1883", "dev", pw, None, None, None) == []
    assert broker_settings_problems("mqtts://broker.lan", "dev", pw, None, None, None) == []
    assert broker_settings_problems("mqtt://broker.lan:8883", "dev", pw, ca, None, None) == []  # tls_ca: TLS


def test_publish_subscribe_and_puback(broker_url: str) -> None:
    topic = _topic()
    with _sub_pub(broker_url, topic, 1, manual_ack=True) as (sub, pub):
        # subscription is made in on_connect; give the SUBACK a moment by round-tripping a message
        mid = pub.publish(topic, b"\x01hello", qos=1)
        got = sub.inbox.get(timeout=10)
        assert (got.topic, got.payload, got.qos) == (topic, b"\x01hello", 1)
        sub.ack(got)
        assert pub.published.get(timeout=10) == mid


def test_burst_arrives_whole_and_in_order_with_few_socket_reads(broker_url: str) -> None:
    """The link reads the socket in large pieces (shared/mqttread.py): a burst of small and
    large messages (one over READ_CHUNK, so it spans reads) arrives byte-exact and in order, with fewer
    socket reads than messages (paho alone makes at least three per message). The 5-chunk message needs
    more reads than one loop turn allows (READS_PER_LOOP): it is finished in the next turns."""
    from shared.mqtt import READ_CHUNK

    topic = _topic()
    sizes = [1, 0, 7, 300, READ_CHUNK + 1234, 5, 70, 5 * READ_CHUNK + 3] + [16 + i % 50 for i in range(400)]
    payloads = [bytes((i + k) % 256 for k in range(n)) for i, n in enumerate(sizes)]
    with _sub_pub(broker_url, topic, 0) as (sub, pub):
        for p in payloads:
            pub.publish(topic, p, qos=0)
        got = [sub.inbox.get(timeout=10).payload for _ in payloads]
        assert got == payloads
        reads = sub._client.recv_calls
        assert 0 < reads < len(payloads), reads
        assert sub._client.bulk_parsed > len(payloads) // 2  # most took the bulk path; the large ones paho's


def test_without_manual_ack_the_bulk_path_acks_what_it_hands_over(broker_url: str) -> None:
    """paho acks a QoS 1 message itself when manual_ack is off; so does the bulk path (shared/mqttread.py),
    or the broker, holding at most 20 unacked messages per client, would stop after the 20th."""
    topic = _topic()
    with _sub_pub(broker_url, topic, 1) as (sub, pub):
        for i in range(100):
            pub.publish(topic, i.to_bytes(2, "big"), qos=1)
        assert [sub.inbox.get(timeout=10).payload for _ in range(100)] == [i.to_bytes(2, "big") for i in range(100)]
        assert sub._client.bulk_parsed > 20


def test_bulk_read_and_batched_pubacks_keep_every_field_and_the_session(broker_url: str) -> None:
    """QoS 0 and 1, retained or not, parsed in bulk (shared/mqttread.py) arrive with the topic, payload,
    QoS and retain flag they were sent with, in order within a QoS, and with the broker's mids. `ack_many` PUBACKs in
    one write per call; the broker reads each as its own packet: it keeps sending (it holds at most 20
    unacked QoS 1 messages per client) and, after a reconnect of the persistent session, re-delivers
    exactly the messages never acked."""
    base, cid = _topic(), f"t-sub-{uuid.uuid4().hex[:8]}"
    sent = [(f"{base}/{i % 3}", bytes([i % 256]) * (i % 40), i % 2, i % 7 == 0) for i in range(300)]
    pub = MqttLink(broker_url, f"t-pub-{uuid.uuid4().hex[:8]}")
    sub = MqttLink(broker_url, cid, subscriptions=[(f"{base}/+", 1)], manual_ack=True, clean_session=False)
    pub.start()
    sub.start()
    try:
        assert sub.wait_connected(10) and pub.wait_connected(10)
        for topic, payload, qos, retain in sent:
            pub.publish(topic, payload, qos=qos, retain=retain)
        got: list[Incoming] = []
        while len(got) < len(sent):
            got.append(sub.inbox.get(timeout=10))
            if len(got) % 8 == 0:
                sub.ack_many(got[-8:])  # QoS 0 ones among them: nothing to ack
        sub.ack_many(got[len(got) // 8 * 8 :])
        # a retained message reaches a subscriber that is there with retain 0 (MQTT 3.1.1 3.3.1.3); the broker
        # keeps the order within a QoS (QoS 0 passes QoS 1 messages held back by the 20 unacked)
        for qos in (0, 1):
            want = [(t, p, q, False) for t, p, q, _ in sent if q == qos]
            assert [(m.topic, m.payload, m.qos, m.retain) for m in got if m.qos == qos] == want
        assert sub._client.bulk_parsed >= len(sent) // 2
        ones = [m for m in got if m.qos == 1]
        assert all(m.mid > 0 for m in ones) and all(m.mid == 0 for m in got if m.qos == 0)
        last = [(f"{base}/x", bytes([i]), 1, False) for i in range(10)]
        for topic, payload, qos, _ in last:
            pub.publish(topic, payload, qos=qos)
        tail = [sub.inbox.get(timeout=10) for _ in last]
        sub.ack_many(tail[:4])
        time.sleep(0.5)  # the PUBACKs reach the broker
        sub.stop()
        sub = MqttLink(broker_url, cid, subscriptions=[(f"{base}/+", 1)], manual_ack=True, clean_session=False)
        sub.start()
        assert sub.wait_connected(10)
        again = []
        with pytest.raises(queue.Empty):
            while True:
                again.append(sub.inbox.get(timeout=1.5))
        # (the re-subscribe also brings the retained messages, flagged so)
        assert [m.payload for m in again if not m.retain] == [m.payload for m in tail[4:]]
        sub.ack_many(again)
    finally:
        sub.stop()
        for topic in {t for t, _, _, r in sent if r}:
            pub.publish(topic, b"", qos=1, retain=True)  # clear the retained messages
        pub.stop()


def test_retained_message_and_final_publish(broker_url: str) -> None:
    topic = _topic()
    pub = MqttLink(broker_url, f"t-pub-{uuid.uuid4().hex[:8]}")
    pub.start()
    assert pub.wait_connected(10)
    pub.stop(final=[(topic, b"offline", 1, True)])
    sub = MqttLink(broker_url, f"t-sub-{uuid.uuid4().hex[:8]}", subscriptions=[(topic, 1)])
    sub.start()
    try:
        got = sub.inbox.get(timeout=10)
        assert got.payload == b"offline" and got.retain
    finally:
        sub.stop(final=[(topic, b"", 1, True)])  # clear the retained message
    probe = MqttLink(broker_url, f"t-probe-{uuid.uuid4().hex[:8]}", subscriptions=[(topic, 1)])
    probe.start()
    try:
        assert probe.wait_connected(10)
        with pytest.raises(queue.Empty):
            probe.inbox.get(timeout=0.5)  # an empty retained payload deletes the retained message
    finally:
        probe.stop()


def test_reconnects_when_broker_comes_up_late(mosquitto) -> None:  # type: ignore[no-untyped-def]
    topic = _topic()
    link = MqttLink(mosquitto.url, f"t-late-{uuid.uuid4().hex[:8]}", subscriptions=[(topic, 1)])
    link.start()  # broker not running yet
    try:
        assert not link.wait_connected(1.5)
        mosquitto.start()
        assert link.wait_connected(20), "link did not connect after the broker came up"
        before = link.connect_count
        mosquitto.restart()
        deadline = time.monotonic() + 30
        while link.connect_count == before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert link.connect_count > before, "link did not reconnect after a broker restart"
        assert link.wait_connected(10)
        link.publish(topic, b"x", qos=1)
        assert link.inbox.get(timeout=10).payload == b"x"  # subscriptions were made again on reconnect
    finally:
        link.stop()


def test_tls_for_follows_the_settings(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from shared.mqtt import tls_for

    ca = tmp_path / "ca.pem"
    assert tls_for("mqtt://h:1883", None, None, None) is None
    assert tls_for("mqtts://h", None, None, None) is not None  # system CAs
    opts = tls_for("mqtt://h:8883", ca, None, None, insecure=True)
    assert opts is not None and opts.ca_certs == ca and opts.insecure


def _drain(link: MqttLink, seconds: float, ack: bool = True) -> list[str]:
    got, end = [], time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            m = link.inbox.get(timeout=0.05)
        except queue.Empty:
            continue
        got.append(m.topic)
        if ack:
            link.ack(m)
    return got


def test_mqtt5_shared_subscription_splits_and_keeps_the_session(broker_url: str) -> None:
    """Two MQTT 5 links in one `$share` group get each message once between them; a member that leaves
    (its session kept by session_expiry_s) gets its unacked share again when it returns under its id."""
    base, group = _topic(), uuid.uuid4().hex[:8]
    subs = [(f"$share/{group}/{base}/+", 1)]
    ids = [f"w-{uuid.uuid4().hex[:8]}" for _ in range(2)]
    a = MqttLink(broker_url, ids[0], subscriptions=subs, manual_ack=True, session_expiry_s=30)
    b = MqttLink(broker_url, ids[1], subscriptions=subs, manual_ack=True, session_expiry_s=30)
    pub = MqttLink(broker_url, f"p-{uuid.uuid4().hex[:8]}")
    for link in (a, b, pub):
        link.start()
        assert link.wait_connected(5)
    try:
        for i in range(10):
            pub.publish(f"{base}/{i}", b"x", 1)
        got_a, got_b = _drain(a, 1.0, ack=False), _drain(b, 0.1)
        assert sorted(got_a + got_b) == sorted(f"{base}/{i}" for i in range(10))  # each once
        assert got_a and got_b  # shared, not all to one
        a.stop()  # leaves without acking its share: the broker keeps it in a's session
        a = MqttLink(broker_url, ids[0], subscriptions=subs, manual_ack=True, session_expiry_s=30)
        a.start()
        assert a.wait_connected(5)
        assert sorted(_drain(a, 1.0)) == sorted(got_a)
    finally:
        for link in (a, b, pub):
            link.stop()
    with pytest.raises(ValueError, match="session_expiry_s"):
        MqttLink(broker_url, "x", session_expiry_s=-1)


@pytest.mark.parametrize(("pause", "reads"), [(0.0, 4), (0.025, 4), (0.05, 8), (0.06, 12)])
def test_a_paused_link_reads_more_per_turn(pause: float, reads: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """A link read at most every `read_pause_s` may read READS_PER_LOOP chunks per 25 ms of pause in one
    turn: a longer pause wakes it less often, never lowers what it can take per second (a flood)."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

    from shared.mqttread import PAUSE_UNIT_S, READS_PER_LOOP, BufferedClient

    seen: list[int] = []

    def fake_loop_read(self: BufferedClient, max_packets: int = 1) -> MQTTErrorCode:
        seen.append(self._reads_left)
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    monkeypatch.setattr(mqtt.Client, "loop_read", fake_loop_read)
    c = BufferedClient(CallbackAPIVersion.VERSION2, client_id="t")
    c.read_pause_s = pause
    c._read_at = time.monotonic() - 1.0  # no sleep in the turn
    c.loop_read()
    assert seen == [reads] and PAUSE_UNIT_S == 0.025 and READS_PER_LOOP == 4
