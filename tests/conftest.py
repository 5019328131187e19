"""Fixtures shared by every test folder: real brokers.

`broker_url`: the Mosquitto already listening on 127.0.0.1:1883 when there is one (this machine and CI),
else a private `mosquitto` started on a free port for the session. `mosquitto` (factory): a private broker
with its own config for tests that kill/restart it or need ACL/TLS.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.demo.broker import free_port, port_open


class Mosquitto:
    """A private mosquitto process: start(), kill() (SIGKILL), restart() on the same port and store."""

    def __init__(self, workdir: Path, extra_conf: str = "", port: int | None = None) -> None:
        self.binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        if not os.path.exists(self.binary):
            pytest.skip("mosquitto binary not installed (apt-get install mosquitto)")
        self.port = port or free_port()
        self.workdir = workdir
        self.conf = workdir / "mosquitto.conf"
        (workdir / "store").mkdir(exist_ok=True)
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence true\n"
            f"persistence_location {workdir / 'store'}/\nautosave_interval 1\n{extra_conf}\n"
        )
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = workdir / "mosquitto.log"
        self.users: dict[str, str] = {}  # user -> password, when the config has a password file

    def configure(self, text: str) -> None:
        """Replace the whole config (before start): `{port}` and `{store}` are filled in."""
        self.conf.write_text(text.format(port=self.port, store=f"{self.workdir / 'store'}/"))

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> Mosquitto:
        self.proc = subprocess.Popen(
            [self.binary, "-c", str(self.conf)], stdout=self.log.open("ab"), stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + timeout
        while not port_open("127.0.0.1", self.port):
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited: {self.log.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError("mosquitto did not open its port")
            time.sleep(0.05)
        return self

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(10)
        self.proc = None

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def restart(self) -> None:
        self.stop()
        self.start()


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    """A private broker (not yet started: call .start(); extra config via .conf before starting)."""
    broker = Mosquitto(tmp_path)
    yield broker
    broker.kill()


@pytest.fixture(scope="session")
def broker_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    env = os.environ.get("MEERKAT_TEST_BROKER")
    if env:
        yield env
        return
    if port_open("127.0.0.1", 1883):
        yield "mqtt://127.0.0.1:1883"
        return
    broker = Mosquitto(tmp_path_factory.mktemp("broker")).start()
    try:
        yield broker.url
    finally:
        broker.kill()


DEPLOY = Path(__file__).resolve().parents[1] / "deploy" / "mosquitto"
ACL_USERS = {"coordinator": "c-secret", "coordinator-hb": "c-secret", "client_00": "pw-00", "client_01": "pw-01", "client_02": "pw-02"}


def _broker_conf(tmp: Path) -> str:
    """meerkat.conf with this test's files and one loopback listener (the TLS listener needs certs)."""
    text = (DEPLOY / "meerkat.conf").read_text()
    text = text.replace("/etc/mosquitto/meerkat.passwd", str(tmp / "passwd"))
    text = text.replace("/etc/mosquitto/meerkat.acl", str(DEPLOY / "meerkat.acl"))
    assert text.count("use_username_as_clientid true") == text.count("\nlistener ")
    text = re.sub(r"(?m)^(listener .*|certfile .*|keyfile .*|use_username_as_clientid .*)$", "", text)
    # as root mosquitto would drop to user "mosquitto", which cannot read pytest's private tmp dir
    return text + ("\nuser root\npersistence_location {store}\n"
                   "listener {port} 127.0.0.1\nuse_username_as_clientid true\n")


@pytest.fixture
def acl_broker(mosquitto: Mosquitto, tmp_path: Path) -> Mosquitto:
    """A private broker running deploy/mosquitto/meerkat.conf + meerkat.acl with the ACL_USERS passwords."""
    passwd = tmp_path / "passwd"
    for user, pw in ACL_USERS.items():
        subprocess.run(["mosquitto_passwd", "-b", *(["-c"] if not passwd.exists() else []), str(passwd), user, pw],
                       check=True, capture_output=True)
    mosquitto.configure(_broker_conf(tmp_path))
    mosquitto.users = dict(ACL_USERS)
    return mosquitto.start()
