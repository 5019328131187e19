"""Telemetry readings: psutil always, tegrastats lines parsed, nothing raises without a GPU."""

from __future__ import annotations

import os
import sys

import pytest

from edge_client.service import telemetry
from edge_client.service.telemetry import Telemetry, parse_tegrastats

ORIN = (
    "11-25-2026 12:00:01 RAM 2448/7772MB (lfb 2x4MB) SWAP 0/3886MB (cached 0MB) CPU [3%@729,1%@729,off,off] "
    "EMC_FREQ 0% GR3D_FREQ 0% cpu@47.218C soc2@45.093C soc0@46.031C gpu@46.5C tj@47.218C soc1@45.781C "
    "VDD_IN 4812mW/4812mW VDD_CPU_GPU_CV 481mW/481mW VDD_SOC 1443mW/1443mW"
)
NANO = "RAM 1500/3964MB (lfb 10x4MB) CPU [12%@1479,5%@1479] GR3D_FREQ 0%@76 PLL@33C CPU@35.5C PMIC@100C GPU@33.5C AO@41C thermal@34.25C POM_5V_IN 2280/2280 POM_5V_GPU 0/0"
OFF_SENSOR = "RAM 100/200MB CPU@40C iwlwifi@-256C VDD_IN 1000mW/1000mW"


def test_parse_tegrastats_orin_and_nano() -> None:
    orin = parse_tegrastats(ORIN)
    assert orin == {"temp_c": 47.218, "power_w": 4.812, "ram_bytes": float(2448 << 20), "gpu_pct": 0.0}
    nano = parse_tegrastats(NANO)
    assert nano["temp_c"] == 100.0 and nano["ram_bytes"] == float(1500 << 20)
    assert nano["power_w"] == 2.28  # older L4T prints POM_5V_IN in mW without the unit
    assert parse_tegrastats(OFF_SENSOR)["temp_c"] == 40.0  # -256C marks a sensor that is off
    assert parse_tegrastats("garbage") == {}
    assert parse_tegrastats(NANO.replace("GR3D_FREQ 0%@76", "GR3D_FREQ 63%@921"))["gpu_pct"] == 63.0  # device policy


def test_read_on_this_machine() -> None:
    t = Telemetry(1.0, use_gpu=True)
    try:
        _ = sum(i * i for i in range(200_000))  # some CPU time to measure
        r = t.read()
    finally:
        t.close()
    assert r.cpu_pct >= 0.0
    assert r.rss_bytes > 10 << 20  # this pytest process holds at least tens of MB
    assert r.rss_bytes < 64 << 30
    if not os.path.exists("/dev/nvidia0"):
        assert r.gpu_mem_bytes is None and r.power_w is None


def test_peak_rss_is_the_process_high_water_mark() -> None:
    """A peak between two readings is not lost: 256 MiB held and freed shows in the peak, not in the RSS."""
    t = Telemetry(1.0, use_gpu=False)
    try:
        before = t.read()
        block = b"\x01" * (256 << 20)  # written: resident, not just mapped
        held = t.read()
        del block  # a large block is unmapped at once: the RSS drops back
        after = t.read()
    finally:
        t.close()
    assert before.peak_rss_bytes is not None and before.peak_rss_bytes >= before.rss_bytes
    assert held.rss_bytes >= before.rss_bytes + (250 << 20)
    assert after.rss_bytes < held.rss_bytes - (200 << 20)
    assert after.peak_rss_bytes is not None and after.peak_rss_bytes >= held.rss_bytes



@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="Linux only: VmHWM and its reset")
def test_peak_rss_survives_the_memory_planners_reset() -> None:
    """The planner resets the kernel's high-water mark to measure a calibration forward (MemoryMeter):
    a peak before that reset (model loading) must still be the process's peak in the heartbeat."""
    from edge_client.engine.planner import MemoryMeter
    from edge_client.engine.procmem import status_bytes

    block = b"\x01" * (256 << 20)
    held = status_bytes()[0]
    del block
    MemoryMeter("cpu").measure(lambda: None)  # clear_refs: VmHWM drops to the RSS now
    assert status_bytes()[2] < held - (200 << 20)  # the kernel's mark forgot the block
    peak = telemetry.peak_rss_bytes()
    assert peak is not None and peak >= held - (1 << 20)  # VmHWM trails an RSS read by a few hundred KiB

def test_peak_rss_sources(monkeypatch: pytest.MonkeyPatch) -> None:
    """Linux VmHWM first; without /proc, getrusage's ru_maxrss (KiB here, bytes on macOS)."""
    import builtins
    import resource

    hwm = telemetry.peak_rss_bytes()
    assert hwm is not None and hwm > 10 << 20
    real_open = builtins.open

    def no_proc(path: object, *a: object, **kw: object) -> object:
        if str(path).startswith("/proc/"):
            raise FileNotFoundError(path)
        return real_open(path, *a, **kw)  # type: ignore[call-overload]

    monkeypatch.setattr(builtins, "open", no_proc)
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert telemetry.peak_rss_bytes() == maxrss * 1024
    monkeypatch.setattr(sys, "platform", "darwin")  # the module reads sys.platform at call time
    assert telemetry.peak_rss_bytes() == resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
