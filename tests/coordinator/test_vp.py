"""coordinator/vp.py on its own: what the MEERKAT-VP policy decides (records, steps, left-out updates)."""

from __future__ import annotations

import pytest
import torch

from coordinator.actions import Recovered
from coordinator.drift import DriftMonitor, DriftThresholds
from coordinator.records import DriftRecord, EventRecord, LimitRecord, PlanRow, UpdateRow
from coordinator.vp import DriftPolicy

NNZ = 64


def monitor(**th: float) -> DriftMonitor:
    g = torch.linspace(-1.0, 1.0, NNZ, dtype=torch.float32)
    return DriftMonitor(g, "rademacher", DriftThresholds(**th), keep_history=False)  # type: ignore[arg-type]


def up(client: str, grads: list[float]) -> UpdateRow:
    return UpdateRow(client, 3, 1, tuple(grads), 1, 1.0, 0.0, "accepted", None)


def plan(dist: str = "rademacher") -> PlanRow:
    return PlanRow(round=3, state="open", opened_at=0.0, deadline=10.0, seeds=(11, 12), steps={"a": 2}, lr=0.01,
                   eps=1e-3, dist=dist, batch_size=1, base_round=2, base_checksum="", extensions=0)  # type: ignore[arg-type]  # fmt: skip


def test_no_monitor_measures_and_decides_nothing() -> None:
    vp = DriftPolicy(None, control=True)
    assert not vp.on and vp.limited() == set() and vp.steps_for("a", 4) == 4
    assert vp.gradip(plan(), [1.0, 2.0]) is None
    ups = [up("a", [1.0])]
    assert vp.at_close(3, ups, 0.0, next_round=4) == ([], ups)


def test_gradip_is_g_times_c_and_needs_the_monitors_dist() -> None:
    m = monitor()
    vp = DriftPolicy(m, control=True)
    assert vp.gradip(plan(), [2.0, -1.0]) == pytest.approx([2.0 * m.coefficient(11), -m.coefficient(12)])
    assert vp.gradip(plan("gaussian"), [2.0, -1.0]) is None  # another dist: no GradIP
    (rec,) = vp.observe("a", 3, [0.5, 0.25], 1.0, next_round=5)
    assert isinstance(rec, DriftRecord) and rec.client == "a" and rec.n_steps == 2


@pytest.mark.parametrize("control", [True, False])
def test_spike_limits_the_client_and_leaves_its_update_out(control: bool) -> None:
    vp = DriftPolicy(monitor(spike_ratio=10.0), control=control)
    ups = [up(k, [1.0, -1.0]) for k in "abcd"] + [up("evil", [50.0, 1.0])]
    records, kept = vp.at_close(3, ups, 7.0, next_round=4)
    if not control:  # measured, never acted on
        assert records == [] and kept == ups and vp.limited() == set() and vp.steps_for("evil", 4) == 4
        return
    assert [u.client for u in kept] == list("abcd")
    assert records[0] == LimitRecord("evil", 3, 7.0)
    assert isinstance(records[1], EventRecord) and records[1].kind == "drift_limit"
    assert "from_round=4" in records[1].detail and "reason=spike" in records[1].detail
    assert vp.limited() == {"evil"} and vp.steps_for("evil", 4) == 1 and vp.steps_for("a", 4) == 4
    again, _ = vp.at_close(4, [*ups[:4], up("evil", [60.0, 1.0])], 8.0, next_round=5)
    assert len(again) == 1 and isinstance(again[0], EventRecord) and again[0].kind == "drift_spike"  # already limited


def test_restore_replays_logged_flags_only_under_control() -> None:
    rec = Recovered(values=torch.zeros(NNZ), last_round=5, limited={"x": 2}, gradip=[("y", 4, [0.5, 0.25])])
    on, off = DriftPolicy(monitor(), control=True), DriftPolicy(monitor(), control=False)
    on.restore(rec)
    off.restore(rec)
    assert on.limited() == {"x"} and off.limited() == set()
    assert on.monitor is not None and on.monitor.steps_seen("y") == 2
    assert on.start(9.0, next_round=6) == []  # no re-flag: the thresholds did not change
