"""MqttLink against the real Mosquitto on 127.0.0.1:1883: what crosses the wire, acks, reconnect subscriptions."""

from __future__ import annotations

import os
import queue
import uuid

import pytest

from shared.mqtt import BrokerAddress, MqttLink, redact

BROKER = os.environ.get("MEERKAT_TEST_BROKER", "mqtt://127.0.0.1:1883")


def _topic() -> str:
    return f"meerkat-test/{uuid.uuid4().hex}"


def test_parse_urls() -> None:
    a = BrokerAddress.parse("mqtts://alice:s3cret@broker.local")
    assert (a.host, a.port, a.tls, a.username, a.password) == ("broker.local", 8883, True, "alice", "s3cret")
    assert "s3cret" not in str(a)
    assert BrokerAddress.parse("127.0.0.1:1999").port == 1999
    assert redact("mqtt://u:pw@h:1") == "mqtt://u:***@h:1"
    with pytest.raises(ValueError, match="scheme"):
        BrokerAddress.parse("http://x")
    with pytest.raises(ValueError, match="port"):
        BrokerAddress.parse("mqtt://x:notaport")


def test_publish_subscribe_and_puback() -> None:
    topic = _topic()
    sub = MqttLink(BROKER, f"t-sub-{uuid.uuid4().hex[:8]}", subscriptions=[(topic, 1)], manual_ack=True)
    pub = MqttLink(BROKER, f"t-pub-{uuid.uuid4().hex[:8]}")
    sub.start()
    pub.start()
    try:
        assert sub.wait_connected(10) and pub.wait_connected(10)
        # subscription is made in on_connect; give the SUBACK a moment by round-tripping a message
        mid = pub.publish(topic, b"\x01hello", qos=1)
        got = sub.inbox.get(timeout=10)
        assert (got.topic, got.payload, got.qos) == (topic, b"\x01hello", 1)
        sub.ack(got)
        assert pub.published.get(timeout=10) == mid
    finally:
        sub.stop()
        pub.stop()


def test_retained_message_and_final_publish() -> None:
    topic = _topic()
    pub = MqttLink(BROKER, f"t-pub-{uuid.uuid4().hex[:8]}")
    pub.start()
    assert pub.wait_connected(10)
    pub.stop(final=[(topic, b"offline", 1, True)])
    sub = MqttLink(BROKER, f"t-sub-{uuid.uuid4().hex[:8]}", subscriptions=[(topic, 1)])
    sub.start()
    try:
        got = sub.inbox.get(timeout=10)
        assert got.payload == b"offline" and got.retain
    finally:
        sub.stop(final=[(topic, b"", 1, True)])  # clear the retained message
    probe = MqttLink(BROKER, f"t-probe-{uuid.uuid4().hex[:8]}", subscriptions=[(topic, 1)])
    probe.start()
    try:
        assert probe.wait_connected(10)
        with pytest.raises(queue.Empty):
            probe.inbox.get(timeout=0.5)  # an empty retained payload deletes the retained message
    finally:
        probe.stop()
