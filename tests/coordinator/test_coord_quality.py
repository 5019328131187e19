"""Training-quality signals without a fleet: the event log's evals and curves, the fleet snapshot, the
per-device gauges, the dashboard (routes + token), the status trend, the Heartbeat eval keys."""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from coordinator.dashboard import pages, render_html
from coordinator.eventlog import EventLog
from coordinator.fleetview import fleet_view, quality_trend
from coordinator.metrics import FLEET_NAMES, Metrics, MetricsServer
from coordinator.records import (
    COORDINATOR_EVAL,
    EvalRecord,
    HeartbeatRecord,
    JoinRecord,
    PlanRecord,
    PlanRow,
    ResultRecord,
    ResultRow,
    UpdateRecord,
    UpdateRow,
)
from coordinator.status import format_status, status_report
from shared.codec import decode, encode
from shared.evaluation import holdout_split
from shared.messages import Heartbeat


def _hb(client: str, eval_round: int | None, loss: float | None, now: float) -> HeartbeatRecord:
    h = Heartbeat(client, ts=now, cpu_pct=50.0, rss_bytes=300 << 20, peak_mem_bytes=1 << 30, step_time_s=0.5,
                  temp_c=61.0, round=0, eval_round=eval_round, eval_loss=loss,
                  eval_acc=None if loss is None else 0.5, eval_n=None if loss is None else 10)  # fmt: skip
    return HeartbeatRecord(client, {k: v for k, v in h.__dict__.items() if k != "client"}, now)


def _fill(state: Path, now: float, event_log: str = "sqlite") -> None:
    log = EventLog(state, event_log=event_log)
    with log.transaction():
        log.set_meta("fleet", "f1")
        for c in ("dev-a", "dev-b"):
            log.persist(JoinRecord(c, "joined", "", "fp", "m", 100, 2.0, {"device": "cpu"}, -1, now - 100))
        for r in range(3):
            log.persist(PlanRecord(PlanRow(r, "open", now - 90 + 10 * r, now, (1, 2), {"dev-a": 2, "dev-b": 2}, 0.01,
                                           0.001, "rademacher", 4, r - 1, "0" * 64, 0)))  # fmt: skip
            for c, base in (("dev-a", 3.0), ("dev-b", 2.0)):
                u = UpdateRow(c, r, r + 1, (0.1, -0.2), 100, base - 0.5 * r, now - 85 + 10 * r, "accepted", None)
                log.persist(UpdateRecord(u, (0.4 / (r + 1), -0.2)))
            log.persist(ResultRecord(ResultRow(r, (1, 2), (0.1, 0.2), 0.01, "rademacher", 2, "0" * 64,
                                               now - 80 + 10 * r, 1.5), ((("dev-a", r, "accepted"), ("dev-b", r, "accepted")))))  # fmt: skip
            log.persist(EvalRecord(r, 2.5 - 0.25 * r, 0.4 + 0.1 * r, 20, now - 79 + 10 * r))
            for c in ("dev-a", "dev-b"):
                log.persist(_hb(c, r, 2.6 - 0.2 * r, now - 78 + 10 * r))
                log.persist(_hb(c, r, 9.9, now - 77 + 10 * r))  # the same eval round repeated: first one kept
    log.close()


def test_evals_curves_and_trend(tmp_path: Path) -> None:
    now = 1_000_000.0
    _fill(tmp_path, now)
    log = EventLog(tmp_path, readonly=True)
    evs = log.views.evals(source="dev-a")
    assert [e.round for e in evs] == [0, 1, 2]
    assert [e.loss for e in evs] == pytest.approx([2.6, 2.4, 2.2])
    assert [e.round for e in log.views.evals(source=COORDINATOR_EVAL, last=2)] == [1, 2]
    pts = log.views.round_points()
    assert [p.train_loss for p in pts] == [pytest.approx(2.5), pytest.approx(2.0), pytest.approx(1.5)]  # n-weighted mean
    r0, mean0 = log.views.gradip_means()["dev-a"][0]
    assert r0 == 0 and mean0 == pytest.approx(0.3)
    log.close()
    view = fleet_view(tmp_path, now)
    assert [d.client for d in view.devices] == ["dev-a", "dev-b"]
    a = view.devices[0]
    assert a.budget_bytes == 2 << 30 and a.eval_loss == pytest.approx(9.9) and a.train_loss == pytest.approx(2.0)
    assert [p.loss for p in view.device_evals] == [pytest.approx(2.6), pytest.approx(2.4), pytest.approx(2.2)]
    t = quality_trend(view)
    assert t["coordinator_eval_loss"]["first"] == pytest.approx(2.5) and t["coordinator_eval_loss"]["last"] == pytest.approx(2.0)
    assert t["rounds_per_minute"] == pytest.approx(6.0)  # 3 closes 10 s apart
    text = format_status(status_report(tmp_path, now=now))
    assert "eval loss (devices)" in text and "-> round 2: 2.2000 (down)" in text


