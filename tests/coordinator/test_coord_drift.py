"""MEERKAT-VP drift control over a real Mosquitto: a client whose GradIP decays is planned with 1 local step,
a normal client keeps T; the flag is logged once, counted, shown by status and survives a restart;
drift_control=false never limits."""

from __future__ import annotations

import logging
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from coordfakes import (
    FakeClient,
    ThreadedCoordinator,
    make_config,
    sampled,
    synthetic_mask,
    synthetic_v0,
    uid,
    wait_until,
    write_config_toml,
)

from coordinator.config import load_coordinator_config
from coordinator.drift import DriftMonitor, DriftThresholds
from coordinator.eventlog import EventLog
from coordinator.server import Coordinator
from coordinator.status import format_status, status_report
from shared.config import ConfigError
from shared.maskfile import Mask
from shared.messages import RoundPlan, RoundResult
from shared.prng import raw_u64
from shared.sampling import plan_steps

ROOT = Path(__file__).resolve().parents[2]
T = 3
# tiny windows so two rounds of T=3 steps decide: early = round 0, late = round 1
DRIFT = dict(
    drift_window=3, drift_min_steps=6, drift_later_min=3.0, drift_quiet_ratio=0.25, drift_quie_min=0.6,
    drift_decay_rule="absolute",  # the paper's per-update rule (default off; two clients: no fleet median)
)


def _grads(mon: DriftMonitor, plan: RoundPlan, cid: str, gradip: float) -> list[float]:
    """Projected gradients whose GradIP g_t * c_t is exactly `gradip` at every step the plan gives `cid`."""
    return [gradip / mon.coefficient(s) for s in plan.seeds[: plan_steps(plan, cid)]]


def _round(
    mon: DriftMonitor, clients: dict[str, FakeClient], r: int, fp: str, gradip: dict[str, float]
) -> RoundPlan:
    """Play round r: every client reads the plan and sends GradIP `gradip[name]` per step; wait for the result."""
    plan = next(iter(clients.values())).wait_for(RoundPlan, lambda p: p.round == r)
    for name, cl in clients.items():
        cl.update(r, _grads(mon, plan, cl.cid, gradip[name]), 10, fp, msg_id=100 + r)
    for cl in clients.values():
        cl.wait_for(RoundResult, lambda x: x.round == r)
    return plan


def _events(state_dir: Path, kind: str) -> list[tuple[int, str]]:
    log = EventLog(state_dir, readonly=True)
    try:
        return [(int(e.round or 0), e.detail) for e in log.views.events(kind=kind)]
    finally:
        log.close()


def _start(
    tmp: Path, broker: str, mask: Mask, stop_after: int, **kw: Any
) -> tuple[Coordinator, ThreadedCoordinator]:
    cfg = make_config(tmp, broker, steps=T, min_clients=2, **kw)
    coord = Coordinator(cfg, mask=mask, initial_values=synthetic_v0(mask.nnz), stop_after_round=stop_after)
    return coord, ThreadedCoordinator(coord).start()


