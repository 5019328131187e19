"""What the device policy reads: battery, other processes' load, GPU load, temperature, free memory, clock.

`Sensors` is the seam: `read()` returns one `Sample`. `SystemSensors` is the real one:
- battery: `psutil.sensors_battery()` (None = no battery = AC);
- other processes' CPU demand, in % of one core (100 = one core busy, as `top` counts), since the last
  read (the first read only primes): what they *used* (system-wide busy share, `psutil.cpu_percent` x
  cores, minus this process's own `Process.cpu_percent`) and what they *waited* for a core (Linux: the
  run-queue wait of each of their threads, `/proc/PID/task/TID/schedstat` field 2). A job starved by our
  steps uses little CPU but waits a lot: the policy judges used + waited. Where schedstat is missing
  (not Linux, or a kernel without sched_info) the wait reads None and only the use counts;
- GPU busy %: NVML utilization or tegrastats GR3D_FREQ, through `Telemetry` when it found either;
- temperature: tegrastats, NVML, else the hottest `psutil.sensors_temperatures()` reading;
- free memory: `psutil.virtual_memory().available`;
- clock: `time.monotonic()` (quiet timer) and the local minute of the day (time windows).
Tests hand in their own `Sensors` to drive every one of these.
"""

from __future__ import annotations

import os
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
    other_wait_pct: float | None = None  # run-queue wait of the other processes' threads, % of one core
    gpu_pct: float | None = None
    temp_c: float | None = None
    free_mem_bytes: int | None = None


class Sensors(Protocol):
    def read(self) -> Sample: ...


def local_minute(unix_s: float) -> int:
    t = time.localtime(unix_s)
    return t.tm_hour * 60 + t.tm_min


@dataclass(frozen=True)
class CpuDemand:
    """Other processes' CPU since the last read, % of one core: used, and waited for (None = cannot tell)."""

    used_pct: float
    wait_pct: float | None = None


def _task_waits(pid: int) -> dict[tuple[int, int], int]:
    """(pid, tid) -> run-queue wait in ns so far, for every thread of `pid` (empty when unreadable)."""
    out: dict[tuple[int, int], int] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat", "rb") as f:
                out[(pid, int(tid))] = int(f.read().split()[1])
        except (OSError, ValueError, IndexError):
            continue
    return out


class RunQueueWait:
    """The run-queue wait of the threads of `pids()` since the last call, in % of one core (100 = one thread
    waited the whole interval). None where /proc/self/schedstat is missing or reads no time (not Linux, or
    a kernel without sched_info). A thread first seen now counts its whole wait (it is young).

    Reading every thread's file costs ~0.1 ms a thread (30 ms for 270 threads on a loaded 2-core box): a call
    sooner than `min_interval_s` or 20 x the last scan's cost after the last scan returns the last value, so
    the scan stays under 5 % of the time however often the policy asks (before every local step)."""

    def __init__(self, pids: Callable[[], list[int]], min_interval_s: float = 0.25) -> None:
        self.pids = pids
        self.min_interval_s = min_interval_s
        self.supported = schedstat_works()
        self.at = time.monotonic()
        self.seen = self._read() if self.supported else {}
        self.cost_s = time.monotonic() - self.at
        self.last: float | None = 0.0 if self.supported else None

    def _read(self) -> dict[tuple[int, int], int]:
        waits: dict[tuple[int, int], int] = {}
        for pid in self.pids():
            waits.update(_task_waits(pid))
        return waits

    def __call__(self) -> float | None:
        if not self.supported:
            return None
        now = time.monotonic()
        if now - self.at < max(self.min_interval_s, 20 * self.cost_s):
            return self.last
        waits = self._read()
        self.cost_s = time.monotonic() - now
        waited = sum(max(0, w - self.seen.get(k, 0)) for k, w in waits.items())
        wall, self.at, self.seen = max(now - self.at, 1e-6), now, waits
        self.last = 100.0 * waited / 1e9 / wall
        return self.last