def test_metrics_dashboard_routes_and_token(tmp_path: Path, event_log: str) -> None:
    """On both event-log backends: the fleet gauges and the dashboard read the log the config names."""
    now = 1_000_000.0
    _fill(tmp_path, now, event_log)
    m = Metrics()
    m.watch_fleet(tmp_path, per_device=True, event_log=event_log)
    server = MetricsServer(m, "127.0.0.1", 0, token="s3cret", pages=pages(tmp_path, event_log=event_log))
    server.start()
    base = f"http://127.0.0.1:{server.port}"

    def get(path: str, header: bool = False) -> tuple[int, str]:
        req = urllib.request.Request(base + path, headers={"Authorization": "Bearer s3cret"} if header else {})
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, ""

    try:
        assert get("/")[0] == 401 and get("/?token=wrong")[0] == 401 and get("/metrics")[0] == 401
        code, html = get("/?token=s3cret")
        assert code == 200 and html.count('<tr class="device"') == 2 and '<polyline class="curve"' in html
        assert get("/dashboard.json", header=True)[0] == 200
        assert get("/nope", header=True)[0] == 404
        fams = {f.name: f for f in text_string_to_metric_families(get("/metrics", header=True)[1])}
        assert {s.labels["device"] for s in fams["meerkat_device_temperature_celsius"].samples} == {"dev-a", "dev-b"}
        assert {s.labels["source"] for s in fams["meerkat_eval_loss"].samples} == {"devices", "coordinator"}
        own = {f.name for f in text_string_to_metric_families(Metrics().render().decode())}
        assert set(fams) - own == set(FLEET_NAMES)  # describe() names exactly what collect() yields
        code, text = get("/metrics?name[]=meerkat_rounds_closed_total&name[]=meerkat_updates_duplicate_total", True)
        assert code == 200 and {f.name for f in text_string_to_metric_families(text)} == {
            "meerkat_rounds_closed", "meerkat_updates_duplicate"}  # and no fleet snapshot
    finally:
        server.stop()
    off = Metrics()
    off.watch_fleet(tmp_path, per_device=False, event_log=event_log)  # large fleets: no per-device series, quality stays
    names = {f.name for f in text_string_to_metric_families(off.render().decode())}
    assert "meerkat_eval_loss" in names and not any(n.startswith("meerkat_device_") for n in names)


def test_dashboard_without_data_renders(tmp_path: Path) -> None:
    EventLog(tmp_path).close()
    html = render_html(fleet_view(tmp_path, 0.0))
    assert "no device has joined yet" in html and "no data yet" in html


