"""`meerkat provision`: one fleet description in, every certificate, password and config file out.

Why: setting a fleet up by hand took raw openssl, `mosquitto_passwd` (whose file the broker then could
not read) and hand-written ACLs. Like NVIDIA FLARE's `provision`, this writes one startup kit per site:

    OUT/ca/            ca.crt, ca.key, crl.pem, fleet.json (serials, revoked ids)   -- keep OUT/ca private
    OUT/broker/        mosquitto.conf, passwd, acl, ca.crt, server.crt, server.key, crl.pem
    OUT/coordinator/   coordinator.toml, coordinator.password, ca.crt, client.crt, client.key
    OUT/devices/ID/    client.toml, broker.password, ca.crt, client.crt, client.key  -- copy to the device

Every secret file is 0600. Re-running with more devices adds them and keeps existing certificates and
passwords; `--revoke ID` removes a device's password and ACL entry and lists its certificate in crl.pem,
which the broker checks (`crlfile`, with `require_certificate true`), so a revoked device fails twice
(the handshake, and an ACL that grants its name nothing). The TLS listener takes the login from the
certificate (`use_identity_as_username`): a device is its certificate's CN.

The fleet description (TOML):

    fleet = "pilot"                  # topic namespace meerkat/v1/pilot/
    broker_host = "broker.example.org"   # name the devices use; the broker certificate is made for it
    broker_port = 8883
    coordinator_id = "coordinator"
    devices = ["jetson-01", "jetson-02"]
    broker_dir = "/etc/mosquitto/meerkat"   # where OUT/broker is installed (paths in mosquitto.conf)
    config_dir = "/etc/meerkat"             # where a bundle is installed on a device / the coordinator
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import secrets
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coordinator.broker_acl import render_acl
from shared import config as cfg
from shared.codec import LIMITS
from shared.config import ConfigError, load_config
from shared.fsio import SHARED_MODE, STATE_MODE, atomic_write
from shared.topics import ID_RE


def _is_id(v: str) -> bool:
    return bool(ID_RE.match(v))


@dataclass(frozen=True)
class Fleet:
    fleet: str = cfg.field("default", "fleet name: topics under meerkat/v1/{fleet}/", (_is_id, "is not a valid id"))
    broker_host: str = cfg.field("localhost", "broker host name the devices connect to (in its certificate)")
    broker_port: int = cfg.field(8883, "broker TLS port", (lambda v: 0 < v < 65536, "must be in 1..65535"))
    coordinator_id: str = cfg.field("coordinator", "coordinator user / client id", (_is_id, "is not a valid id"))
    devices: tuple[str, ...] = cfg.field((), "device ids (user name = client id = topic segment)")
    broker_dir: Path = cfg.field(Path("/etc/mosquitto/meerkat"), "where OUT/broker is installed on the broker host")
    config_dir: Path = cfg.field(Path("/etc/meerkat"), "where a device's / the coordinator's bundle is installed")
    listen_host: str = cfg.field("", "broker listener address ('' = all interfaces)")

    def validate(self) -> list[str]:
        bad = [d for d in self.devices if not _is_id(d)]
        problems = [f"devices: {d!r} is not a valid id" for d in bad]
        if self.coordinator_id in self.devices:
            problems.append(f"devices: {self.coordinator_id!r} is the coordinator_id")
        if len(set(self.devices)) != len(self.devices):
            problems.append("devices: listed twice")
        return problems


def mosquitto_hash(password: str, iterations: int = 101) -> str:
    """The `$7$` PBKDF2-SHA512 line format of Mosquitto 2 password files (what `mosquitto_passwd` writes)."""
    salt = secrets.token_bytes(12)
    dk = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(dk).decode()}"


def _write(path: Path, data: str | bytes, secret: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.parent.parent.name in ("devices",) or path.parent.name in ("coordinator", "ca"):
        secret = True  # a bundle (or the CA) is private as a whole: 0600 files in a 0700 directory
        os.chmod(path.parent, 0o700)
    atomic_write(path, data.encode() if isinstance(data, str) else data, mode=STATE_MODE if secret else SHARED_MODE)


# the largest legal meerkat payload + 4 KiB for the MQTT header, topic and properties (deploy/mosquitto/meerkat.conf)
MAX_PACKET = max(lim.max_payload for lim in LIMITS.values()) + 4096


def acl_text(f: Fleet) -> str:
    """The per-fleet ACL (coordinator.broker_acl: one block per device, no fleet wildcard)."""
    header = f"# meerkat fleet {f.fleet}: written by `meerkat provision` (do not edit: re-run it)\n"
    return header + render_acl({f.fleet: f.devices}, coordinator=f.coordinator_id, observers=())


def mosquitto_conf(f: Fleet) -> str:
    d = f.broker_dir
    listen = f"listener {f.broker_port} {f.listen_host}".rstrip()
    return f"""# Mosquitto 2.x for meerkat fleet {f.fleet}: written by `meerkat provision` (see docs/DEPLOY.md)
