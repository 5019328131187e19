"""The provisioned broker binds a device's certificate to its login (issue 26), run by a real Mosquitto with
TLS and client certificates: dev-a's key with dev-b's user name and correct password, or with the
coordinator's, gets dev-a's rights and nothing more (`use_identity_as_username` on the TLS listener)."""

from __future__ import annotations

import queue
from pathlib import Path

import pytest

from coordinator.provision import provision
from shared.mqtt import MqttLink, TlsOptions
from shared.topics import Topics

T = Topics("ident")


def _fleet(tmp: Path, port: int) -> Path:
    p = tmp / "fleet.toml"
    p.write_text(f'fleet = "ident"\nbroker_host = "127.0.0.1"\nbroker_port = {port}\nlisten_host = "127.0.0.1"\n'
                 f'devices = ["dev-a", "dev-b"]\nbroker_dir = "{tmp / "out" / "broker"}"\n')  # fmt: skip
    return p


def _link(url: str, bundle: Path, client_id: str, username: str, password: str, subs: tuple[str, ...] = ()) -> MqttLink:
    tls = TlsOptions(bundle / "ca.crt", bundle / "client.crt", bundle / "client.key")
    return MqttLink(url, client_id, username=username, password=password, tls=tls,
                    subscriptions=[(s, 1) for s in subs])  # fmt: skip


def _secret(path: Path) -> str:
    return path.read_text().strip()


@pytest.mark.timeout(120)
def test_a_certificate_logs_in_as_its_own_device_only(mosquitto, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "out"
    provision(_fleet(tmp_path, mosquitto.port), out)
    conf = (out / "broker" / "mosquitto.conf").read_text()
    assert "use_identity_as_username true" in conf.split(f"listener {mosquitto.port}", 1)[1]  # on the TLS listener
    mosquitto.configure((conf + "user root\n").replace("{", "{{").replace("}", "}}"))  # root: pytest's tmp is private
    mosquitto.start()
    url = f"mqtts://127.0.0.1:{mosquitto.port}"
    dev_a, dev_b, cb = out / "devices" / "dev-a", out / "devices" / "dev-b", out / "coordinator"
    coord = _link(url, cb, "coordinator", "coordinator", _secret(cb / "coordinator.password"), (T.filter("up"),))
    real_b = _link(url, dev_b, "dev-b", "dev-b", _secret(dev_b / "broker.password"), (T.to("dev-b"),))
    links = [coord, real_b]
    for link in links:
        link.start()
    try:
        assert coord.wait_connected(15) and real_b.wait_connected(15), (coord.trouble.last, real_b.trouble.last)
        # dev-a's certificate and key with dev-b's name, client id and (correct) password: it is dev-a
        thief = _link(url, dev_a, "dev-b", "dev-b", _secret(dev_b / "broker.password"), (T.to("dev-b"), T.to("dev-a")))
        links.append(thief)
        thief.start()
        assert thief.wait_connected(15), thief.trouble.last
        thief.publish(T.up("dev-b"), b"forged", qos=1)  # dev-b's topic: dropped by the ACL
        thief.publish(T.up("dev-a"), b"as dev-a", qos=1)  # what its certificate is: allowed
        got = coord.inbox.get(timeout=10)
        assert (got.topic, got.payload) == (T.up("dev-a"), b"as dev-a")
        with pytest.raises(queue.Empty):
            coord.inbox.get(timeout=1.0)
        coord.publish(T.to("dev-b"), b"for b", qos=1)
        coord.publish(T.to("dev-a"), b"for a", qos=1)
        got = thief.inbox.get(timeout=10)
        assert (got.topic, got.payload) == (T.to("dev-a"), b"for a")  # dev-b's inbox stays closed to it
        with pytest.raises(queue.Empty):
            thief.inbox.get(timeout=1.0)
        assert real_b.inbox.get(timeout=10).payload == b"for b"  # and the real dev-b was not pushed off
        thief.stop()
        links.remove(thief)
        # dev-a's key with the coordinator's name and password: no coordinator rights
        boss = _link(url, dev_a, "coordinator", "coordinator", _secret(cb / "coordinator.password"), (T.filter("up"),))
        links.append(boss)
        boss.start()
        assert boss.wait_connected(15), boss.trouble.last
        boss.publish(T.to("dev-b"), b"orders", qos=1)  # writing a device's inbox: the coordinator's right
        real_b.publish(T.up("dev-b"), b"update", qos=1)  # reading up/+: the coordinator's right
        got = coord.inbox.get(timeout=10)
        assert (got.topic, got.payload) == (T.up("dev-b"), b"update")  # the real coordinator was not pushed off
        with pytest.raises(queue.Empty):
            boss.inbox.get(timeout=1.0)
        coord.publish(T.to("dev-b"), b"for b again", qos=1)
        assert real_b.inbox.get(timeout=10).payload == b"for b again"  # "orders" never arrived before it
    finally:
        for link in links:
            link.stop()
