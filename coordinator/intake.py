"""Intake: one incoming MQTT message -> what the coordinator does with it. Pure (no I/O, no metrics).

The six decisions, in order, made once for the single pump (coordinator/server.py) and for the cluster
(a worker admits, coordinator/inbox.py stores the decision, the leader feeds it):
  1. parse the topic (the client id comes from it)   -> Rejected bad_topic, counted nowhere (nbytes None)
  2. a kind the coordinator does not take            -> Rejected bad_topic, no reply
  3. an empty payload: a retained message cleared    -> Dropped "cleared" (nothing to do, not a drop)
  4. a retained message on a never-retained kind     -> Dropped "retained", unread; `clear_topic` names the
                                                        topic the pump clears (an empty retained payload)
  5. decode                                          -> Rejected decode_*, an ErrorMsg for up/join/sync
  6. the book's answer (`feed`), a bug in it         -> a counted `internal` reject, the service goes on

    decision = admit(topics, incoming)       # Admitted | Rejected | Dropped
    acts = feed(book, decision, now)         # the round book's actions
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from coordinator.actions import Action
from coordinator.actions import Dropped as DropAction
from coordinator.ingest import Reject, decode_reject
from coordinator.rounds import RoundBook
from shared.codec import DecodeError, decode
from shared.messages import ErrorCode, Heartbeat, Join, Message, Status, SyncRequest, Update
from shared.mqtt import Incoming
from shared.topics import Topics

log = logging.getLogger(__name__)

INBOUND: dict[str, type[Message]] = {  # topic kind -> the message the coordinator accepts on it
    "up": Update,
    "join": Join,
    "hb": Heartbeat,
    "status": Status,
    "sync": SyncRequest,
}
NO_RETAIN = frozenset({"up", "join", "hb", "sync"})  # retained here: dropped unread (status is retained by design)
REPLY_KINDS = frozenset({"up", "join", "sync"})  # a client that sent an undecodable one is told why (ErrorMsg)
CLEARED = "cleared"  # the Dropped reason of a retained status being cleared: nothing lost, not a drop metric


@dataclass(frozen=True)
class Admitted:
    """A decoded message for the book (its `client` field filled from the topic)."""

    client: str
    kind: str
    message: Message
    nbytes: int


@dataclass(frozen=True)
class Rejected:
    """Counted as a reject (`reply`: the client gets an ErrorMsg). nbytes None: the topic did not parse."""

    client: str
    kind: str
    reject: Reject
    reply: bool
    nbytes: int | None


@dataclass(frozen=True)
class Dropped:
    """Dropped unread: `retained` (counted as a drop) or CLEARED (a retained status being cleared)."""

    client: str
    kind: str
    reason: str
    nbytes: int


Decision = Admitted | Rejected | Dropped


def admit(topics: Topics, msg: Incoming) -> Decision:
    """Decisions 1-5 of the module docstring for one incoming message."""
    try:
        kind, arg = topics.parse(msg.topic)
    except ValueError as exc:
        return Rejected("?", msg.topic, Reject("bad_topic", ErrorCode.INTERNAL, str(exc)), False, None)
    client, n = str(arg), len(msg.payload)
    if kind not in INBOUND:
        return Rejected(client, kind, Reject("bad_topic", ErrorCode.INTERNAL, f"{kind} is not for the coordinator"),
                        False, n)  # fmt: skip
    if not msg.payload:  # a retained message being cleared (a status, or one the coordinator cleared itself)
        return Dropped(client, kind, CLEARED, n)
    if msg.retain and kind in NO_RETAIN:
        # delivered because we (re)subscribed: a device parked it retained, e.g. a bomb that would
        # otherwise be decoded again at every restart. Never a legitimate message: drop it unread.
        log.warning("retained message on %s dropped unread (%d bytes)", msg.topic, n)
        return Dropped(client, kind, "retained", n)
    try:
        m = decode(msg.payload, INBOUND[kind], client=client)
    except DecodeError as exc:
        return Rejected(client, kind, decode_reject(exc), kind in REPLY_KINDS, n)
    return Admitted(client, kind, m, n)


def clear_topic(topics: Topics, d: Decision) -> str | None:
    """The topic to clear with an empty retained payload when `d` dropped a device's retained message unread:
    left there it comes back on every (re)subscribe (issue 26: 8 MB parked per device); else None."""
    if not isinstance(d, Dropped) or d.reason != "retained":
        return None
    return {"up": topics.up, "join": topics.join, "hb": topics.hb, "sync": topics.sync}[d.kind](d.client)


def feed(book: RoundBook, d: Decision, now: float) -> list[Action]:
    """Decision 6: the book's actions for one decision (a bug in the book is a counted `internal` reject)."""
    if isinstance(d, Rejected):
        return book.on_reject(d.client, d.kind, d.reject, now, reply=d.reply)
    if isinstance(d, Dropped):
        return [] if d.reason == CLEARED else [DropAction(d.client, d.kind, d.reason)]
    try:
        return book.handle(d.message, now)
    except Exception as exc:  # a bug in the book must not take the service down
        log.exception("internal error handling %s from %s", d.kind, d.client)
        return book.on_reject(d.client, d.kind, Reject("internal", ErrorCode.INTERNAL, repr(exc)), now, False)
