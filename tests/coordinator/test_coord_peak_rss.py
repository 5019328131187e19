"""The process's real peak RSS (Heartbeat key 19, protocol 1.3) from the wire to every place that shows it:
the event log's resource history, the fleet snapshot, the dashboard's memory bar, /metrics, `meerkat status`
and the run report; a device before 1.3 (no key 19) keeps the largest-RSS-sample estimate, marked as one."""

from __future__ import annotations

import json
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from coordinator.dashboard import pages
from coordinator.eventlog import EventLog
from coordinator.fleetview import fleet_view
from coordinator.metrics import Metrics
from coordinator.records import HeartbeatRecord, JoinRecord, ResultRecord, ResultRow
from coordinator.report import run_report
from coordinator.rounds import TELEMETRY
from coordinator.status import format_status, status_report
from shared.codec import decode, encode
from shared.messages import Heartbeat

MIB = 1 << 20


def _wire(client: str, rnd: int, rss_mib: int, peak_mib: int | None, now: float) -> HeartbeatRecord:
    """A heartbeat as the coordinator stores it: encoded by the device, decoded (topic id), then the round
    book's telemetry keys (RoundBook.on_heartbeat)."""
    sent = Heartbeat("", ts=now, cpu_pct=30.0, rss_bytes=rss_mib * MIB, peak_mem_bytes=11 * MIB, round=rnd,
                     peak_rss_bytes=None if peak_mib is None else peak_mib * MIB)  # fmt: skip
    h = decode(encode(sent), Heartbeat, client=client)
    return HeartbeatRecord(client, {k: getattr(h, k) for k in TELEMETRY}, now)


def _fill(state: Path, now: float) -> None:
    log = EventLog(state)
    with log.transaction():
        log.set_meta("fleet", "f1")
        for c in ("dev-new", "dev-old"):
            log.persist(JoinRecord(c, "joined", "", "fp", "m", 100, 2.0, {"device": "cpu"}, -1, now - 100))
        for r in range(4):
            log.persist(ResultRecord(ResultRow(r, (1,), (0.1,), 0.01, "rademacher", 2, "0" * 64, now - 80 + 10 * r,
                                               1.0), ()))  # fmt: skip
            # dev-new: RSS samples 400-430 MiB, but the process peaked at 900 MiB between two heartbeats
            # (round 1) and again at 1.2 GiB in a restarted process (round 3 reports a fresh high-water mark)
            peak = (None, 900, 900, 1229)[r]
            log.persist(_wire("dev-new", r, 400 + 10 * r, peak, now - 79 + 10 * r))
            log.persist(_wire("dev-old", r, 300 + 20 * r, None, now - 79 + 10 * r))  # a 1.2 device: no key 19
        log.persist(_wire("dev-new", 3, 420, 700, now - 1))  # restarted again: its own peak is lower
    log.close()


