"""This process's resident memory from /proc/self/status (Linux): one reader for the planner and the heartbeat.

The kernel keeps one high-water mark per process (VmHWM). The planner resets it to measure a calibration
forward (`clear_peak`, /proc/self/clear_refs); the heartbeat reports the peak since the process started.
`clear_peak` remembers the mark it is about to erase, so `peak_since_start` stays the process's peak
(model loading included) however often the planner measures.
"""

from __future__ import annotations

import ctypes
import re

_erased = 0  # the largest VmHWM a clear_peak() reset away (bytes): the process-wide counter it compensates


def status_bytes() -> tuple[int, int, int]:
    """(VmRSS, RssFile, VmHWM) of this process in bytes; OSError / RuntimeError where /proc says none."""
    with open("/proc/self/status") as f:
        text = f.read()
    out = []
    for key in ("VmRSS", "RssFile", "VmHWM"):
        m = re.search(rf"{key}:\s+(\d+) kB", text)
        if m is None:
            raise RuntimeError(f"/proc/self/status has no {key} line")
        out.append(int(m.group(1)) * 1024)
    return out[0], out[1], out[2]


def trim_heap() -> None:
    """Return freed heap to the kernel (glibc malloc_trim), so the RSS reads what is live; a no-op elsewhere."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: freed heap may stay resident, peaks then read low


def clear_peak() -> None:
    """Reset VmHWM to the current RSS (OSError where the kernel does not allow it), keeping the old mark."""
    global _erased
    hwm = status_bytes()[2]
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    _erased = max(_erased, hwm)


def peak_since_start() -> int | None:
    """The process's peak RSS since it started: VmHWM, or a larger mark a clear_peak() erased; None off Linux."""
    try:
        return max(status_bytes()[2], _erased)
    except (OSError, RuntimeError):
        return None


__all__ = ["clear_peak", "peak_since_start", "status_bytes", "trim_heap"]
