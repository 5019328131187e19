"""`--check` against the real broker: connect, log in, subscribe, publish, and say what fails and how to fix it.

Both sides use it (`meerkat client --check`, `meerkat coordinator --check`); each says which topics it must
read and write. What MQTT 3.1.1 with Mosquitto lets a checker see, and what it does not:
- connect, TLS and login failures: seen (socket error / CONNACK code), explained by `shared.mqtt`;
- a refused subscription: seen only on brokers that answer SUBACK 0x80; Mosquitto's `acl_file` grants
  every subscription and filters at delivery;
- a refused publish: never seen (no negative PUBACK in 3.1.1; Mosquitto PUBACKs and drops it);
- so read+write is proven only by a round trip (publish, receive it back), which the coordinator can do on
  its own inbox `to/{coordinator}`; a device cannot read what it writes, so for it "published" means only
  "the broker accepted the packet";
- a too-open ACL is seen when retained messages of other devices arrive on a topic it should not read.

The check logs in with the service's own client id and a persistent session (`clean_session=False`) and
never acknowledges what it receives, so queued messages stay queued for the service; it does take over
the service's connection for a moment, so run it before starting the service (install time).
"""

from __future__ import annotations

import queue
import time
import uuid
from dataclasses import dataclass

from shared.mqtt import MqttLink, TlsOptions


@dataclass(frozen=True)
class Check:
    """One line of the report: ok True (verified), False (failed: `detail` says how to fix), None (unverifiable)."""

    name: str
    ok: bool | None
    detail: str

    def line(self) -> str:
        mark = {True: "ok  ", False: "FAIL", None: "n/a "}[self.ok]
        return f"{mark} {self.name}: {self.detail}"


@dataclass(frozen=True)
class Plan:
    """What one side must be able to do on the broker."""

    read: tuple[str, ...]  # filters it subscribes to
    write: tuple[tuple[str, bytes, bool], ...]  # (topic, payload, retain) it may publish: a harmless real message
    roundtrip: str | None = None  # a topic it may both write and read: proves the ACL end to end
    must_not_read: tuple[str, ...] = ()  # filters whose retained messages must not reach it
    capture: tuple[str, ...] = ()  # topics (in `read`) whose retained message the caller wants (run_preflight)


def run_preflight(
    url: str,
    client_id: str,
    plan: Plan,
    *,
    username: str | None,
    password: str | None,
    tls: TlsOptions | None,
    timeout: float = 10.0,
    listen_s: float = 1.0,
    captured: dict[str, bytes] | None = None,
    capture_s: float = 3.0,
) -> list[Check]:
    """Run every check (stops after the first when the broker cannot be reached at all). The retained
    message of each `plan.capture` topic that arrives within `capture_s` goes into `captured` (not acked:
    it stays the service's)."""
    link = MqttLink(
        url, client_id, subscriptions=[(t, 1) for t in plan.read], username=username, password=password,
        tls=tls, manual_ack=True, clean_session=False, reconnect_min_s=1, reconnect_max_s=2,
    )
    checks: list[Check] = []
    link.start()
    try:
        if not link.wait_connected(timeout):
            why = link.trouble.last or f"no CONNACK from {link.address} within {timeout:.0f} s"
            return [Check("connect", False, why)]
        who = username or "(anonymous)"
        checks.append(Check("connect", True, f"{link.address} as user {who}, client id {client_id}"
                            + (", TLS verified" if link.address.tls or tls is not None else ", no TLS")))
        checks.append(_subscriptions(link, plan))
        if captured is not None:
            _capture(link, plan.capture, capture_s, captured)
        checks += _publishes(link, plan, timeout)
        if plan.roundtrip is not None:
            checks.append(_roundtrip(link, plan.roundtrip, timeout))
        checks += _leaks(link, plan, listen_s)
    finally:
        link.stop()
    return checks


def _capture(link: MqttLink, topics: tuple[str, ...], wait_s: float, out: dict[str, bytes]) -> None:
    """The first message on each of `topics` within `wait_s` (a retained one arrives right after SUBACK)."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline and not set(topics) <= set(out):
        try:
            msg = link.inbox.get(timeout=0.1)
        except queue.Empty:
            continue
        if msg.topic in topics and msg.topic not in out:
            out[msg.topic] = msg.payload


def _subscriptions(link: MqttLink, plan: Plan) -> Check:
    if link.refused_subscriptions:
        return Check("subscribe", False, f"refused {' '.join(link.refused_subscriptions)}: give this user read "
                     "access to them in the broker ACL (and check fleet/client_id)")
    return Check("subscribe", True, f"{len(plan.read)} filters granted (Mosquitto acl_file grants all; "
                 "it filters at delivery)")


def _publishes(link: MqttLink, plan: Plan, timeout: float) -> list[Check]:
    checks = []
    for topic, payload, retain in plan.write:
        mid = link.publish(topic, payload, qos=1, retain=retain)
        if _wait_mid(link, mid, timeout):
            checks.append(Check(f"publish {topic}", None, "accepted by the broker (MQTT 3.1.1 cannot tell "
                                "whether the ACL dropped it)"))
        else:
            checks.append(Check(f"publish {topic}", False, f"no PUBACK within {timeout:.0f} s"))
    return checks


def _roundtrip(link: MqttLink, topic: str, timeout: float) -> Check:
    nonce = f"meerkat-preflight {uuid.uuid4().hex}".encode()
    link.subscribe(topic, 1)
    time.sleep(0.2)  # let the SUBACK arrive before publishing
    link.publish(topic, nonce, qos=1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            msg = link.inbox.get(timeout=0.1)
        except queue.Empty:
            continue
        if msg.topic == topic and msg.payload == nonce:
            link.ack(msg)  # our own probe: nothing for the service to see
            link.unsubscribe(topic)
            return Check("read+write", True, f"{topic}: published and received back")
    link.unsubscribe(topic)
    return Check("read+write", False, f"{topic}: the broker accepted the publish but never delivered it back; "
                 f"the ACL does not let user {link.username!r} read and write this fleet's topics")


def _leaks(link: MqttLink, plan: Plan, listen_s: float) -> list[Check]:
    checks = []
    for flt in plan.must_not_read:
        link.subscribe(flt, 1)
        prefix = flt.rstrip("#+/")
        seen: list[str] = []
        deadline = time.monotonic() + listen_s
        while time.monotonic() < deadline:
            try:
                msg = link.inbox.get(timeout=0.1)
            except queue.Empty:
                continue
            if msg.topic.startswith(prefix):
                seen.append(msg.topic)
                link.ack(msg)  # not the service's: do not leave it queued in its session
        link.unsubscribe(flt)  # the session is persistent: do not leave the probe subscribed
        if seen:
            checks.append(Check(f"deny {flt}", False, f"received {', '.join(sorted(set(seen)))}: the ACL lets this "
                                "user read other devices' topics; restrict it to its own (pattern ... %c)"))
        else:
            checks.append(Check(f"deny {flt}", None, f"nothing received in {listen_s:.0f} s (a denial is only "
                                "visible when another device left a retained message there)"))
    return checks


def _wait_mid(link: MqttLink, mid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if link.published.get(timeout=0.1) == mid:
                return True
        except queue.Empty:
            continue
    return False


def report(checks: list[Check]) -> tuple[str, bool]:
    """The printed report and whether everything that could be verified passed."""
    ok = all(c.ok is not False for c in checks)
    return "\n".join(c.line() for c in checks) + ("\nbroker check passed" if ok else "\nbroker check FAILED"), ok
