"""Device telemetry for heartbeats: CPU %, RSS, GPU memory, temperature and power where available.

Sources, first that works wins for each reading:
- NVIDIA GPUs: NVML via `pynvml` (pip install nvidia-ml-py) -> GPU memory used, GPU temperature, board power.
- Jetson: `tegrastats` (a line per interval on stdout, parsed by `parse_tegrastats`) -> temperature,
  VDD_IN / POM_5V_IN power, RAM (the GPU shares it); jtop is not needed.
- Anything else: psutil -> CPU %, RSS, `sensors_temperatures()` (max current reading) when the OS has one.
- The process's peak RSS since it started (`peak_rss_bytes`, what `memory_budget_gib` bounds on a CPU device):
  Linux/Android `VmHWM` of /proc/self/status (or the larger mark the memory planner reset away to measure a
  calibration forward: edge_client/engine/procmem.py); Windows psutil's `peak_wset`; macOS/BSD `getrusage` ru_maxrss
  (bytes on macOS, KiB elsewhere). ru_maxrss is the last resort, not the first: Linux carries it across
  exec, so it may be the peak of the process that started the client.
Nothing here raises on a missing source: the reading is None and the heartbeat says "unknown".
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
import sys
import threading
from dataclasses import dataclass
from typing import Any

import psutil

from edge_client.engine.procmem import peak_since_start

log = logging.getLogger(__name__)

_TEMP = re.compile(r"\b([A-Za-z0-9_]+)@(-?[\d.]+)C\b")
_POWER = re.compile(r"\b(VDD_IN|POM_5V_IN|VIN_SYS_5V0)\s+(\d+)(?:mW)?/")  # mW; old L4T omits the unit
_RAM = re.compile(r"\bRAM\s+(\d+)/(\d+)MB")
_GR3D = re.compile(r"\bGR3D_FREQ\s+(\d+)%")


@dataclass(frozen=True)
class Reading:
    cpu_pct: float
    rss_bytes: int
    gpu_mem_bytes: int | None
    temp_c: float | None
    power_w: float | None
    peak_rss_bytes: int | None = None  # the process's peak RSS since it started (module doc: sources)


def peak_rss_bytes() -> int | None:
    """This process's peak resident memory since it started, in bytes; None where no source answers."""
    hwm = peak_since_start()  # Linux: VmHWM, or the larger mark the memory planner's reset erased
    if hwm is not None:
        return hwm
    try:
        peak = getattr(psutil.Process().memory_info(), "peak_wset", None)  # Windows
    except (psutil.Error, OSError):
        peak = None
    if isinstance(peak, int) and peak > 0:
        return peak
    try:
        import resource
    except ImportError:
        return None
    maxrss = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    if maxrss <= 0:
        return None
    return maxrss if sys.platform == "darwin" else maxrss * 1024


def parse_tegrastats(line: str) -> dict[str, float]:
    """{"temp_c": max sensor temperature, "power_w": board input power, "ram_bytes", "gpu_pct": GR3D busy %}
    from one tegrastats line.

    Example line (Orin): `RAM 2448/7772MB (lfb 2x4MB) ... CPU@47.2C soc2@45.1C GPU@46C ... VDD_IN 4000mW/4012mW`
    Sensors that are off report -256C and are skipped.
    """
    out: dict[str, float] = {}
    temps = [float(v) for _, v in _TEMP.findall(line) if float(v) > -100.0]
    if temps:
        out["temp_c"] = max(temps)
    m = _POWER.search(line)
    if m:
        out["power_w"] = int(m.group(2)) / 1000.0
    r = _RAM.search(line)
    if r:
        out["ram_bytes"] = float(int(r.group(1)) << 20)
    g = _GR3D.search(line)
    if g:
        out["gpu_pct"] = float(g.group(1))
    return out


