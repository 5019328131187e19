"""Issue 27, operators' side: `meerkat status`, the dashboard fleet table and /metrics show each device's
availability (available / paused + reason), its share of time trained, and the fleet's devices available now."""

from __future__ import annotations

from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from coordinator.availability import Availability, from_telemetry
from coordinator.dashboard import render_html, render_json
from coordinator.eventlog import EventLog
from coordinator.fleetview import fleet_view
from coordinator.metrics import FLEET_NAMES, Metrics
from coordinator.records import HeartbeatRecord, JoinRecord, OnlineRecord
from coordinator.status import format_status, status_report
from shared.messages import Heartbeat

NOW = 2_000_000.0


def _hb(client: str, available: bool | None, reason: str | None, share: float | None) -> HeartbeatRecord:
    h = Heartbeat(client, ts=NOW, cpu_pct=10.0, rss_bytes=1 << 20, round=3, available=available,
                  pause_reason=reason, trained_share=share)  # fmt: skip
    return HeartbeatRecord(client, {k: v for k, v in h.__dict__.items() if k != "client"}, NOW - 1)


def _fill(state: Path) -> None:
    log = EventLog(state)
    with log.transaction():
        log.set_meta("fleet", "f1")
        for c in ("dev-a", "dev-b", "dev-c", "dev-d"):
            log.persist(JoinRecord(c, "joined", "", "fp", "m", 100, 2.0, {"device": "cpu"}, -1, NOW - 100))
        log.persist(_hb("dev-a", True, None, 0.42))
        log.persist(_hb("dev-b", False, "on battery", 0.1))
        log.persist(_hb("dev-c", None, None, None))  # a 1.2 device (or policy off): says nothing
        log.persist(_hb("dev-d", False, "busy", 0.0))
        log.persist(OnlineRecord("dev-d", False, NOW - 0.5))  # then it went offline
    log.close()


def test_status_dashboard_and_metrics_show_availability(tmp_path: Path) -> None:
    _fill(tmp_path)
    rep = status_report(tmp_path, now=NOW)
    by = {c["client"]: c for c in rep["clients"]}
    assert [by[k]["availability"] for k in ("dev-a", "dev-b", "dev-c", "dev-d")] == [
        "yes", "paused: on battery", "-", "offline"]
    assert rep["clients_available"] == 2  # a and c (c does not say: available), b paused, d offline
    text = format_status(rep)
    assert "2 available now" in text and "paused: on battery" in text and "42%" in text

    view = fleet_view(tmp_path, NOW)
    d = {x.client: x for x in view.devices}
    assert (d["dev-b"].available, d["dev-b"].pause_reason) == (False, "on battery")
    assert abs((d["dev-a"].trained_share or 0) - 0.42) < 1e-6  # float32 on the wire
    assert view.available_now() == 2
    html = render_html(view)
    assert "paused: on battery" in html and "available now" in html and "42%" in html
    assert '"devices_available": 2' in render_json(view)

    m = Metrics()
    m.watch_fleet(tmp_path, per_device=True)
    fams = {f.name: f for f in text_string_to_metric_families(m.render().decode())}
    assert fams["meerkat_devices_available"].samples[0].value == 2.0
    avail = {s.labels["device"]: s.value for s in fams["meerkat_device_available"].samples}
    assert avail == {"dev-a": 1.0, "dev-b": 0.0, "dev-d": 0.0}  # dev-c says nothing: no series
    paused = {(s.labels["device"], s.labels["reason"]) for s in fams["meerkat_device_paused"].samples}
    assert paused == {("dev-b", "on battery")}
    share = {s.labels["device"]: s.value for s in fams["meerkat_device_trained_share"].samples}
    assert abs(share["dev-a"] - 0.42) < 1e-6
    assert {"meerkat_devices_available", "meerkat_device_paused", "meerkat_device_available"} <= set(FLEET_NAMES)


def test_from_telemetry_and_the_round_counters() -> None:
    assert from_telemetry({"available": True}, True) == (True, "yes")
    assert from_telemetry({"available": False, "pause_reason": "hot"}, True) == (False, "paused: hot")
    assert from_telemetry({}, True) == (None, "-") and from_telemetry({"available": True}, False) == (False, "offline")
    av = Availability()
    av.round_opened({"a", "b"})
    assert not av.all_paused()
    assert av.note("a", False, "busy", 0.1) and not av.all_paused()
    assert not av.note("a", False, "busy", 0.2)  # no change of state
    av.note("x", False, "hot", None)  # not sampled: does not count
    av.note("b", False, "hot", None)
    assert av.all_paused()
    av.note("a", True, None, 0.3)  # back: the round waits for it again, but a stays excused
    assert not av.all_paused() and av.round_closed() == {"a", "b"}
    assert av.paused("b") == "hot" and av.paused("a") is None and av.available_count(["a", "b", "z"]) == 2
