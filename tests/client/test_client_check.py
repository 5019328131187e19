"""`meerkat client --check` and `meerkat coordinator --check` against the shipped broker config (ACL + passwords).

Real `meerkat` subprocesses, real Mosquitto running deploy/mosquitto/meerkat.conf: a good setup passes with
exit 0, a wrong password or a closed port fails with exit 4 and a line saying how to fix it, and a device
that can read other devices' retained statuses (an open, anonymous-free ACL gap) is caught.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from clienttoy import REPO, Toy, client_settings, uid, write_toml

from bench.demo.broker import free_port
from shared.mqtt import MqttLink

pytestmark = pytest.mark.slow


def _meerkat(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shared.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def _client_toml(toy: Toy, tmp: Path, url: str, fleet: str, user: str, password: str) -> Path:
    (tmp / f"{user}.pw").write_text(password + "\n")
    return write_toml(tmp / f"{user}.toml", client_settings(
        toy, url, fleet, user, tmp / f"state-{user}", username=user, password_file=str(tmp / f"{user}.pw")))


def _coord_toml(toy: Toy, tmp: Path, url: str, fleet: str, password: str) -> Path:
    (tmp / "coord.pw").write_text(password + "\n")
    p = tmp / "coord.toml"
    p.write_text(f'[coordinator]\nbroker = "{url}"\nfleet = "{fleet}"\nclient_id = "coordinator"\n'
                 f'username = "coordinator"\npassword_file = "{tmp / "coord.pw"}"\nstate_dir = "{tmp / "cs"}"\n'
                 f'model_dir = "{toy.model_dir}"\nmask = "{toy.mask_path}"\nmetrics = false\n')
    return p


def test_client_check_passes_then_fails_on_a_wrong_password(toy: Toy, acl_broker, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    fleet = uid("chk")
    good = _client_toml(toy, tmp_path, acl_broker.url, fleet, "client_00", acl_broker.users["client_00"])
    r = _meerkat("client", "--config", str(good), "--check")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "ok   connect" in r.stdout and "broker check passed" in r.stdout and "ok: model" in r.stdout
    assert "n/a  deny meerkat/v1/" in r.stdout  # nothing leaked (and it says it cannot prove more)

    bad = _client_toml(toy, tmp_path, acl_broker.url, fleet, "client_01", "wrong")
    t0 = time.monotonic()
    r = _meerkat("client", "--config", str(bad), "--check")
    assert r.returncode == 4, r.stdout + r.stderr
    assert "FAIL connect" in r.stderr and "refused the login" in r.stderr and "password_file" in r.stderr
    assert time.monotonic() - t0 < 60


def test_client_check_catches_a_device_that_reads_other_devices(toy: Toy, acl_broker, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The coordinator user reads the whole tree: checked as a 'device' it must fail the deny probe."""
    fleet = uid("leak")
    from shared.topics import Topics

    # a retained status of another device in this fleet (the ACL is per fleet: client_01 may not write
    # into a random fleet, the coordinator user may), which a correctly restricted device cannot read
    status = Topics(fleet).status("client_01")
    # The broker sets use_username_as_clientid: the planter is client id "coordinator" like the checked
    # "device", so it must be gone before the check connects (two sessions with one id take each other over)
    def plant(payload: bytes) -> None:
        planter = MqttLink(acl_broker.url, uid("plant"), username="coordinator",
                           password=acl_broker.users["coordinator"])
        planter.start()
        try:
            assert planter.wait_connected(10)
            planter.publish(status, payload, qos=1, retain=True)
            time.sleep(0.5)
        finally:
            planter.stop()

    plant(b"retained")
    try:
        leaky = _client_toml(toy, tmp_path, acl_broker.url, fleet, "coordinator", acl_broker.users["coordinator"])
        r = _meerkat("client", "--config", str(leaky), "--check")
    finally:
        plant(b"")  # clear it
    assert r.returncode == 4, r.stdout + r.stderr
    assert "FAIL deny" in r.stderr and "status/client_01" in r.stderr


def test_coordinator_check_round_trips_and_fails_on_a_closed_port(toy: Toy, acl_broker, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    fleet = uid("cchk")
    r = _meerkat("coordinator", "--config", str(_coord_toml(toy, tmp_path, acl_broker.url, fleet,
                                                             acl_broker.users["coordinator"])), "--check")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "ok   read+write" in r.stdout and "broker check passed" in r.stdout
    # a device's login cannot read+write the coordinator's inbox: the round trip must fail
    r = _meerkat("coordinator", "--config", str(_coord_toml(toy, tmp_path, acl_broker.url, fleet, "x")),
                 "--set", "username=client_00", "--set", f"password_file={_pw(tmp_path, acl_broker)}", "--check")
    assert r.returncode == 4 and "FAIL read+write" in r.stderr, r.stdout + r.stderr
    r = _meerkat("coordinator", "--config", str(_coord_toml(toy, tmp_path, f"mqtt://127.0.0.1:{free_port()}",
                                                             fleet, "x")), "--check")
    assert r.returncode == 4 and "refused" in r.stderr and "is the broker running" in r.stderr, r.stderr


def _pw(tmp: Path, broker) -> Path:  # type: ignore[no-untyped-def]
    p = tmp / "c00.pw"
    p.write_text(broker.users["client_00"])
    return p