def test_peak_rss_reaches_the_dashboard_metrics_status_and_report(tmp_path: Path) -> None:
    now = 1_000_000.0
    _fill(tmp_path, now)
    view = fleet_view(tmp_path, now, history=True)
    dev = {d.client: d for d in view.devices}
    # the run's peak is the largest high-water mark any of its processes reported (1229 MiB), not the largest
    # RSS sample (430) nor the newest process's own peak (700)
    assert (dev["dev-new"].peak_rss_bytes, dev["dev-new"].peak_rss_measured) == (1229 * MIB, True)
    assert (dev["dev-old"].peak_rss_bytes, dev["dev-old"].peak_rss_measured) == (360 * MIB, False)
    # one point per round: the round's largest high-water mark (the restarted process's 700 does not hide 1229)
    assert [p.peak_rss_bytes for p in view.resources["dev-new"]] == [None, 900 * MIB, 900 * MIB, 1229 * MIB]
    assert view.resources["dev-new"][-1].rss_bytes == 420 * MIB  # RSS: the round's last heartbeat

    html = pages(tmp_path)("/")[0].decode()
    assert 'title="peak RSS of the process">1.2 GiB / 2.0 GiB</span>' in html
    assert 'title="peak RSS of the process: 60% of budget"' in html  # the bar: 1229 MiB of 2 GiB
    assert 'title="largest RSS sample">~360.0 MiB / 2.0 GiB</span>' in html  # the 1.2 device, marked

    m = Metrics()
    m.watch_fleet(tmp_path, per_device=True)
    fams = {f.name: f for f in text_string_to_metric_families(m.render().decode())}
    got = {s.labels["device"]: s.value for s in fams["meerkat_device_peak_rss_bytes"].samples}
    assert got == {"dev-new": 1229 * MIB, "dev-old": 360 * MIB}

    st = status_report(tmp_path, now=now)
    tele = {c["client"]: c["telemetry"] for c in st["clients"]}
    assert tele["dev-new"]["peak_rss_bytes"] == 700 * MIB and tele["dev-old"]["peak_rss_bytes"] is None
    rows = {ln.split()[0]: ln for ln in format_status(st).splitlines() if ln.startswith("  ")}
    end = rows["client"].index(" peak ") + len(" peak")  # right-aligned columns: the header's span
    assert rows["dev-new"][end - 7:end] == "   700M" and rows["dev-old"][end - 7:end] == "      -"

    rep = run_report(tmp_path, now=now)
    assert rep["memory"]["dev-new"]["peak_rss_bytes"] == 1229 * MIB
    assert rep["memory"]["dev-new"]["max_rss_bytes"] == 420 * MIB
    assert rep["memory"]["dev-old"]["peak_rss_bytes"] is None and rep["memory"]["dev-old"]["max_rss_bytes"] == 360 * MIB
    assert json.loads(json.dumps(rep))["devices"]["dev-new"][1]["peak_rss_bytes"] == 900 * MIB


def test_an_old_device_with_no_heartbeat_round_row_yet(tmp_path: Path) -> None:
    """A device whose only telemetry is the newest heartbeat still shows its measured peak."""
    now = 1_000_000.0
    log = EventLog(tmp_path)
    with log.transaction():
        log.set_meta("fleet", "f1")
        log.persist(JoinRecord("dev-a", "joined", "", "fp", "m", 100, 1.0, {"device": "cpu"}, -1, now - 5))
    log.close()
    view = fleet_view(tmp_path, now)
    assert view.devices[0].peak_rss_bytes is None and not view.devices[0].peak_rss_measured
    log = EventLog(tmp_path)
    with log.transaction():
        log.persist(_wire("dev-a", -1, 200, 350, now - 1))
    log.close()
    d = fleet_view(tmp_path, now).devices[0]
    assert (d.peak_rss_bytes, d.peak_rss_measured, d.rss_bytes) == (350 * MIB, True, 200 * MIB)


def test_a_log_from_before_the_peak_column_is_read_then_upgraded(tmp_path: Path, event_log: str) -> None:
    """A `resources` table an older build created (no peak_rss_bytes): read-only readers see no peak (the
    largest RSS sample instead), the next writer adds the column and stores the peak."""
    now = 1_000_000.0
    log = EventLog(tmp_path, event_log=event_log)
    with log.transaction():
        log.set_meta("fleet", "f1")
        log.persist(JoinRecord("dev-a", "joined", "", "fp", "m", 100, 1.0, {"device": "cpu"}, -1, now - 5))
        log.db.execute("ALTER TABLE resources DROP COLUMN peak_rss_bytes")  # the table as it first shipped
        log.db.execute("INSERT INTO resources(client, round, ts, rss_bytes) VALUES ('dev-a', 0, 1.0, ?)", (300 * MIB,))
    log.close()
    if event_log == "sqlite":  # read-only: nothing added, the column reads as NULL
        old = EventLog(tmp_path, readonly=True)
        try:
            assert "peak_rss_bytes" not in old.db.columns("resources")
            assert old.views.peak_rss() == {"dev-a": (300 * MIB, False)}
            assert old.views.resources()[0].peak_rss_bytes is None
        finally:
            old.close()
    log = EventLog(tmp_path, event_log=event_log)  # the writer adds the column
    with log.transaction():
        log.persist(_wire("dev-a", 1, 310, 640, now - 1))
    log.close()
    view = fleet_view(tmp_path, now, event_log=event_log, history=True)
    assert [p.peak_rss_bytes for p in view.resources["dev-a"]] == [None, 640 * MIB]
    assert (view.devices[0].peak_rss_bytes, view.devices[0].peak_rss_measured) == (640 * MIB, True)