def test_decaying_client_limited_and_flag_survives_restart(
    tmp_path: Path, broker_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    mask = synthetic_mask((200,))
    mon = DriftMonitor.from_mask(mask)  # the test's own c_t, to script exact GradIP values
    fp, fleet = mask.meta.fingerprint, uid("f")
    kw = dict(fleet=fleet, **DRIFT)
    caplog.set_level(logging.INFO, logger="coordinator")
    coord, runner = _start(tmp_path, broker_url, mask, 2, **kw)
    clients = {n: FakeClient(broker_url, fleet, uid(n)) for n in ("normal", "drift")}
    normal, drift = clients["normal"].cid, clients["drift"].cid
    try:
        for cl in clients.values():
            cl.join(fp, mask.mask_id)
        p0 = _round(mon, clients, 0, fp, {"normal": 1.0, "drift": 1.0})
        assert sampled(p0, [normal, drift]) == {normal: T, drift: T}
        _round(mon, clients, 1, fp, {"normal": 1.0, "drift": 0.01})  # drift's GradIP decayed 100x
        p2 = _round(mon, clients, 2, fp, {"normal": 1.0, "drift": 0.01})
        assert sampled(p2, [normal, drift]) == {normal: T, drift: 1}  # the limited client ran (and reported) one step
        runner.join()
    finally:
        runner.stop()
    assert coord.metrics.registry.get_sample_value("meerkat_drift_limited_total") == 1.0
    assert coord.metrics.registry.get_sample_value("meerkat_clients_limited") == 1.0
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("drift_limit ")]
    assert len(lines) == 1 and f"client={drift} " in lines[0] and "from_round=2" in lines[0]
    ev = _events(tmp_path / "state", "drift_limit")
    assert len(ev) == 1 and ev[0][0] == 1 and f"client={drift} " in ev[0][1]

    rep = status_report(tmp_path / "state")
    by = {c["client"]: c["drift"] for c in rep["clients"]}
    assert by[drift]["limited"] and by[drift]["limited_round"] == 1 and by[drift]["rho_later"] >= 3.0
    assert not by[normal]["limited"] and by[normal]["rho_later"] == pytest.approx(1.0)
    assert rep["clients_limited"] == [drift]
    assert f"limited to 1 local step (MEERKAT-VP): {drift}" in format_status(rep)

    # restart on the same state_dir: the persisted flag (not a re-detection) keeps the client limited,
    # even with thresholds under which its history would no longer flag it
    strict = Coordinator(
        make_config(tmp_path, broker_url, steps=T, min_clients=2, **{**kw, "drift_later_min": 1e9}),
        mask=mask, initial_values=synthetic_v0(mask.nnz),
    )  # fmt: skip
    try:
        assert strict.book.drift is not None and strict.book.drift.limited() == {drift}
        assert strict.book.drift.steps_seen(drift) == 2 * T + 1  # history rebuilt from the logged GradIP
    finally:
        strict.close()
    caplog.clear()
    coord, runner = _start(tmp_path, broker_url, mask, 3, **kw)
    try:
        p3 = clients["normal"].wait_for(RoundPlan, lambda p: p.round == 3)
        assert sampled(p3, [normal, drift]) == {normal: T, drift: 1}
    finally:
        runner.stop()
        for cl in clients.values():
            cl.close()
    assert not [r for r in caplog.records if r.getMessage().startswith("drift_limit ")]  # logged once only
    assert len(_events(tmp_path / "state", "drift_limit")) == 1


def test_drift_control_off_never_limits(tmp_path: Path, broker_url: str) -> None:
    mask = synthetic_mask((200,))
    mon = DriftMonitor.from_mask(mask)
    fp, fleet = mask.meta.fingerprint, uid("f")
    coord, runner = _start(tmp_path, broker_url, mask, 2, fleet=fleet, drift_control=False, **DRIFT)
    clients = {n: FakeClient(broker_url, fleet, uid(n)) for n in ("normal", "drift")}
    try:
        for cl in clients.values():
            cl.join(fp, mask.mask_id)
        _round(mon, clients, 0, fp, {"normal": 1.0, "drift": 1.0})
        _round(mon, clients, 1, fp, {"normal": 1.0, "drift": 0.01})
        p2 = _round(mon, clients, 2, fp, {"normal": 1.0, "drift": 0.01})
        assert p2.steps == {} and set(sampled(p2, [c.cid for c in clients.values()]).values()) == {T}  # no exception
        runner.join()
    finally:
        runner.stop()
        for cl in clients.values():
            cl.close()
    assert coord.metrics.registry.get_sample_value("meerkat_drift_limited_total") == 0.0
    assert _events(tmp_path / "state", "drift_limit") == []
    rep = status_report(tmp_path / "state")
    assert rep["clients_limited"] == []
    stats = {c["client"]: c["drift"] for c in rep["clients"]}
    assert stats[clients["drift"].cid]["rho_later"] >= 3.0  # still measured and shown, just not acted on


def test_drift_config_validated() -> None:
    with pytest.raises(ConfigError) as ei:
        load_coordinator_config(
            overrides={"mask": "m", "drift_window": 30, "drift_quie_min": 1.5, "drift_later_min": 0.5},
            environ={},
        )
    msg = str(ei.value)
    assert "drift_quie_min" in msg and "drift_later_min" in msg
    cfg = load_coordinator_config(
        overrides={"mask": "m", "drift_window": 5, "drift_min_steps": 10}, environ={}
    )
    assert cfg.drift_control and cfg.drift_thresholds().window == 5
    with pytest.raises(ConfigError, match="drift_min_steps"):
        load_coordinator_config(overrides={"mask": "m", "drift_window": 30}, environ={})