per_listener_settings false
allow_anonymous false
password_file {d}/passwd
acl_file {d}/acl
# limits as in deploy/mosquitto/meerkat.conf (docs/SECURITY.md): the largest legal payload + 4 KiB,
# bounded per-client queues in count and bytes (devices re-send from their outbox)
max_packet_size {MAX_PACKET}
max_queued_messages 1000
max_queued_bytes 33554432
max_inflight_messages 20
# persistence as in deploy/mosquitto/meerkat.conf (docs/RELIABILITY.md: correct without it, fewer re-sends with it)
persistence true
persistence_location {d}/store/
autosave_interval 10

{listen}
use_username_as_clientid true
cafile {d}/ca.crt
certfile {d}/server.crt
keyfile {d}/server.key
require_certificate true
crlfile {d}/crl.pem
# the login is the certificate: the user name is its CN (the device id; the coordinator's id for the
# coordinator), whatever name and password the client sends, so one device's key cannot log in as another
# device even with that device's password (docs/SECURITY.md). The ACL then applies to the CN.
use_identity_as_username true
"""


def _client_toml(f: Fleet, device: str) -> str:
    c = f.config_dir
    return f"""# meerkat client {device}, fleet {f.fleet}: written by `meerkat provision`. Install this directory as
# {c} (`deploy/install.sh client --bundle THIS_DIR`). Fill in model_dir/mask/data; every key:
# `meerkat client --print-config`. Check before starting: `meerkat client --config {c}/client.toml --check`.
broker = "mqtts://{f.broker_host}:{f.broker_port}"
fleet = "{f.fleet}"
client_id = "{device}"
username = "{device}"
password_file = "{c}/broker.password"
tls_ca = "{c}/ca.crt"
tls_cert = "{c}/client.crt"
tls_key = "{c}/client.key"
model_dir = "/opt/models/base"
mask = "/opt/models/base.mask.safetensors"
data = "/var/lib/meerkat-data/train.jsonl"
state_dir = "/var/lib/meerkat/client"
"""


def _coordinator_toml(f: Fleet) -> str:
    c = f.config_dir
    return f"""# meerkat coordinator, fleet {f.fleet}: written by `meerkat provision`. Fill in model_dir/mask;
