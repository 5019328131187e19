"""Find or start a Mosquitto broker for the demo and the benchmarks.

Order: the URL the user gave; else a broker answering on 127.0.0.1:1883; else the `mosquitto` binary
started on a free loopback port with a temporary config (stopped when the demo ends). When none of these
works the error says how to get one.
"""

from __future__ import annotations

import logging
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from shared.mqtt import BrokerAddress

log = logging.getLogger(__name__)

INSTALL_HINT = (
    "no MQTT broker found: nothing answers on 127.0.0.1:1883 and the `mosquitto` binary is not installed.\n"
    "Install it (Debian/Ubuntu/Jetson: `sudo apt-get install mosquitto`; macOS: `brew install mosquitto`) "
    "or pass --broker mqtt://host:port."
)


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Broker:
    url: str
    started_here: bool = False
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc = None


def find_or_start_broker(url: str | None, workdir: Path, timeout: float = 10.0) -> Broker:
    if url:
        addr = BrokerAddress.parse(url)
        if not port_open(addr.host, addr.port):
            raise RuntimeError(f"broker {addr} does not answer")
        return Broker(url)
    if port_open("127.0.0.1", 1883):
        return Broker("mqtt://127.0.0.1:1883")
    binary = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
    if binary is None:
        raise RuntimeError(INSTALL_HINT)
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    conf = workdir / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
    logf = (workdir / "mosquitto.log").open("ab")
    proc = subprocess.Popen([binary, "-c", str(conf)], stdout=logf, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    while not port_open("127.0.0.1", port):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"could not start {binary}: see {workdir / 'mosquitto.log'}")
        time.sleep(0.05)
    log.info("started mosquitto on 127.0.0.1:%d", port)
    return Broker(f"mqtt://127.0.0.1:{port}", started_here=True, proc=proc)
