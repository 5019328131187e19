"""deploy/mosquitto: the shipped broker config and ACL, run by a real Mosquitto, enforce device identity.

A device logs in as its client id and may write only its own topics OF ITS OWN FLEET and read only its
fleet's plan/results and its own inbox; the coordinator may do everything; anonymous and wrong-password
logins are refused; a packet over max_packet_size never reaches the coordinator (issue 14, item 6).
"""

from __future__ import annotations

import queue
import re
import time
from pathlib import Path

import pytest

from coordinator.broker_acl import render_acl
from shared.codec import LIMITS
from shared.mqtt import MqttLink
from shared.topics import Topics

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "mosquitto"
SHIPPED_FLEETS = {"fleet-a": ("client_00", "client_01"), "fleet-b": ("client_02",)}  # the example meerkat.acl
FLEET_A, FLEET_B = Topics("fleet-a"), Topics("fleet-b")


def _link(url: str, user: str, password: str | None, subs: tuple[str, ...] = ()) -> MqttLink:
    return MqttLink(url, user, username=user, password=password, subscriptions=[(s, 1) for s in subs])


def test_devices_write_only_their_own_topics(acl_broker) -> None:  # type: ignore[no-untyped-def]
    t = FLEET_A
    coord = _link(acl_broker.url, "coordinator", acl_broker.users["coordinator"], (f"{t.base}/up/+",))
    # logged in as client_00 but claiming MQTT client id client_01: the broker uses the username as id
    dev0 = MqttLink(
        acl_broker.url,
        "client_01",
        username="client_00",
        password=acl_broker.users["client_00"],
        subscriptions=[(t.to("client_00"), 1), (t.to("client_01"), 1)],
    )
    links = [coord, dev0]
    for link in links:
        link.start()
    try:
        assert coord.wait_connected(10) and dev0.wait_connected(10)
        dev0.publish(t.up("client_01"), b"forged", qos=1)  # the claimed id's topic: the broker drops it
        dev0.publish(t.up("client_00"), b"mine", qos=1)
        got = coord.inbox.get(timeout=10)
        assert (got.topic, got.payload) == (t.up("client_00"), b"mine")
        with pytest.raises(queue.Empty):
            coord.inbox.get(timeout=1.0)
        coord.publish(t.to("client_01"), b"for 01", qos=1)  # not readable by client_00
        coord.publish(t.to("client_00"), b"for 00", qos=1)
        got = dev0.inbox.get(timeout=10)
        assert (got.topic, got.payload) == (t.to("client_00"), b"for 00")
        with pytest.raises(queue.Empty):
            dev0.inbox.get(timeout=1.0)
    finally:
        for link in links:
            link.stop()


@pytest.mark.parametrize("user,password", [("client_00", "wrong"), ("nobody", None)])
def test_bad_or_missing_credentials_are_refused(acl_broker, user: str, password: str | None) -> None:  # type: ignore[no-untyped-def]
    link = _link(acl_broker.url, user, password)
    link.start()
    try:
        assert not link.wait_connected(2.0)
    finally:
        link.stop()


def _drain_none(link: MqttLink, wait: float = 1.0) -> None:
    with pytest.raises(queue.Empty):
        got = link.inbox.get(timeout=wait)
        raise AssertionError(f"unexpected message on {got.topic}")


def test_a_device_cannot_write_into_or_read_another_fleet(acl_broker) -> None:  # type: ignore[no-untyped-def]
    coord = _link(acl_broker.url, "coordinator", acl_broker.users["coordinator"], ("meerkat/v1/+/up/+",))
    spy = _link(acl_broker.url, "client_02", acl_broker.users["client_02"], (FLEET_A.plan, FLEET_A.filter("result"),
                                                                           FLEET_B.plan))  # fmt: skip
    links = [coord, spy]
    for link in links:
        link.start()
    try:
        assert coord.wait_connected(10) and spy.wait_connected(10)
        spy.publish(FLEET_A.up("client_02"), b"into fleet a", qos=1)  # its own id, the wrong fleet
        spy.publish(FLEET_B.up("client_02"), b"own fleet", qos=1)
        got = coord.inbox.get(timeout=10)
        assert (got.topic, got.payload) == (FLEET_B.up("client_02"), b"own fleet")
        _drain_none(coord)
        coord.publish(FLEET_A.plan, b"plan a", qos=1, retain=True)
        coord.publish(FLEET_A.result(3), b"result a", qos=1)
        coord.publish(FLEET_B.plan, b"plan b", qos=1, retain=True)
        got = spy.inbox.get(timeout=10)
        assert (got.topic, got.payload) == (FLEET_B.plan, b"plan b")
        _drain_none(spy)
    finally:
        for link in links:
            link.stop()


def test_an_oversized_packet_is_refused_by_the_broker(acl_broker) -> None:  # type: ignore[no-untyped-def]
    conf = (DEPLOY / "meerkat.conf").read_text()
    max_packet = int(re.search(r"(?m)^max_packet_size (\d+)$", conf).group(1))  # type: ignore[union-attr]
    assert max_packet == max(lim.max_payload for lim in LIMITS.values()) + 4096  # derived from the codec
    assert re.search(r"(?m)^max_queued_bytes \d+$", conf) and re.search(
        r"(?m)^max_queued_messages \d+$", conf
    )
    coord = _link(acl_broker.url, "coordinator", acl_broker.users["coordinator"], (FLEET_A.filter("up"),))
    dev = _link(acl_broker.url, "client_00", acl_broker.users["client_00"])
    for link in (coord, dev):
        link.start()
    try:
        assert coord.wait_connected(10) and dev.wait_connected(10)
        dev.publish(FLEET_A.up("client_00"), b"\0" * (max_packet + 1), qos=0)
        _drain_none(coord, 2.0)
        deadline = time.monotonic() + 15  # the broker dropped the device; once it is back, small ones pass
        while time.monotonic() < deadline:
            if dev.wait_connected(1):
                dev.publish(FLEET_A.up("client_00"), b"small", qos=0)
                try:
                    got = coord.inbox.get(timeout=1)
                    break
                except queue.Empty:
                    continue
        else:
            raise AssertionError("the device never got a small message through after the big one")
        assert got.payload == b"small"
    finally:
        for link in (coord, dev):
            link.stop()


def test_shipped_acl_is_rendered_for_the_test_fleets_and_has_no_fleet_wildcard() -> None:
    shipped = (DEPLOY / "meerkat.acl").read_text()
    assert shipped == render_acl(SHIPPED_FLEETS)
    assert "+/" not in shipped and "pattern" not in shipped
    with pytest.raises(ValueError, match="listed twice"):
        render_acl({"a": ["d1"], "b": ["d1"]})
    with pytest.raises(ValueError, match="fleet id"):
        render_acl({"a/#": ["d1"]})
