"""The fault-injection run (bench/chaos.py) as tests: a real Mosquitto, the real coordinator and 3 real
`meerkat client` processes, SIGKILLed. Each asserts every round closed, 0 updates lost, 0 counted twice
and equal checksums. Short forms here (slow); the 20-round runs: `meerkat bench chaos` (docs/RELIABILITY.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bench.chaos import run_chaos


@pytest.mark.slow
@pytest.mark.parametrize("broker", ["deploy", "amnesic"])
def test_host_crash_broker_and_coordinator_killed_together(toy: Any, tmp_path: Path, broker: str) -> None:
    r = run_chaos(tmp_path / "run", "host_crash", broker, rounds=6, kills=1, toy=toy)
    assert r["rounds_closed"] == 6 and r["lost"] == [] and r["pending_late"] == [], r
    assert r["double_counted_rounds"] == [] and r["checksums_equal"], r
    assert [f["fault"] for f in r["faults"]] == ["host_crash"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["client_kill", "coordinator_kill", "broker_kill", "device_down", "storm"])
def test_single_faults(toy: Any, tmp_path: Path, name: str) -> None:
    r = run_chaos(tmp_path / "run", name, "deploy", rounds=8, kills=1, toy=toy)
    assert r["ok"], r