class _Tegrastats:
    """Runs `tegrastats --interval MS` and keeps its last parsed line."""

    def __init__(self, binary: str, interval_ms: int) -> None:
        self.last: dict[str, float] = {}
        self.proc = subprocess.Popen(
            [binary, "--interval", str(interval_ms)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
        )
        self.thread = threading.Thread(target=self._read, name="tegrastats", daemon=True)
        self.thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            parsed = parse_tegrastats(line)
            if parsed:
                self.last = parsed

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(2)
            except subprocess.TimeoutExpired:
                self.proc.kill()


class _Nvml:
    def __init__(self, index: int = 0) -> None:
        import pynvml

        pynvml.nvmlInit()
        self.nvml: Any = pynvml
        self.handle = pynvml.nvmlDeviceGetHandleByIndex(index)

    def read(self) -> dict[str, float]:
        n, h = self.nvml, self.handle
        out: dict[str, float] = {"gpu_mem_bytes": float(n.nvmlDeviceGetMemoryInfo(h).used)}
        try:
            out["temp_c"] = float(n.nvmlDeviceGetTemperature(h, n.NVML_TEMPERATURE_GPU))
        except n.NVMLError:
            pass
        try:
            out["power_w"] = n.nvmlDeviceGetPowerUsage(h) / 1000.0
        except n.NVMLError:
            pass
        try:
            out["gpu_pct"] = float(n.nvmlDeviceGetUtilizationRates(h).gpu)
        except n.NVMLError:
            pass
        return out


class Telemetry:
    """Call `read()` at the heartbeat interval; `close()` at exit (stops tegrastats)."""

    def __init__(self, interval_s: float = 10.0, use_gpu: bool = True) -> None:
        self.process = psutil.Process()
        self.process.cpu_percent(None)  # first call primes the counter
        self.peak_rss: int | None = None  # the largest of the process's high-water mark and every RSS read
        self.nvml: _Nvml | None = None
        self.tegra: _Tegrastats | None = None
        if use_gpu:
            try:
                self.nvml = _Nvml()
                log.info("telemetry: NVML")
            except Exception as exc:  # ImportError, NVMLError_LibraryNotFound, driver errors...
                log.debug("telemetry: no NVML (%s)", exc)
        binary = shutil.which("tegrastats")
        if binary is not None:
            try:
                self.tegra = _Tegrastats(binary, max(100, int(interval_s * 1000 / 2)))
                log.info("telemetry: tegrastats")
            except OSError as exc:
                log.warning("telemetry: tegrastats failed to start: %s", exc)

    def read(self) -> Reading:
        cpu = self.process.cpu_percent(None)
        rss = int(self.process.memory_info().rss)
        hwm = peak_rss_bytes()
        if hwm is not None:  # the kernel's RSS counters sync lazily: VmHWM may trail an RSS read a moment ago by
            self.peak_rss = max(self.peak_rss or 0, hwm, rss)  # a few hundred KiB; never below what was reported
        gpu_mem: int | None = None
        temp: float | None = None
        power: float | None = None
        if self.nvml is not None:
            try:
                nv = self.nvml.read()
                gpu_mem = int(nv["gpu_mem_bytes"])
                temp, power = nv.get("temp_c"), nv.get("power_w")
            except Exception as exc:  # a flaky driver must not stop heartbeats
                log.warning("telemetry: NVML read failed: %s", exc)
        if self.tegra is not None:
            t = self.tegra.last
            temp = t.get("temp_c", temp)
            power = t.get("power_w", power)
        if gpu_mem is None:
            gpu_mem = _torch_gpu_mem()
        if temp is None:
            temp = psutil_temp()
        return Reading(float(cpu), rss, gpu_mem, temp, power, self.peak_rss)

    def gpu_load(self) -> tuple[float | None, float | None]:
        """(GPU busy %, temperature) from tegrastats or NVML, for the device policy; (None, None) without."""
        if self.tegra is not None:
            t = self.tegra.last
            return t.get("gpu_pct"), t.get("temp_c")
        if self.nvml is not None:
            try:
                nv = self.nvml.read()
            except Exception as exc:  # a flaky driver must not stop training decisions
                log.warning("telemetry: NVML read failed: %s", exc)
                return None, None
            return nv.get("gpu_pct"), nv.get("temp_c")
        return None, None

    def close(self) -> None:
        if self.tegra is not None:
            self.tegra.close()


def _torch_gpu_mem() -> int | None:
    torch = sys.modules.get("torch")  # never import torch just for this
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return int(torch.cuda.memory_reserved())


def psutil_temp() -> float | None:
    read = getattr(psutil, "sensors_temperatures", None)
    if read is None:
        return None
    try:
        sensors = read()
    except (OSError, RuntimeError):
        return None
    temps = [s.current for entries in sensors.values() for s in entries if s.current is not None and s.current > -100]
    return float(max(temps)) if temps else None


__all__ = ["Reading", "Telemetry", "parse_tegrastats", "peak_rss_bytes", "psutil_temp"]
