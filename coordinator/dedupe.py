"""Dedupe keys: the msg_id stored for each (client, round), kept only while an update can still name it.

A device re-sends its kept Update (same msg_id) after a reconnect; the book answers a stored key with
`Duplicate` (the same msg_id) or a `conflict` reject (another one: first wins). With straggler `next` an
update of a round that closed `late_max_age` or more rounds ago is refused (STALE_ROUND) before anything is
stored, so only the last `late_max_age` closed rounds can be named (docs/PROTOCOL.md 1.3); `drop` stores an
update of any round whose plan is kept, so it keeps the whole late window.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping


class DedupeKeys:
    """(client, round) -> msg_id, forgotten a round at a time (O(rounds), not O(keys))."""

    def __init__(self, keys: Mapping[tuple[str, int], int], window: int) -> None:
        """`keys`: what recovery found stored; `window`: closed rounds whose keys are kept (`window_for`)."""
        self.keys: dict[tuple[str, int], int] = dict(keys)
        self.window = window
        self._rounds: dict[int, list[str]] = {}  # round -> clients with a key (cheap forgetting)
        for client, r in self.keys:
            self._rounds.setdefault(r, []).append(client)

    @staticmethod
    def window_for(straggler: str, late_max_age: int, late_window: int) -> int:
        return late_max_age if straggler == "next" else late_window

    def get(self, client: str, round: int) -> int | None:
        return self.keys.get((client, round))

    def add(self, client: str, round: int, msg_id: int) -> None:
        self.keys[(client, round)] = msg_id
        self._rounds.setdefault(round, []).append(client)

    def closed(self, last_round: int, keep: Iterable[int] = ()) -> None:
        """Round `last_round` closed: forget the keys of rounds before the window (but rounds in `keep`,
        which still have late updates pending)."""
        self.forget_before(last_round + 1 - self.window, keep)

    def forget_before(self, oldest: int, keep: Iterable[int] = ()) -> None:
        kept = set(keep)
        for r in [r for r in self._rounds if r < oldest and r not in kept]:
            for client in self._rounds.pop(r):
                del self.keys[(client, r)]
