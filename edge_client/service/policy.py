"""The device policy: when the owner's machine can spare a local step (`[policy]` in client.toml).

A client is a guest on a machine that already has a job. Before every local step the pump asks
`DevicePolicy.allows()`; the rules below read one `Sample` (edge_client/service/sensors.py) and say
available, or paused with a reason. A paused client takes no step: the steps already taken are durable
(SaveStep), the round core asks for the same step again at the next tick, so training resumes exactly
where it stopped and the Update is the one an uninterrupted run sends.

The rules, checked in this order (the first that fails is the reason the fleet sees):
    outside window   the local time is in none of `windows` (none given: any time)
    on battery       `ac_only` and the battery discharges (no battery = AC)
    hot              the hottest sensor reads >= `max_temp_c`
    low memory       less than `min_free_mem_gib` available
    busy             other processes wanted >= `max_other_cpu_pct` % of one core -- used it, or waited in the
                     run queue for it (Linux schedstat: a job our steps starve uses little but waits a
                     lot) -- or the GPU was >= `max_gpu_pct` busy, at the last check, or the load has not
                     yet stayed below both for `quiet_s` seconds
An unknown reading (no battery, no sensor, no NVML) never pauses.

`DevicePolicy` does no I/O of its own: the sensors are an object handed in (tests drive battery,
temperature, load and clock through it).
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from typing import Literal

from edge_client.service.sensors import Sample, Sensors
from shared import config

log = logging.getLogger(__name__)

OUTSIDE_WINDOW = "outside window"
ON_BATTERY = "on battery"
HOT = "hot"
LOW_MEMORY = "low memory"
BUSY = "busy"
REASONS = (OUTSIDE_WINDOW, ON_BATTERY, HOT, LOW_MEMORY, BUSY)  # what a Heartbeat's pause_reason may say

_WINDOW = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)-([01]\d|2[0-3]):([0-5]\d)$")


def parse_window(text: str) -> tuple[int, int]:
    """"22:00-07:00" -> (1320, 420): minutes of the local day; an end before the start wraps past midnight."""
    m = _WINDOW.match(text.strip())
    if m is None:
        raise ValueError(f"time window {text!r}: expected HH:MM-HH:MM (local time, 24 h), e.g. 22:00-07:00")
    a, b = int(m[1]) * 60 + int(m[2]), int(m[3]) * 60 + int(m[4])
    if a == b:
        raise ValueError(f"time window {text!r}: start equals end (leave `windows` empty to allow any time)")
    return a, b


def in_window(minute: int, window: tuple[int, int]) -> bool:
    a, b = window
    return a <= minute < b if a < b else minute >= a or minute < b


def _windows_ok(v: tuple[str, ...]) -> bool:
    try:
        for w in v:
            parse_window(w)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class PolicyConfig:
    """`[policy]`: the defaults are what a laptop owner would accept (train on AC, when the machine is
    otherwise quiet, cool and has memory to spare, at low priority on half the cores)."""

    enabled: bool = config.field(
        True, "false: train whenever a round is open, at full speed (no checks, no thread limit, no niceness)"
    )
    ac_only: bool = config.field(True, "train only on AC power (psutil battery; a machine without battery is on AC)")
    max_other_cpu_pct: float = config.field(
        30.0, "pause while other processes together want at least this % of one core: CPU they used plus time they "
        "waited for a core (Linux run-queue wait; 100 = one core, as top counts)",
        check=(lambda v: v > 0, "must be > 0"),
    )
    max_gpu_pct: float = config.field(
        50.0, "pause while the GPU is at least this % busy between our steps (where NVML/tegrastats report it)",
        check=(lambda v: 0 < v <= 100, "must be in (0, 100]"),
    )
    quiet_s: float = config.field(
        30.0, "the load must stay below both limits this many seconds before training starts or resumes",
        check=(lambda v: v >= 0, "must be >= 0"),
    )
    max_temp_c: float = config.field(
        80.0, "pause while the hottest sensor reads at least this many degrees C", check=(lambda v: v > 0, "must be > 0")
    )
    windows: tuple[str, ...] = config.field(
        (), 'train only inside these local-time windows, e.g. ["22:00-07:00"]; empty = any time',
        check=(_windows_ok, "each must be HH:MM-HH:MM (24 h, start != end)"),
    )
    min_free_mem_gib: float = config.field(
        1.0, "pause while less than this much memory is available to other programs", check=(lambda v: v >= 0, "must be >= 0")
    )
    max_threads: int = config.field(
        0, "torch intra-op threads; 0 = half of the cores (at least 1)", check=(lambda v: v >= 0, "must be >= 0")
    )
    nice: int = config.field(10, "process niceness applied at start (0 = unchanged, 19 = lowest)",
                             check=(lambda v: 0 <= v <= 19, "must be in 0..19"))
    io_class: Literal["idle", "best-effort", "none"] = config.field(
        "idle", "IO scheduling class applied at start (Linux): idle = disk only when nobody else wants it"
    )
    poll_s: float = config.field(1.0, "while paused, check again this often (seconds)", check=(lambda v: v > 0, "must be > 0"))


@dataclass(frozen=True)
class Verdict:
    reason: str | None  # None = available; else one of REASONS
    detail: str = ""  # what the sensor read, for the log

    @property
    def available(self) -> bool:
        return self.reason is None


AVAILABLE = Verdict(None)


class DevicePolicy:
    """The rules of PolicyConfig over one sensor sample; remembers since when the load has been quiet."""

    def __init__(self, cfg: PolicyConfig, sensors: Sensors) -> None:
        self.cfg = cfg
        self.sensors = sensors
        self.windows = tuple(parse_window(w) for w in cfg.windows)
        self._quiet_since: float | None = None  # monotonic: first sample below both load limits, this stretch
        # until the first check: paused unless the policy is off (the load must first be quiet for quiet_s)
        self.verdict = AVAILABLE if not cfg.enabled else Verdict(BUSY, "not checked yet")
        self.checked_at = -float("inf")  # monotonic time of the last check()

    def check(self) -> Verdict:
        """Read the sensors and judge; logs each change between available and paused."""
        self.checked_at = time.monotonic()
        v = self.judge(self.sensors.read()) if self.cfg.enabled else AVAILABLE
        if v.reason != self.verdict.reason:
            if v.available:
                log.info("policy: training allowed again (was paused: %s)", self.verdict.reason)
            else:
                log.info("policy: pausing training (%s: %s)", v.reason, v.detail)
        self.verdict = v
        return v

    def judge(self, s: Sample) -> Verdict:
        c = self.cfg
        busy = self._busy(s)  # always evaluated: the quiet timer must see every sample
        if self.windows and not any(in_window(s.minute, w) for w in self.windows):
            return Verdict(OUTSIDE_WINDOW, f"local time {s.minute // 60:02d}:{s.minute % 60:02d} not in {', '.join(c.windows)}")
        if c.ac_only and s.on_battery:
            return Verdict(ON_BATTERY, "the battery is discharging")
        if s.temp_c is not None and s.temp_c >= c.max_temp_c:
            return Verdict(HOT, f"{s.temp_c:.1f} C >= {c.max_temp_c:g} C")
        if s.free_mem_bytes is not None and s.free_mem_bytes < c.min_free_mem_gib * 2**30:
            return Verdict(LOW_MEMORY, f"{s.free_mem_bytes / 2**30:.2f} GiB available < {c.min_free_mem_gib:g} GiB")
        return busy

    def _busy(self, s: Sample) -> Verdict:
        c = self.cfg
        loud = ""
        wanted = None if s.other_cpu_pct is None else s.other_cpu_pct + (s.other_wait_pct or 0.0)
        if wanted is not None and wanted >= c.max_other_cpu_pct:
            waited = "" if s.other_wait_pct is None else f" (used {s.other_cpu_pct:.0f}%, waited {s.other_wait_pct:.0f}%)"
            loud = f"other processes want {wanted:.0f}% CPU{waited} >= {c.max_other_cpu_pct:g}%"
        elif s.gpu_pct is not None and s.gpu_pct >= c.max_gpu_pct:
            loud = f"GPU {s.gpu_pct:.0f}% busy >= {c.max_gpu_pct:g}%"
        if loud:
            self._quiet_since = None
            return Verdict(BUSY, loud)
        if self._quiet_since is None:
            self._quiet_since = s.mono_s
        quiet = s.mono_s - self._quiet_since
        if quiet < c.quiet_s:
            return Verdict(BUSY, f"quiet for {quiet:.1f} s of the {c.quiet_s:g} s required")
        return AVAILABLE


__all__ = [
    "AVAILABLE", "BUSY", "HOT", "LOW_MEMORY", "ON_BATTERY", "OUTSIDE_WINDOW", "REASONS",
    "DevicePolicy", "PolicyConfig", "Verdict", "in_window", "parse_window",
]  # fmt: skip