def schedstat_works() -> bool:
    """True when this kernel keeps per-thread run/wait times (/proc/self/schedstat: run ns, wait ns, slices)."""
    try:
        with open("/proc/self/schedstat", "rb") as f:
            return int(f.read().split()[0]) > 0  # this process has run: 0 means the counters are off
    except (OSError, ValueError, IndexError):
        return False


def _other_pids() -> list[int]:
    me = os.getpid()
    try:
        return [int(d) for d in os.listdir("/proc") if d.isdigit() and int(d) != me]
    except OSError:
        return []


class OthersCpu:
    """Every process but this one since the last call: CPU used and run-queue wait, in % of one core
    (200 = two cores busy)."""

    def __init__(self) -> None:
        self.me = psutil.Process()
        self.cores = psutil.cpu_count() or 1
        psutil.cpu_percent(None)  # both counters start now: the next read covers the same interval
        self.me.cpu_percent(None)
        self.wait = RunQueueWait(_other_pids)

    def __call__(self) -> CpuDemand:
        total = psutil.cpu_percent(None) * self.cores  # % of all cores since the last call -> % of one core
        mine = self.me.cpu_percent(None)  # % of one core
        return CpuDemand(float(max(0.0, total - mine)), self.wait())


class TreeCpu:
    """CPU used and waited for by the descendants of process `root` (not `root` itself) since the last call,
    in % of one core: the same reading scoped to one process tree, for a machine whose other load is not the
    owner's (a shared test box at 100 % already; the owner's job started under a known parent)."""

    def __init__(self, root: int) -> None:
        self.root = psutil.Process(root)
        self.at = time.monotonic()
        self.seen: dict[int, float] = {p.pid: _cpu_s(p) for p in self.root.children(recursive=True)}
        self.wait = RunQueueWait(self._pids)

    def _pids(self) -> list[int]:
        try:
            return [p.pid for p in self.root.children(recursive=True)]
        except psutil.Error:
            return []

    def __call__(self) -> CpuDemand:
        now = time.monotonic()
        busy, seen = 0.0, {}
        for p in self.root.children(recursive=True):
            t = _cpu_s(p)
            seen[p.pid] = t
            busy += t - self.seen.get(p.pid, 0.0)  # a process new since the last call: all its CPU is new
        wall, self.at, self.seen = max(now - self.at, 1e-6), now, seen
        return CpuDemand(float(max(0.0, 100.0 * busy / wall)), self.wait())


def _cpu_s(p: psutil.Process) -> float:
    try:
        t = p.cpu_times()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return 0.0
    return float(t.user + t.system)


class SystemSensors:
    """The real readers (psutil; NVML/tegrastats through `telemetry` where present). `others`: how the
    other processes' CPU is read (default OthersCpu: every other process on the machine)."""

    def __init__(self, telemetry: Telemetry | None = None, others: Callable[[], CpuDemand] | None = None) -> None:
        self.telemetry = telemetry
        self.others = OthersCpu() if others is None else others

    def read(self) -> Sample:
        battery = psutil.sensors_battery()
        gpu_pct, temp_c = (None, None) if self.telemetry is None else self.telemetry.gpu_load()
        if temp_c is None:
            from edge_client.service.telemetry import psutil_temp

            temp_c = psutil_temp()
        cpu = self.others()
        return Sample(
            mono_s=time.monotonic(),
            minute=local_minute(time.time()),
            on_battery=None if battery is None or battery.power_plugged is None else not battery.power_plugged,
            other_cpu_pct=cpu.used_pct,
            other_wait_pct=cpu.wait_pct,
            gpu_pct=gpu_pct,
            temp_c=temp_c,
            free_mem_bytes=int(psutil.virtual_memory().available),
        )


__all__ = ["CpuDemand", "OthersCpu", "RunQueueWait", "schedstat_works", "Sample", "Sensors", "SystemSensors", "TreeCpu", "local_minute"]