def test_dashboard_shows_the_whole_run_with_its_baseline_and_resource_history(tmp_path: Path) -> None:
    """Issue 30: 900 rounds (more than the 200 of /metrics' snapshot) drawn thinned to MAX_POINTS, the round -1
    evaluation as a dashed baseline, each device's RSS history, and the memory bar = peak RSS / budget with
    the step's share beside it (not the step's tensors against the budget)."""
    from coordinator.dashboard import MAX_POINTS, thin

    now = 2_000_000.0
    log = EventLog(tmp_path)
    with log.transaction():
        log.set_meta("fleet", "f1")
        log.set_meta("run_state", "finished")
        log.persist(JoinRecord("dev-a", "joined", "", "fp", "m", 100, 2.0, {"device": "cpu"}, -1, now - 1e4))
        log.persist(EvalRecord(-1, 3.0, 0.25, 20, now - 9999))  # the baseline: v_0
        for r in range(900):
            log.persist(ResultRecord(ResultRow(r, (1,), (0.1,), 0.01, "rademacher", 1, "0" * 64, now - 9000 + 10 * r,
                                               1.0), ()))  # fmt: skip
            if r % 3 == 0:
                log.persist(EvalRecord(r, 3.0 - r / 900, 0.25 + r / 1800, 20, now - 8999 + 10 * r))
            h = Heartbeat("dev-a", ts=1.0, cpu_pct=40.0, rss_bytes=(400 + r % 80) << 20, peak_mem_bytes=11 << 20,
                          round=r)  # fmt: skip
            log.persist(HeartbeatRecord("dev-a", {k: v for k, v in h.__dict__.items() if k != "client"}, now - 8998 + 10 * r))
    log.close()
    serve = pages(tmp_path)
    html = serve("/")[0].decode()
    view = fleet_view(tmp_path, now, last=None, history=True)
    assert view.rounds[0].round == 0 and view.rounds[-1].round == 899 and view.run_state == "finished"
    assert len(view.resources["dev-a"]) == 900 and view.devices[0].peak_rss_bytes == 479 << 20
    assert 'id="run-state">finished<' in html
    assert 'data-label="baseline 3 (round -1)"' in html and 'data-label="baseline 25.0% (round -1)"' in html
    curves = re.findall(r'<polyline class="curve" data-series="([^"]+)"[^>]*points="([^"]+)"', html)
    by = {name: pts.split() for name, pts in curves}
    assert len(by["eval, coordinator"]) == 301 and len(by["round duration"]) == MAX_POINTS  # all evals, rounds thinned
    assert len(by["dev-a"]) == MAX_POINTS  # RSS history (the memory chart)
    assert 'data-label="budget 2.0 GiB"' in html
    assert "479.0 MiB / 2.0 GiB" in html and "step 11.0 MiB" in html  # peak RSS against the budget, step beside
    assert thin([(float(i), 0.0) for i in range(10)], 4) == [(0.0, 0.0), (3.0, 0.0), (6.0, 0.0), (9.0, 0.0)]
    assert json.loads(serve("/dashboard.json")[0])["run_state"] == "finished"


def test_heartbeat_eval_keys_round_trip_and_rules() -> None:
    h = Heartbeat("", ts=1.0, cpu_pct=1.0, rss_bytes=1, eval_round=3, eval_loss=0.25, eval_acc=0.5, eval_n=8)
    back = decode(encode(h), Heartbeat, client="d")
    assert (back.eval_round, back.eval_loss, back.eval_acc, back.eval_n) == (3, 0.25, 0.5, 8)
    old = encode(Heartbeat("", ts=1.0, cpu_pct=1.0, rss_bytes=1))
    assert decode(old, Heartbeat).eval_round is None  # a heartbeat without an eval is byte-identical to 1.1
    with pytest.raises(ValueError, match="eval_round/eval_loss/eval_n"):
        Heartbeat("", ts=1.0, cpu_pct=1.0, rss_bytes=1, eval_round=3)


def test_holdout_split_is_deterministic_and_disjoint() -> None:
    keep, held = holdout_split(120, 0.1, 64, seed=7)
    assert len(held) == 12 and len(keep) == 108 and not set(keep) & set(held)
    assert (keep, held) == holdout_split(120, 0.1, 64, seed=7) and held != holdout_split(120, 0.1, 64, seed=8)[1]
    assert holdout_split(1000, 0.5, 64, seed=1)[1].__len__() == 64
    assert holdout_split(1, 0.5, 64, seed=1) == ([0], [])  # one example: train on it, hold out nothing


def test_grafana_dashboard_uses_only_exported_metric_names(tmp_path: Path) -> None:
    import json
    import re

    _fill(tmp_path, 1_000_000.0)
    m = Metrics()
    m.watch_fleet(tmp_path, per_device=True)
    m.bytes_sent.labels("plan").inc(1)
    m.bytes_received.labels("up").inc(1)
    m.rejected.labels("x").inc()
    fams = list(text_string_to_metric_families(m.render().decode()))
    exported = {f.name for f in fams} | {s.name for f in fams for s in f.samples}
    board = json.loads((Path(__file__).parents[2] / "deploy" / "grafana" / "meerkat-fleet.json").read_text())
    used = {n for p in board["panels"] for t in p["targets"] for n in re.findall(r"meerkat_[a-z_]+", t["expr"])}
    assert used and used <= exported, used - exported
