"""Device availability: what each device's policy said in its latest Heartbeat (protocol 1.3, keys 16-18).
No I/O, no clock.

A device whose policy paused it (on battery, busy, hot, outside its time window, low on memory) is a
guest that must not be asked to train, and a pause is not a failure:
- sampling skips devices whose latest Heartbeat says paused (`paused`);
- a sampled device that paused during the round is excused: not counted as a miss, never benched
  (`excused`);
- when every sampled device paused before anyone reported, nobody is left to wait for: the book closes
  the round at once, empty (values unchanged), instead of holding the fleet to the deadline (`all_paused`).
A 1.2 device says nothing (available None) and counts as available, as before.

    av = Availability()
    av.note("a", available=False, reason="busy", share=0.4)
    av.round_opened({"a", "b"})        # the sampled set of the new plan (paused ones were not sampled)
    av.all_paused()                    # every sampled device paused (counted, O(1) per heartbeat)
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class DeviceState:
    available: bool
    reason: str  # "" when available
    trained_share: float | None


class Availability:
    """Latest policy state per device, and which devices of the open round paused."""

    def __init__(self) -> None:
        self.devices: dict[str, DeviceState] = {}
        self.sampled: frozenset[str] = frozenset()  # the open round's sampled devices (empty: no round)
        self.paused_now: set[str] = set()  # sampled and paused at their latest heartbeat
        self.excused: set[str] = set()  # sampled and paused at some point of this round (no miss)

    def note(self, client: str, available: bool | None, reason: str | None, share: float | None) -> bool:
        """A heartbeat's availability (None: a 1.2 device, nothing said). True when the state changed."""
        if available is None:
            return False
        old = self.devices.get(client)
        new = DeviceState(available, reason or "", share)
        self.devices[client] = new
        if client in self.sampled:
            if available:
                self.paused_now.discard(client)
            else:
                self.paused_now.add(client)
                self.excused.add(client)
        return old is None or (old.available, old.reason) != (new.available, new.reason)

    def paused(self, client: str) -> str | None:
        """The reason the device's latest heartbeat gave for a pause; None when it is available (or silent)."""
        d = self.devices.get(client)
        return None if d is None or d.available else d.reason or "paused"

    def available_count(self, online: Collection[str]) -> int:
        """How many of `online` are not paused: the fleet's "devices available now"."""
        return sum(1 for c in online if self.paused(c) is None)

    def round_opened(self, sampled: Collection[str]) -> None:
        self.sampled = frozenset(sampled)
        self.paused_now = {c for c in self.sampled if self.paused(c) is not None}
        self.excused = set(self.paused_now)

    def round_extended(self, added: Collection[str]) -> None:
        self.sampled = self.sampled | frozenset(added)
        now = {c for c in added if self.paused(c) is not None}
        self.paused_now |= now
        self.excused |= now

    def round_closed(self) -> set[str]:
        """The devices excused from a miss in the round that just closed; forget the round."""
        excused = self.excused
        self.sampled, self.paused_now, self.excused = frozenset(), set(), set()
        return excused

    def all_paused(self) -> bool:
        """Every sampled device of the open round is paused now."""
        return bool(self.sampled) and len(self.paused_now) == len(self.sampled)

    def forget(self, client: str) -> None:
        self.devices.pop(client, None)


def from_telemetry(t: Mapping[str, Any], online: bool) -> tuple[bool | None, str]:
    """(available, words) from a stored heartbeat's telemetry, for status, dashboard and metrics: an offline
    device is not available; a device that says nothing (1.2, or its policy is off) is None, "-"."""
    if not online:
        return False, "offline"
    a = t.get("available")
    if not isinstance(a, bool):
        return None, "-"
    return (True, "yes") if a else (False, f"paused: {t.get('pause_reason') or '?'}")


__all__ = ["Availability", "DeviceState", "from_telemetry"]
