"""The run report at fleet scale: the memory table groups the resource history in one pass (it scanned the
whole history once per client: minutes of the coordinator's CPU after a 10,000-device run, found by the
issue-31 fleet bench), and the plot draws only the devices with the largest RSS."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from coordinator.records import ResourcePoint
from coordinator.report import PLOT_DEVICES, _memory, plot_report


def _history(clients: int, rounds: int) -> list[ResourcePoint]:
    return [ResourcePoint(f"d{c:05d}", r, float(r), (100 + c) << 20, 50 << 20, 10.0, 0.5, (200 + c) << 20)
            for r in range(rounds) for c in range(clients)]  # fmt: skip


def test_memory_table_is_linear_in_the_history() -> None:
    hist = _history(5000, 20)  # 100,000 points
    t = time.process_time()
    mem = _memory(hist, {"d00000": 1 << 30, "never-reported": None})
    assert time.process_time() - t < 2.0  # a per-client scan: 5000 x 100,000 = 5e8 steps
    assert mem["d00003"] == {"peak_rss_bytes": 203 << 20, "max_rss_bytes": 103 << 20, "peak_step_bytes": 50 << 20,
                             "budget_bytes": None}  # fmt: skip
    assert mem["d00000"]["budget_bytes"] == 1 << 30 and mem["never-reported"]["max_rss_bytes"] is None


def test_plot_draws_the_devices_with_the_largest_rss(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    hist = _history(40, 3)
    mem = _memory(hist, {})
    devices = {f"d{c:05d}": [{"round": r, "rss_bytes": (100 + c) << 20, "peak_mem_bytes": None, "peak_rss_bytes": None}
                             for r in range(3)] for c in range(40)}  # fmt: skip
    rows = [{"round": r, "clients": 40, "uplink_bytes": 1, "downlink_bytes": 1, "duration_s": 1.0} for r in range(3)]
    report = {"run": {"fleet": "f", "state": "finished", "last_round": 2, "rounds": 3, "eval_source": "devices"}, "rounds": rows,
              "evals": {"coordinator": [], "devices": []}, "before": {}, "after": {}, "memory": mem,
              "devices": devices}  # fmt: skip
    import matplotlib.axes

    drawn: list[str] = []
    orig = matplotlib.axes.Axes.plot

    def spy(self: matplotlib.axes.Axes, *args: Any, **kw: Any) -> Any:
        label = kw.get("label")
        if isinstance(label, str) and label.endswith(" RSS"):
            drawn.append(label.split()[0])
        return orig(self, *args, **kw)

    mp = pytest.MonkeyPatch()
    mp.setattr(matplotlib.axes.Axes, "plot", spy)
    try:
        assert plot_report(report, tmp_path / "r.png")
    finally:
        mp.undo()
    assert sorted(drawn) == [f"d{c:05d}" for c in range(40 - PLOT_DEVICES, 40)]  # the largest RSS
