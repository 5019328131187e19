"""Connection failures are reported loudly, once, with cause and fix, while the link keeps retrying.

Real Mosquitto brokers with TLS (certificates made by coordinator.pki), a password file and an ACL; the
link logs at WARNING/ERROR (seen without -v) within 10 s, does not repeat the same line every retry, and
`trouble.failures` keeps growing (it retries).
"""

from __future__ import annotations

import logging
import queue
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from bench.demo.broker import free_port
from coordinator.pki import make_ca, make_leaf
from shared.mqtt import MqttLink, TlsOptions

LOGGER = "shared.mqtt"


def _wait(pred: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return pred()


def _loud(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno >= logging.WARNING]


def _expect_cause(caplog: pytest.LogCaptureFixture, link: MqttLink, needle: str, retries: int = 2) -> str:
    """Start `link`; within 10 s one loud line contains `needle`; it keeps retrying, without repeating the line."""
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    link.start()
    try:
        assert _wait(lambda: any(needle in m for m in _loud(caplog)), 10), _loud(caplog)
        assert _wait(lambda: link.trouble.failures >= retries, 15), "the link stopped retrying"
        assert not link.connected.is_set()
        lines = [m for m in _loud(caplog) if needle in m]
        assert len(lines) == 1, lines  # said once at WARNING/ERROR, the repeats go to DEBUG
        return lines[0]
    finally:
        link.stop()


def _certs(tmp: Path, server_name: str = "127.0.0.1") -> dict[str, Path]:
    ca, other_ca = make_ca("test fleet CA"), make_ca("some other CA")
    server = make_leaf(ca, "broker", server_names=(server_name,))
    files = {"ca": ca.cert_pem, "other_ca": other_ca.cert_pem, "crt": server.cert_pem, "key": server.key_pem}
    out = {}
    for name, data in files.items():
        (tmp / name).write_bytes(data)
        out[name] = tmp / name
    return out


def test_closed_port_is_reported_and_retried(caplog: pytest.LogCaptureFixture) -> None:
    link = MqttLink(f"mqtt://127.0.0.1:{free_port()}", f"t-{uuid.uuid4().hex[:6]}")
    line = _expect_cause(caplog, link, "refused")
    assert "is the broker running" in line


def test_unknown_host_is_reported(caplog: pytest.LogCaptureFixture) -> None:
    link = MqttLink("mqtt://no-such-broker.invalid:1883", f"t-{uuid.uuid4().hex[:6]}")
    assert "no-such-broker.invalid" in _expect_cause(caplog, link, "cannot resolve")


@pytest.fixture
def tls_broker(mosquitto, tmp_path: Path):  # type: ignore[no-untyped-def]
    certs = _certs(tmp_path)
    passwd = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(passwd), "dev1", "right"], check=True, capture_output=True)
    acl = tmp_path / "acl"
    acl.write_text("user dev1\ntopic readwrite ok/#\n")
    mosquitto.configure(
        "per_listener_settings false\nallow_anonymous false\nuser root\n"
        f"password_file {passwd}\nacl_file {acl}\npersistence false\n"
        "listener {port} 127.0.0.1\n"
        f"cafile {certs['ca']}\ncertfile {certs['crt']}\nkeyfile {certs['key']}\n"
    )
    mosquitto.start()
    mosquitto.certs = certs
    return mosquitto


def _tls_url(b) -> str:  # type: ignore[no-untyped-def]
    return f"mqtts://127.0.0.1:{b.port}"


def test_wrong_ca_is_reported(caplog, tls_broker) -> None:  # type: ignore[no-untyped-def]
    link = MqttLink(_tls_url(tls_broker), "dev1", username="dev1", password="right",
                    tls=TlsOptions(ca_certs=tls_broker.certs["other_ca"]))
    assert "tls_ca" in _expect_cause(caplog, link, "cannot verify the broker's certificate")


def test_plain_mqtt_to_a_tls_port_is_reported(caplog, tls_broker) -> None:  # type: ignore[no-untyped-def]
    link = MqttLink(f"mqtt://127.0.0.1:{tls_broker.port}", "dev1", username="dev1", password="right")
    assert "mqtts://" in _expect_cause(caplog, link, "closed the connection before answering")


def test_wrong_password_is_reported(caplog, tls_broker) -> None:  # type: ignore[no-untyped-def]
    link = MqttLink(_tls_url(tls_broker), "dev1", username="dev1", password="wrong",
                    tls=TlsOptions(ca_certs=tls_broker.certs["ca"]))
    assert "password_file" in _expect_cause(caplog, link, "refused the login")


def test_acl_denials_are_silent_on_mosquitto_2_acl_file(tls_broker) -> None:  # type: ignore[no-untyped-def]
    """What a device cannot see: Mosquitto 2.0's acl_file grants every SUBACK (it filters at delivery) and
    PUBACKs a refused QoS1 publish (MQTT 3.1.1 has no negative PUBACK). Only a round trip shows a denial,
    which is what `--check` does where the ACL allows one (the coordinator)."""
    link = MqttLink(_tls_url(tls_broker), "dev1", username="dev1", password="right",
                    tls=TlsOptions(ca_certs=tls_broker.certs["ca"]),
                    subscriptions=[("ok/mine", 1), ("forbidden/theirs", 1)])
    link.start()
    try:
        assert link.wait_connected(10)
        assert link.refused_subscriptions == []  # granted although the ACL denies it
        mid = link.publish("forbidden/theirs", b"x", qos=1)
        assert _wait(lambda: not link.published.empty() and link.published.get() == mid, 10)  # PUBACKed
        with pytest.raises(queue.Empty):
            link.inbox.get(timeout=1.0)  # ...and dropped
    finally:
        link.stop()


def test_a_refused_subscription_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    """Brokers that do refuse (SUBACK 0x80: dynamic-security, EMQX, HiveMQ) get a loud line naming the topics."""
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.reasoncodes import ReasonCode

    link = MqttLink("mqtt://127.0.0.1:1", "dev9", subscriptions=[("a/ok", 1), ("b/no", 1)])
    link._sub_mid = 7
    link._on_subscribe(link._client, None, 7, [ReasonCode(PacketTypes.SUBACK, identifier=1),
                                               ReasonCode(PacketTypes.SUBACK, identifier=0x80)], None)
    assert link.refused_subscriptions == ["b/no"]
    assert any("b/no" in m and "ACL" in m for m in _loud(caplog))


def test_tls_with_the_right_ca_connects_and_a_recovery_is_logged(caplog, tls_broker) -> None:  # type: ignore[no-untyped-def]
    link = MqttLink(_tls_url(tls_broker), "dev1", username="dev1", password="right",
                    tls=TlsOptions(ca_certs=tls_broker.certs["ca"]), subscriptions=[("ok/x", 1)])
    link.start()
    try:
        assert link.wait_connected(10)
        link.publish("ok/x", b"hi")
        assert link.inbox.get(timeout=10).payload == b"hi"
        assert link.trouble.failures == 0 and not _loud(caplog)
    finally:
        link.stop()
