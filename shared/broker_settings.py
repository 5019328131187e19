"""Where and how to reach the broker: its url (`BrokerAddress`), TLS files (`TlsOptions`), the password
file, and the checks every side makes on those settings before it connects (client and coordinator).
The MQTT connection itself is shared.mqtt.MqttLink."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

DEFAULT_PORT = {"mqtt": 1883, "mqtts": 8883}
_URL = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://(?P<rest>.*)$")


@dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int
    tls: bool
    username: str | None = None
    password: str | None = None

    @classmethod
    def parse(cls, url: str) -> BrokerAddress:
        """`mqtt://[user[:pass]@]host[:port]` or `mqtts://...` (TLS); the password never gets logged.

        Strict on purpose: a typo such as `mqtt//host:1883` must fail here, not become a connection to
        a host called "mqtt" that hangs forever.
        """
        m = _URL.match(url.strip())
        if m is None:
            raise ValueError(f"{redact(url)!r} is not a url: write mqtt://host:port or mqtts://host:port")
        scheme = m["scheme"].lower()
        if scheme not in DEFAULT_PORT:
            raise ValueError(f"{redact(url)!r}: scheme {scheme}:// is not supported (use mqtt:// or mqtts://)")
        parsed = urlparse(url.strip())
        if not parsed.hostname:
            raise ValueError(f"{redact(url)!r}: no host (write {scheme}://host:port)")
        if parsed.path not in ("", "/") or parsed.query or parsed.fragment or parsed.params:
            raise ValueError(f"{redact(url)!r}: unexpected path or query after host:port")
        if parsed.netloc.endswith(":"):
            raise ValueError(f"{redact(url)!r}: empty port after ':'")
        try:
            port = parsed.port or DEFAULT_PORT[scheme]
        except ValueError:
            raise ValueError(f"{redact(url)!r}: the port must be a number in 1..65535") from None
        return cls(
            host=parsed.hostname,
            port=port,
            tls=scheme == "mqtts",
            username=unquote(parsed.username) if parsed.username else None,
            password=unquote(parsed.password) if parsed.password else None,
        )

    @property
    def loopback(self) -> bool:
        return is_loopback(self.host)

    def __str__(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses: traffic that never leaves the machine."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def redact(url: str) -> str:
    """The url with any password replaced by ***, for logs and errors."""
    try:
        parsed = urlparse(url)
        password = parsed.password
    except ValueError:
        return url
    if password is None:
        return url
    return url.replace(f":{password}@", ":***@", 1)


@dataclass(frozen=True)
class TlsOptions:
    ca_certs: Path | None = None
    certfile: Path | None = None
    keyfile: Path | None = None
    insecure: bool = False  # skip hostname check: test setups only


def tls_for(
    broker: str, ca: Path | None, cert: Path | None, key: Path | None, insecure: bool = False
) -> TlsOptions | None:
    """TLS options when the settings ask for TLS (an mqtts:// url, a CA or a client cert), else None."""
    if BrokerAddress.parse(broker).tls or ca is not None or cert is not None:
        return TlsOptions(ca, cert, key, insecure)
    return None


def broker_settings_problems(
    broker: str,
    username: str | None,
    password_file: Path | None,
    tls_ca: Path | None,
    tls_cert: Path | None,
    tls_key: Path | None,
    allow_plaintext_password: bool = False,
) -> list[str]:
    """Config checks every side makes on its broker settings, each naming the key (client and coordinator)."""
    problems: list[str] = []
    try:
        addr = BrokerAddress.parse(broker)
    except ValueError as exc:
        problems.append(f"broker: {exc}")
    else:
        if addr.password is not None:
            problems.append("broker: put the password in password_file, not in the url")
        plaintext = not addr.tls and tls_ca is None and tls_cert is None
        if plaintext and password_file is not None and not addr.loopback and not allow_plaintext_password:
            problems.append(
                f"password_file: the password would cross the network in clear text ({addr} is plain MQTT to a "
                "non-loopback host); use mqtts:// with tls_ca, or set allow_plaintext_password = true "
                "(trusted networks only)"
            )
    for key, p in (("password_file", password_file), ("tls_ca", tls_ca), ("tls_cert", tls_cert), ("tls_key", tls_key)):
        if p is not None and not p.is_file():
            problems.append(f"{key}: file {p} does not exist")
    if (tls_cert is None) != (tls_key is None):
        problems.append("tls_cert/tls_key: give both or neither")
    if password_file is not None and username is None:
        problems.append("password_file: set username too")
    return problems


def read_secret(path: Path | None) -> str | None:
    """A password kept in a file (first line, stripped); None without a file. Never log the result."""
    if path is None:
        return None
    return path.read_text(encoding="utf-8").strip()
