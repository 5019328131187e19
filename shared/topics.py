"""MQTT topic scheme `meerkat/v1/{fleet}/...` with the QoS and retain flag of every kind.

kind           topic                               dir            qos  retain
plan           meerkat/v1/{fleet}/plan             coord->all      1   yes   current RoundPlan
result         meerkat/v1/{fleet}/result/{round}   coord->all      1   no    RoundResult of one round
result_latest  meerkat/v1/{fleet}/result/latest    coord->all      1   yes   last RoundResult
up             meerkat/v1/{fleet}/up/{client}      client->coord   1   no    Update
join           meerkat/v1/{fleet}/join/{client}    client->coord   1   no    Join
hb             meerkat/v1/{fleet}/hb/{client}      client->coord   0   no    Heartbeat
status         meerkat/v1/{fleet}/status/{client}  client->all     1   yes   Status (LWT: offline)
sync           meerkat/v1/{fleet}/sync/{client}    client->coord   1   no    SyncRequest
to             meerkat/v1/{fleet}/to/{client}      coord->client   1   no    Replay / CheckpointChunk / ErrorMsg
run            meerkat/v1/{fleet}/run              coord->all      1   yes   RunState (1.3: the run's lifecycle)

Fleet and client ids: 1..64 chars of [A-Za-z0-9_.-], starting with a letter or digit (so never an MQTT
wildcard, '/', '$' or empty). The broker ACL lets a client write only topics ending in its own id,
so a receiver takes the client id from the topic, never from the payload.
"""

from __future__ import annotations

import re
from typing import Literal

PREFIX = "meerkat/v1"
ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")

Kind = Literal["plan", "result", "result_latest", "up", "join", "hb", "status", "sync", "to", "run"]
KINDS: tuple[str, ...] = ("plan", "result", "result_latest", "up", "join", "hb", "status", "sync", "to", "run")
CLIENT_KINDS: tuple[str, ...] = ("up", "join", "hb", "status", "sync", "to")
_QOS: dict[str, int] = {
    "plan": 1, "result": 1, "result_latest": 1, "up": 1, "join": 1, "hb": 0, "status": 1, "sync": 1, "to": 1, "run": 1,
}  # fmt: skip
_RETAIN: frozenset[str] = frozenset({"plan", "result_latest", "status", "run"})


def check_id(value: object, what: str = "client id") -> str:
    """Return `value` if it is a valid fleet/client id, else raise ValueError naming `what`."""
    if not isinstance(value, str) or not ID_RE.match(value):
        raise ValueError(
            f"{what} must be 1-64 chars of [A-Za-z0-9_.-] starting with a letter or digit, got {value!r}"
        )
    return value


class Topics:
    """Topic names for one fleet."""

    def __init__(self, fleet: str) -> None:
        self.fleet = check_id(fleet, "fleet id")
        self.base = f"{PREFIX}/{fleet}"

    @property
    def plan(self) -> str:
        return f"{self.base}/plan"

    @property
    def run(self) -> str:
        return f"{self.base}/run"

    def result(self, round: int) -> str:
        if isinstance(round, bool) or not isinstance(round, int) or round < 0:
            raise ValueError(f"round must be an int >= 0, got {round!r}")
        return f"{self.base}/result/{round}"

    @property
    def result_latest(self) -> str:
        return f"{self.base}/result/latest"

    def _client(self, kind: str, client: str) -> str:
        return f"{self.base}/{kind}/{check_id(client)}"

    def up(self, client: str) -> str:
        return self._client("up", client)

    def join(self, client: str) -> str:
        return self._client("join", client)

    def hb(self, client: str) -> str:
        return self._client("hb", client)

    def status(self, client: str) -> str:
        return self._client("status", client)

    def sync(self, client: str) -> str:
        return self._client("sync", client)

    def to(self, client: str) -> str:
        return self._client("to", client)

    def filter(self, kind: str) -> str:
        """Subscription filter for every topic of `kind` (single-level wildcard for the id/round)."""
        _check_kind(kind)
        if kind == "plan":
            return self.plan
        if kind == "result_latest":
            return self.result_latest
        if kind == "run":
            return self.run
        return f"{self.base}/{kind}/+"  # result/+ and every per-client kind

    @staticmethod
    def qos(kind: str) -> int:
        _check_kind(kind)
        return _QOS[kind]

    @staticmethod
    def retain(kind: str) -> bool:
        _check_kind(kind)
        return kind in _RETAIN

    def parse(self, topic: str) -> tuple[str, str | int | None]:
        """(kind, arg) of a topic of this fleet: arg is the client id, the round number, or None.

        Raises ValueError for a topic outside this fleet, an unknown kind or a bad id/round.
        """
        if not isinstance(topic, str):
            raise ValueError(f"topic must be a str, got {type(topic).__name__}")
        head = self.base + "/"
        if not topic.startswith(head):
            raise ValueError(f"topic {topic!r} is not under {head!r}")
        parts = topic[len(head) :].split("/")
        if parts == ["plan"]:
            return "plan", None
        if parts == ["run"]:
            return "run", None
        if len(parts) == 2 and parts[0] == "result":
            if parts[1] == "latest":
                return "result_latest", None
            if not parts[1].isdigit() or not parts[1].isascii() or (len(parts[1]) > 1 and parts[1][0] == "0"):
                raise ValueError(f"topic {topic!r}: round must be a decimal int, got {parts[1]!r}")
            return "result", int(parts[1])
        if len(parts) == 2 and parts[0] in CLIENT_KINDS:
            return parts[0], check_id(parts[1])
        raise ValueError(f"topic {topic!r}: unknown kind under {head!r}")


def _check_kind(kind: str) -> None:
    if kind not in _QOS:
        raise ValueError(f"unknown topic kind {kind!r}; expected one of {KINDS}")


__all__ = ["CLIENT_KINDS", "ID_RE", "KINDS", "PREFIX", "Kind", "Topics", "check_id"]