def test_compact_history_matches_full() -> None:
    """The coordinator's monitor keeps first + last window only: same stats and flags as the full history."""
    g = torch.linspace(-1.0, 1.0, 64)
    th = DriftThresholds(window=4, min_steps=8, decay_rule="absolute")
    u = raw_u64(11, 600)
    vals = [
        float((x >> 40) / 2**24 - 0.5) * (0.99**i) for i, x in enumerate(u)
    ]  # decays: flags at some point
    full, comp = DriftMonitor(g, thresholds=th), DriftMonitor(g, thresholds=th, keep_history=False)
    for r, start in enumerate(range(0, len(vals), 5)):
        chunk = vals[start : start + 5]
        assert full.observe_gradip("c", r, chunk) == comp.observe_gradip("c", r, chunk)
        assert full.stats("c") == comp.stats("c") and full.steps_seen("c") == comp.steps_seen(
            "c"
        ) == start + len(chunk)
    assert full.limited() == comp.limited() == {"c"}
    for n in range(1, 2 * th.window + 1):  # windows still overlapping
        f, c = DriftMonitor(g, thresholds=th), DriftMonitor(g, thresholds=th, keep_history=False)
        f.observe_gradip("x", 0, vals[:n])
        c.observe_gradip("x", 0, vals[:n])
        assert f.gradip("x") == c.gradip("x") and f.stats("x") == c.stats("x")


def _limited_round(state_dir: Path, client: str) -> int | None:
    try:
        log = EventLog(state_dir, readonly=True)
    except (FileNotFoundError, sqlite3.OperationalError):
        return None  # the coordinator has not created its log yet
    try:
        return next((d.limited_round for d in log.drift_rows() if d.client == client), None)
    except sqlite3.OperationalError:
        return None  # no schema yet
    finally:
        log.close()


@pytest.mark.timeout(60)
def test_flag_survives_sigkill(tmp_path: Path, broker_url: str, tiny_model) -> None:  # type: ignore[no-untyped-def]
    """kill -9 right after the update that flags a client is committed, before any plan used the flag:
    the restarted coordinator closes that round and plans the next one with steps=1 for it."""
    fleet, state = uid("f"), tmp_path / "state"
    cfg_path = write_config_toml(
        tmp_path / "coordinator.toml", broker=broker_url, fleet=fleet, client_id=uid("coord"), state_dir=state,
        model_dir=tiny_model.model_dir, mask=tiny_model.mask_path, steps=T, lr=0.01, min_clients=2,
        round_deadline_s=600.0, metrics=False, sqlite_synchronous="normal", **DRIFT,
    )  # fmt: skip
    mon = DriftMonitor.from_mask(tiny_model.mask)
    fp = tiny_model.fingerprint
    clients = {n: FakeClient(broker_url, fleet, uid(n)) for n in ("normal", "drift")}
    normal, drift = clients["normal"], clients["drift"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "shared.cli", "coordinator", "--config", str(cfg_path)],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    runner = None
    try:
        for cl in clients.values():
            cl.join(fp, tiny_model.mask.mask_id)
        _round(mon, clients, 0, fp, {"normal": 1.0, "drift": 1.0})
        p1 = normal.wait_for(RoundPlan, lambda p: p.round == 1, timeout=30)
        drift.update(1, _grads(mon, p1, drift.cid, 0.01), 10, fp, msg_id=101)
        wait_until(lambda: _limited_round(state, drift.cid) == 1, 20, "the flag was not committed")
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(10) == -signal.SIGKILL
        normal.update(1, _grads(mon, p1, normal.cid, 1.0), 10, fp, msg_id=101)  # the broker holds it
        coord = Coordinator(load_coordinator_config(cfg_path, environ={}), stop_after_round=2)
        runner = ThreadedCoordinator(coord).start()
        p2 = normal.wait_for(RoundPlan, lambda p: p.round == 2, timeout=30)
        assert sampled(p2, [normal.cid, drift.cid]) == {normal.cid: T, drift.cid: 1}
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if runner is not None:
            runner.stop()
        for cl in clients.values():
            cl.close()
    assert len(_events(state, "drift_limit")) == 1  # decided once, before the kill
