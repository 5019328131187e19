"""The coordinator's MQTT links: the manual-ack link with the config's login, TLS and flood gate, the
heartbeats' own link beside it, and the pump's batch take. Used by the single pump (coordinator/server.py)
and the cluster workers (coordinator/workers.py) alike.
"""

from __future__ import annotations

import logging
import queue
from collections.abc import Sequence

from coordinator.broker_acl import TELEMETRY_SUFFIX
from coordinator.config import CoordinatorConfig
from coordinator.floodgate import FloodGate
from coordinator.intake import INBOUND
from shared.mqtt import Incoming, MqttLink, read_secret, tls_for
from shared.topics import Topics

log = logging.getLogger(__name__)

BATCH = 512  # messages the pump takes from its inbox per loop iteration (one transaction)
# Heartbeats trickle in (667/s at 10,000 devices and heartbeat_s 15, QoS 0): each one alone would cost both
# threads a wake-up and the pump a pass through tick, so while only heartbeats wait the pump takes a batch
# at most every SETTLE_S, and the heartbeats' own link (telemetry_link) reads its socket at most every
# READ_PAUSE_S (bench.fleet.ingest_cost hb_steady: ~300 us CPU per heartbeat at once, ~160 at 10 ms, ~140 at
# 25 ms). Any other message (QoS 1: the broker sends only max_inflight_messages unacked) is taken at once,
# with what is there; a busy pump never waits. 50 ms rather than 25: ~33 heartbeats a batch at 10,000
# devices, hb_steady 70-74 -> 54-61 us per heartbeat (docs/SCALING.md "Fifth pass"); the link reads twice as
# much per turn (shared/mqttread.py PAUSE_UNIT_S), so it still takes ~10 MB/s (issue 26's flood: ~5 MB/s).
SETTLE_S = 0.05
READ_PAUSE_S = SETTLE_S


OUT_QUEUE = 100_000  # QoS 1 publishes waiting for PUBACK: a join nag (ErrorMsg) to every device of a 100,000 fleet

def connect_links(c: CoordinatorConfig, topics: Topics, wait_s: float = 5.0) -> tuple[MqttLink, MqttLink | None]:
    """The single coordinator's links: the main one (every inbound kind but heartbeats when `telemetry_link`)
    and the heartbeats' own connection into the main link's flood gate (its slow lane), so a flood never
    queues in front of updates at the broker. Not with a client certificate: a broker that takes the
    certificate's identity as the login (use_identity_as_username) would make both links one client id,
    each taking the other's session. When the heartbeat link cannot connect (a broker without the "-hb"
    user), heartbeats go on the main link, with a warning: a fleet whose heartbeats are lost goes offline."""
    tele = c.telemetry_link and c.tls_cert is None
    if c.telemetry_link and c.tls_cert is not None:
        log.info("telemetry_link: off with a client certificate (tls_cert): heartbeats share the main link")
    subs = [(topics.filter(k), topics.qos(k)) for k in INBOUND if not (tele and k == "hb")]
    link = broker_link(c, c.client_id, subs, clean_session=False)
    if not tele:
        return link, None
    hb = broker_link(c, c.client_id + TELEMETRY_SUFFIX, [(topics.filter("hb"), 0)], inbox=link.inbox,
                     login_suffix=TELEMETRY_SUFFIX, read_pause_s=READ_PAUSE_S, clean_session=True)  # fmt: skip
    if hb.wait_connected(wait_s):
        return link, hb
    hb.stop()
    who = "" if c.username is None else f" as {c.username}{TELEMETRY_SUFFIX}"
    log.warning("telemetry_link: the heartbeat link could not connect%s (%s): heartbeats share the main link, "
                "so a heartbeat flood can delay updates; add that user to the broker's password file and ACL "
                "(docs/DEPLOY.md) or set telemetry_link = false", who, hb.trouble.last or "no answer")  # fmt: skip
    link.subscribe(topics.filter("hb"), topics.qos("hb"))
    return link, None


def broker_link(
    config: CoordinatorConfig, client_id: str, subscriptions: Sequence[tuple[str, int]], *,
    inbox: queue.Queue[Incoming] | None = None, login_suffix: str = "", read_pause_s: float = 0.0,
    **session: int | bool,
) -> MqttLink:
    """A started, manual-ack link to the broker with the config's login (username + `login_suffix`) and TLS,
    subscribed to (filter, QoS) pairs; `session`: clean_session / session_expiry_s (a worker's shared session).
    Its inbox is a new flood gate (coordinator/floodgate.py), or `inbox` (another link's gate, shared).
    `read_pause_s`: the least time between two reads of its socket (the heartbeats' link: READ_PAUSE_S)."""
    c = config
    gate = FloodGate(c.rate_per_s, c.rate_burst) if inbox is None else inbox
    link = MqttLink(
        c.broker, client_id, subscriptions=list(subscriptions), manual_ack=True, max_queued=OUT_QUEUE,
        username=None if c.username is None else c.username + login_suffix, password=read_secret(c.password_file),
        tls=tls_for(c.broker, c.tls_ca, c.tls_cert, c.tls_key), inbox=gate, read_pause_s=read_pause_s,
        **session,  # type: ignore[arg-type]
    )  # fmt: skip
    if inbox is None and isinstance(gate, FloodGate):
        gate.ack = link.ack  # QoS 1 messages refused at the gate are acked on the link they came by
    link.start()
    return link


def take_batch(inbox: queue.Queue[Incoming], timeout: float, not_before: float = 0.0) -> list[Incoming]:
    """Up to BATCH messages: wait up to `timeout` for the first, then take what is there; a flood gate
    lets heartbeats gather until `not_before` (time.monotonic(): the previous take + SETTLE_S)."""
    if isinstance(inbox, FloodGate):
        return inbox.get_many(BATCH, timeout, not_before)
    batch: list[Incoming] = []
    try:
        batch.append(inbox.get(timeout=timeout))
        while len(batch) < BATCH:
            batch.append(inbox.get_nowait())
    except queue.Empty:
        pass
    return batch
