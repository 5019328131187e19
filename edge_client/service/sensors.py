"""What the device policy reads: battery, other processes' load, GPU load, temperature, free memory, clock.

`Sensors` is the seam: `read()` returns one `Sample`. `SystemSensors` is the real one:
- battery: `psutil.sensors_battery()` (None = no battery = AC);
- other processes' CPU: system-wide busy share since the last read (`psutil.cpu_percent` x cores) minus
  this process's own (`Process.cpu_percent`), in % of one core (100 = one core busy, as `top` counts);
  the first read only primes;
- GPU busy %: NVML utilization or tegrastats GR3D_FREQ, through `Telemetry` when it found either;
- temperature: tegrastats, NVML, else the hottest `psutil.sensors_temperatures()` reading;
- free memory: `psutil.virtual_memory().available`;
- clock: `time.monotonic()` (quiet timer) and the local minute of the day (time windows).
Tests hand in their own `Sensors` to drive every one of these.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import psutil

if TYPE_CHECKING:
    from edge_client.service.telemetry import Telemetry


@dataclass(frozen=True)
class Sample:
    """One reading; None = this device cannot tell (never a reason to pause)."""

    mono_s: float  # monotonic seconds (only differences matter)
    minute: int  # local time: minute of the day, 0 .. 1439
    on_battery: bool | None = None
    other_cpu_pct: float | None = None  # CPU used outside this process since the last read, % of one core
    gpu_pct: float | None = None
    temp_c: float | None = None
    free_mem_bytes: int | None = None


class Sensors(Protocol):
    def read(self) -> Sample: ...


def local_minute(unix_s: float) -> int:
    t = time.localtime(unix_s)
    return t.tm_hour * 60 + t.tm_min


class OthersCpu:
    """CPU used by every process but this one since the last call, in % of one core (200 = two cores busy)."""

    def __init__(self) -> None:
        self.me = psutil.Process()
        self.cores = psutil.cpu_count() or 1
        psutil.cpu_percent(None)  # both counters start now: the next read covers the same interval
        self.me.cpu_percent(None)

    def __call__(self) -> float:
        total = psutil.cpu_percent(None) * self.cores  # % of all cores since the last call -> % of one core
        mine = self.me.cpu_percent(None)  # % of one core
        return float(max(0.0, total - mine))


class TreeCpu:
    """CPU used by the descendants of process `root` (not `root` itself) since the last call, in % of one
    core: the same reading scoped to one process tree, for a machine whose other load is not the owner's
    (a shared test box at 100 % already; the owner's job started under a known parent)."""

    def __init__(self, root: int) -> None:
        self.root = psutil.Process(root)
        self.at = time.monotonic()
        self.seen: dict[int, float] = {p.pid: _cpu_s(p) for p in self.root.children(recursive=True)}

    def __call__(self) -> float:
        now = time.monotonic()
        busy, seen = 0.0, {}
        for p in self.root.children(recursive=True):
            t = _cpu_s(p)
            seen[p.pid] = t
            busy += t - self.seen.get(p.pid, 0.0)  # a process new since the last call: all its CPU is new
        wall, self.at, self.seen = max(now - self.at, 1e-6), now, seen
        return float(max(0.0, 100.0 * busy / wall))


def _cpu_s(p: psutil.Process) -> float:
    try:
        t = p.cpu_times()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return 0.0
    return float(t.user + t.system)


class SystemSensors:
    """The real readers (psutil; NVML/tegrastats through `telemetry` where present). `others`: how the
    other processes' CPU is read (default OthersCpu: every other process on the machine)."""

    def __init__(self, telemetry: Telemetry | None = None, others: Callable[[], float] | None = None) -> None:
        self.telemetry = telemetry
        self.other_cpu_pct = OthersCpu() if others is None else others

    def read(self) -> Sample:
        battery = psutil.sensors_battery()
        gpu_pct, temp_c = (None, None) if self.telemetry is None else self.telemetry.gpu_load()
        if temp_c is None:
            from edge_client.service.telemetry import psutil_temp

            temp_c = psutil_temp()
        return Sample(
            mono_s=time.monotonic(),
            minute=local_minute(time.time()),
            on_battery=None if battery is None or battery.power_plugged is None else not battery.power_plugged,
            other_cpu_pct=self.other_cpu_pct(),
            gpu_pct=gpu_pct,
            temp_c=temp_c,
            free_mem_bytes=int(psutil.virtual_memory().available),
        )


__all__ = ["OthersCpu", "Sample", "Sensors", "SystemSensors", "TreeCpu", "local_minute"]
