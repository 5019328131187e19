"""deploy/mosquitto: the shipped broker config and ACL, run by a real Mosquitto, enforce device identity.

A device logs in as its client id and may write only its own topics and read only its own inbox; the
coordinator may do everything; anonymous and wrong-password logins are refused.
"""

from __future__ import annotations

import queue
import uuid

import pytest

from shared.mqtt import MqttLink
from shared.topics import Topics


def _link(url: str, user: str, password: str | None, subs: tuple[str, ...] = ()) -> MqttLink:
    return MqttLink(url, user, username=user, password=password, subscriptions=[(s, 1) for s in subs])


def test_devices_write_only_their_own_topics(acl_broker) -> None:  # type: ignore[no-untyped-def]
    t = Topics(f"acl{uuid.uuid4().hex[:8]}")
    coord = _link(acl_broker.url, "coordinator", acl_broker.users["coordinator"], (f"{t.base}/up/+",))
    # logged in as client_00 but claiming MQTT client id client_01: the broker uses the username as id
    dev0 = MqttLink(acl_broker.url, "client_01", username="client_00", password=acl_broker.users["client_00"],
                    subscriptions=[(t.to("client_00"), 1), (t.to("client_01"), 1)])
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
