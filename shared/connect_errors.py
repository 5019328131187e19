"""One line for each way connecting to the broker fails: what went wrong and which setting to change.
Pure functions of the error; shared.mqtt logs the lines (and repeats them sparingly)."""

from __future__ import annotations

import socket
import ssl

from paho.mqtt.reasoncodes import ReasonCode

from shared.broker_settings import BrokerAddress


def explain_connect_error(exc: BaseException | None, address: BrokerAddress) -> str:
    """One line for an error raised while opening the connection: what went wrong and what to change."""
    where = f"{address.host}:{address.port}"
    if isinstance(exc, ssl.SSLCertVerificationError):
        why = exc.verify_message or str(exc)
        if "hostname" in why.lower() or "ip address mismatch" in why.lower():
            return (f"TLS: the broker's certificate is not valid for {address.host!r} ({why}); connect by the name "
                    "in its certificate (or, on test setups only, set tls_insecure)")
        return (f"TLS: cannot verify the broker's certificate ({why}); set tls_ca to the CA file that signed "
                "the broker's certificate")
    if isinstance(exc, ssl.SSLError):
        reason = getattr(exc, "reason", None) or str(exc)
        if "WRONG_VERSION_NUMBER" in str(reason).upper() or "record layer" in str(exc):
            return (f"TLS handshake with {where} failed ({reason}): that port does not speak TLS; use mqtt:// "
                    "for a plain listener or the broker's TLS port (8883)")
        return (f"TLS handshake with {where} failed ({reason}); check tls_ca/tls_cert/tls_key and that the "
                "broker accepts this client certificate")
    if isinstance(exc, ConnectionRefusedError):
        return f"connection to {where} refused: nothing listens there; is the broker running and the port right?"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve broker host {address.host!r} ({exc.strerror}); check the host name in broker"
    if isinstance(exc, (TimeoutError, socket.timeout)):
        return f"no answer from {where} (timed out); check the address and any firewall between here and it"
    if isinstance(exc, ConnectionResetError):
        return (f"{where} closed the connection during set-up; if it is a TLS port, use mqtts:// "
                "(and tls_ca), else check the broker's log")
    if isinstance(exc, OSError):
        return f"cannot connect to {where}: {exc.strerror or exc}; check the network and broker url"
    return f"cannot connect to {where}: {exc!r}"


def explain_refusal(reason: ReasonCode | str) -> str:
    """One line for a CONNACK refusal (MQTT 3.1.1 codes 1-5)."""
    text = str(reason)
    low = text.lower()
    if "not authori" in low or "bad user name or password" in low:
        return (f"the broker refused the login ({text}): wrong password, unknown user or no user given; "
                "check username and password_file against the broker's password file")
    if "identifier" in low:
        return f"the broker refused the client id ({text}); check client_id"
    if "unavailable" in low:
        return f"the broker is unavailable ({text}); try later or check the broker's log"
    return f"the broker refused the connection ({text})"