# every key: `meerkat coordinator --print-config`. Check: `meerkat coordinator --config {c}/coordinator.toml --check`.
[coordinator]
broker = "mqtts://{f.broker_host}:{f.broker_port}"
fleet = "{f.fleet}"
client_id = "{f.coordinator_id}"
username = "{f.coordinator_id}"
password_file = "{c}/coordinator.password"
tls_ca = "{c}/ca.crt"
tls_cert = "{c}/client.crt"
tls_key = "{c}/client.key"
state_dir = "/var/lib/meerkat/coordinator"
model_dir = "/srv/models/base"
mask = "/srv/models/base.mask.safetensors"
"""


class Provisioner:
    """Reads what OUT already holds (CA, passwords, serials) and brings it up to the fleet description."""

    def __init__(self, fleet: Fleet, out: Path) -> None:
        from coordinator.pki import KeyPair, make_ca

        self.f, self.out = fleet, out
        self.state_path = out / "ca" / "fleet.json"
        self.state: dict[str, Any] = (
            json.loads(self.state_path.read_text()) if self.state_path.exists() else {"serials": {}, "revoked": {}}
        )
        ca_crt, ca_key = out / "ca" / "ca.crt", out / "ca" / "ca.key"
        if ca_crt.exists():
            self.ca = KeyPair(ca_crt.read_bytes(), ca_key.read_bytes())
        else:
            self.ca = make_ca(f"meerkat fleet {fleet.fleet} CA")
            _write(ca_crt, self.ca.cert_pem)
            _write(ca_key, self.ca.key_pem, secret=True)

    def _identity(self, name: str, bundle: Path, pw_file: str) -> str:
        """Certificate + password for `name` in `bundle`, kept when they exist; returns the password."""
        from coordinator.pki import make_leaf

        if not (bundle / "client.crt").exists():
            leaf = make_leaf(self.ca, name)
            _write(bundle / "client.crt", leaf.cert_pem)
            _write(bundle / "client.key", leaf.key_pem, secret=True)
            self.state["serials"][name] = leaf.cert.serial_number
        if not (bundle / pw_file).exists():
            _write(bundle / pw_file, secrets.token_urlsafe(24) + "\n", secret=True)
        _write(bundle / "ca.crt", self.ca.cert_pem)
        return (bundle / pw_file).read_text().strip()

    def run(self, revoke: tuple[str, ...] = ()) -> list[str]:
        from coordinator.pki import make_crl, make_leaf

        f, out, notes = self.f, self.out, []
        for dev in revoke:
            if dev in self.state["serials"]:
                self.state["revoked"][dev] = self.state["serials"].pop(dev)
                shutil.rmtree(out / "devices" / dev, ignore_errors=True)
                notes.append(f"revoked {dev}")
        users: dict[str, str] = {}
        coord = out / "coordinator"
        users[f.coordinator_id] = self._identity(f.coordinator_id, coord, "coordinator.password")
        _write(coord / "coordinator.toml", _coordinator_toml(f), secret=True)
        for dev in f.devices:
            if dev in self.state["revoked"]:
                notes.append(f"{dev}: revoked earlier, skipped (remove it from devices)")
                continue
            bundle = out / "devices" / dev
            if not bundle.exists():
                notes.append(f"added {dev}")
            users[dev] = self._identity(dev, bundle, "broker.password")
            _write(bundle / "client.toml", _client_toml(f, dev), secret=True)
        broker = out / "broker"
        if not (broker / "server.crt").exists():
            names = tuple(dict.fromkeys((f.broker_host, "localhost", "127.0.0.1")))
            server = make_leaf(self.ca, f.broker_host, server_names=names)
            _write(broker / "server.crt", server.cert_pem)
            _write(broker / "server.key", server.key_pem, secret=True)
        _write(broker / "ca.crt", self.ca.cert_pem)
        _write(broker / "crl.pem", make_crl(self.ca, list(self.state["revoked"].values())))
        _write(out / "ca" / "crl.pem", (broker / "crl.pem").read_bytes())
        _write(broker / "passwd", "".join(f"{u}:{mosquitto_hash(p)}\n" for u, p in sorted(users.items())), secret=True)
        _write(broker / "acl", acl_text(f))
        _write(broker / "mosquitto.conf", mosquitto_conf(f))
        (broker / "store").mkdir(exist_ok=True)
        _write(self.state_path, json.dumps(self.state, indent=1, sort_keys=True), secret=True)
        return notes


def provision(fleet_file: Path, out: Path, revoke: tuple[str, ...] = (), overrides: dict[str, Any] | None = None) -> list[str]:
    fleet = load_config(Fleet, fleet_file, overrides=overrides)
    return Provisioner(fleet, out).run(revoke)


def register(sub: Any) -> None:
    p = sub.add_parser(
        "provision", help="make a fleet's CA, certificates, passwords, broker config/ACL and one bundle per device",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("fleet", type=Path, help="fleet description (TOML, see above)")
    p.add_argument("--out", type=Path, required=True, help="output directory (re-run: adds devices, keeps the rest)")
    p.add_argument("--revoke", action="append", default=[], metavar="ID", help="revoke a device (repeatable)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a fleet key")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from shared.config import parse_overrides

    try:
        notes = provision(args.fleet, args.out, tuple(args.revoke), parse_overrides(args.set))
    except ConfigError as exc:
        print(f"meerkat provision: {exc}", file=sys.stderr)
        return 2
    for n in notes:
        print(n)
    print(f"wrote {args.out}: install broker/ on the broker host, coordinator/ and devices/ID/ on each machine "
          "(docs/DEPLOY.md)")
    return 0
