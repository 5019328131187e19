"""The client registry: who joined, who is online, who is live without a Join. No I/O, no clock.

One row per joined (or once-joined) client (`ClientRow`, persisted through the book's records); ids that
never joined cost no row, only bounded LRUs (`unjoined`: live without a Join, to be asked to join;
`refused`: their Join was refused, not to be nagged). `put` is the one way a row changes, so the online
counter the pump reads per batch stays exact.

    reg = ClientRegistry(fingerprint=fp, mask_id=mask.mask_id, offline_after_s=30.0)
    reg.put(ClientRow("c1", "joined", fp, mask.mask_id, 100, True, 0.0))
    reg.seen("c1", now=1.0)           # True: a row, seen_at moved; False for an id with no row
    reg.note_live("c9", now=1.0)      # no Join from c9: nag(now) asks it after JOIN_GRACE_S
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import replace

from coordinator.actions import Persist, Publish
from coordinator.ratelimit import LruDict
from coordinator.records import ClientRow, OfflineRecord
from shared.messages import ErrorCode, ErrorMsg

log = logging.getLogger(__name__)

JOIN_GRACE_S = 2.0  # a live client without a Join is asked to join after this long...
REJOIN_NAG_S = 10.0  # ...and again every this long until it does


class ClientRegistry:
    """Joined clients (rows), the online count, and the bounded memory of live ids without a Join."""

    def __init__(self, *, fingerprint: str, mask_id: str, offline_after_s: float, rows: Iterable[ClientRow] = ()) -> None:
        self.fingerprint, self.mask_id, self.offline_after_s = fingerprint, mask_id, offline_after_s
        self.clients: dict[str, ClientRow] = {c.client: c for c in rows}
        self._n_online = sum(1 for c in self.clients.values() if self.samplable(c))  # = len(online()), kept by put
        # at most the oldest seen_at of an online row (-inf for one never seen), kept by put and seen: `offline`
        # scans the rows only once a row can be silent (at 10,000 clients ~5 ms a scan, once per OFFLINE_CHECK_S)
        self._oldest_seen = min((_seen_key(c) for c in self.clients.values() if c.online), default=math.inf)
        # live client without a Join -> (when to ask it next, last seen); bounded: unknown ids never get a row
        self.unjoined: LruDict[str, tuple[float, float]] = LruDict()
        self.refused: LruDict[str, float] = LruDict()  # ids whose Join was refused (not nagged), not persisted

    def get(self, client: str) -> ClientRow | None:
        return self.clients.get(client)

    def joined(self, client: str) -> bool:
        c = self.clients.get(client)
        return c is not None and c.state == "joined"

    def samplable(self, c: ClientRow) -> bool:
        """Joined, online, and on this model + mask: a plan may sample it."""
        return c.state == "joined" and c.online and c.fingerprint == self.fingerprint and c.mask_id == self.mask_id

    def online(self) -> list[str]:
        """The samplable clients, sorted by id."""
        return sorted(c.client for c in self.clients.values() if self.samplable(c))

    def n_online(self) -> int:
        """len(online()) in O(1) (a counter kept by `put`: the pump reads it per batch)."""
        return self._n_online

    def put(self, row: ClientRow) -> None:
        """The one way a row changes, so the online counter stays exact."""
        old = self.clients.get(row.client)
        self._n_online += self.samplable(row) - (old is not None and self.samplable(old))
        self.clients[row.client] = row
        if row.online and _seen_key(row) < self._oldest_seen:
            self._oldest_seen = _seen_key(row)

    def seen(self, client: str, now: float, online: bool | None = None) -> bool:
        """Note a registered client's activity; False (and nothing kept) for an id with no row."""
        c = self.clients.get(client)
        if c is None:
            return False
        if online is None or online == c.online:  # every Update and Heartbeat: only seen_at moves, the online
            row = object.__new__(ClientRow)  # count stays; replace(c, seen_at=now) without its ~2 us of checks
            row.__dict__.update(c.__dict__, seen_at=now)
            self.clients[client] = row
            if c.online and now < self._oldest_seen:  # a clock stepped back
                self._oldest_seen = now
            return True
        self.put(replace(c, online=online, seen_at=now))
        return True

    def joining(self, client: str) -> None:
        """A valid Join arrived: stop asking, forget a refusal (the row comes with `put`)."""
        self.unjoined.pop(client, None)
        self.refused.pop(client, None)

    def refuse(self, client: str, now: float) -> None:
        """A Join from an id with no joined row was refused: remember it (not nagged), bounded."""
        self.unjoined.pop(client, None)
        self.refused[client] = now

    def note_live(self, client: str, now: float) -> None:
        """Remember a live client we have no Join from; `nag` asks it to join after JOIN_GRACE_S (a
        bounded LRU: ids that never join cost no row and at most MAX_KEYS entries)."""
        c = self.clients.get(client)
        if (c is not None and c.state in ("joined", "rejected")) or client in self.refused:
            return
        due = self.unjoined[client][0] if client in self.unjoined else now + JOIN_GRACE_S
        self.unjoined[client] = (due, now)

    def nag(self, now: float) -> list[Publish]:
        """ErrorMsg(UNKNOWN_CLIENT) to each live client without a Join (it joined while we were down:
        Join is not retained); the client re-sends its Join. Again every REJOIN_NAG_S until it does."""
        acts: list[Publish] = []
        for client, (due, seen) in sorted(self.unjoined.items()):
            c = self.clients.get(client)
            if (c is not None and c.state in ("joined", "rejected")) or now - seen > self.offline_after_s:
                del self.unjoined[client]  # joined, or silent: stop asking
                continue
            if now < due:
                continue
            log.info("client %s is live but has not joined (since our start): asking it to join", client)
            acts.append(Publish(ErrorMsg(int(ErrorCode.UNKNOWN_CLIENT), "unknown client: send Join"), to=client))
            self.unjoined[client] = (now + REJOIN_NAG_S, seen)
        return acts

    def offline(self, now: float) -> list[Persist]:
        """Mark online clients silent for offline_after_s offline (one record for all of them)."""
        cutoff = now - self.offline_after_s
        if self._oldest_seen >= cutoff:  # every online row was seen at or after the cutoff
            return []
        gone: list[str] = []
        oldest = math.inf
        for c in self.clients.values():
            if c.online:
                if c.seen_at is None or c.seen_at < cutoff:
                    gone.append(c.client)
                elif c.seen_at < oldest:
                    oldest = c.seen_at
        gone.sort()
        self._oldest_seen = oldest  # the rows left online (those below go offline)
        for k in gone:
            self.put(replace(self.clients[k], online=False))
            log.info("client %s silent for %.0f s: offline", k, self.offline_after_s)
        return [Persist(OfflineRecord(tuple(gone)))] if gone else []


def _seen_key(c: ClientRow) -> float:
    return -math.inf if c.seen_at is None else c.seen_at
