"""A run from first round to final report (issue 30): real `meerkat coordinator` and `meerkat client`
processes over Mosquitto on the toy model. One run ends at a fixed round count, one with `meerkat stop`;
both end with run state finished / stopped in the event log and on the retained `run` topic, the devices
say so (one exits 0 with `exit_when_run_over`, one idles), the report JSON and its plot exist, and a
restarted coordinator says the run is over instead of opening rounds again."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "client"))

from clienttoy import REPO, ClientProc, client_settings, uid, write_toml  # noqa: E402

from bench.demo.toy import Toy, build_toy, toml_text  # noqa: E402
from coordinator.eventlog import EventLog  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> Toy:
    return build_toy(tmp_path_factory.mktemp("toy"))


def _coordinator_toml(toy: Toy, broker: str, fleet: str, root: Path, **kw: Any) -> Path:
    settings: dict[str, Any] = dict(
        broker=broker, fleet=fleet, client_id=uid("coord"), state_dir=root / "coord", model_dir=toy.model_dir,
        mask=toy.mask_path, steps=2, lr=1e-3, eps=1e-2, batch_size=4, min_clients=2, round_deadline_s=60.0,
        metrics=False, sqlite_synchronous="normal", eval_data=toy.data_path, eval_max=8, eval_seq_len=32,
    )  # fmt: skip
    settings.update(kw)
    path = root / "coordinator.toml"
    path.write_text(toml_text(settings))
    return path


def _meerkat(*args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "shared.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip


def _spawn_coordinator(config: Path, log: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "shared.cli", "coordinator", "--config", str(config)], cwd=REPO,
                            env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT)  # fmt: skip


def _clients(toy: Toy, broker: str, fleet: str, root: Path) -> tuple[ClientProc, ClientProc]:
    """dev-exit exits 0 once the run is over; dev-idle stays connected and idles (the default)."""
    out = []
    for cid, extra in (("dev-exit", {"exit_when_run_over": True}), ("dev-idle", {})):
        cfg = write_toml(root / f"{cid}.toml", client_settings(toy, broker, fleet, cid, root / cid, **extra))
        out.append(ClientProc(cfg, root / f"{cid}.log"))
    return out[0], out[1]


def _meta(state_dir: Path) -> dict[str, str]:
    log = EventLog(state_dir, readonly=True)
    try:
        return log.views.meta()
    finally:
        log.close()


def _rounds_in_log(state_dir: Path) -> tuple[int, int | None]:
    """(closed results, the open plan's round or None)."""
    log = EventLog(state_dir, readonly=True)
    try:
        plan = log.open_plan()
        return len(log.results()), None if plan is None else plan.round
    finally:
        log.close()


def _closed_rounds(state_dir: Path) -> int:
    """Closed rounds in the log; 0 before the coordinator created it (the file exists a moment before its tables)."""
    if not (state_dir / "events.sqlite").exists():
        return 0
    try:
        return _rounds_in_log(state_dir)[0]
    except sqlite3.OperationalError:  # no such table yet
        return 0


def _check_ended(state: str, last: int, config: Path, root: Path, dev_exit: ClientProc, dev_idle: ClientProc) -> None:
    state_dir = root / "coord"
    meta = _meta(state_dir)
    assert (meta["run_state"], int(meta["run_last_round"])) == (state, last)
    status = json.loads(_meerkat("status", "--config", str(config), "--json").stdout)
    assert status["run_state"] == state and status["last_round"] == last
    # the devices learned it from the retained RunState: one exits 0, the other idles and says so
    said = f"run {state} by the coordinator after round {last}"
    assert dev_exit.proc.wait(60) == 0, dev_exit.text()[-3000:]
    assert said in dev_exit.text()
    dev_idle.wait_log(said, 30)
    assert dev_idle.proc.poll() is None  # idle, not exited
    assert dev_idle.terminate() == 0
    # the report the coordinator wrote at the end: JSON + plot, the whole run, the baseline first
    rep = json.loads((state_dir / "report" / "report.json").read_text())
    assert (state_dir / "report" / "report.png").stat().st_size > 10_000
    assert rep["run"]["state"] == state and rep["run"]["last_round"] == last
    assert [r["round"] for r in rep["rounds"]] == list(range(last + 1))
    assert all(r["clients"] == 2 and r["uplink_bytes"] > 0 and r["downlink_bytes"] > 0 for r in rep["rounds"])
    assert rep["before"]["round"] == -1 and rep["after"]["round"] == last  # the coordinator's baseline eval of v_0
    assert set(rep["devices"]) == {"dev-exit", "dev-idle"}
    assert all(p["rss_bytes"] for pts in rep["devices"].values() for p in pts)
    for c in ("dev-exit", "dev-idle"):  # the real client process's high-water mark (Heartbeat key 19), carried
        mem = rep["memory"][c]  # through the coordinator's log into the report: never below an RSS sample
        assert mem["peak_rss_bytes"] is not None and mem["peak_rss_bytes"] >= mem["max_rss_bytes"] > 50 << 20, mem
        assert all(p["peak_rss_bytes"] >= p["rss_bytes"] for p in rep["devices"][c] if p["peak_rss_bytes"])
    assert all(c["telemetry"]["peak_rss_bytes"] >= c["telemetry"]["rss_bytes"] for c in status["clients"])
    assert rep["memory"]["dev-idle"]["budget_bytes"] == 2 * 2**30
    # `meerkat report` writes the same report on demand
    out = _meerkat("report", "--config", str(config), "--out", str(root / "again"))
    assert out.returncode == 0, out.stderr
    again = json.loads((root / "again" / "report.json").read_text())
    assert again["rounds"] == rep["rounds"] and (root / "again" / "report.png").exists()
    # a restart says the run is over and opens nothing
    before = _rounds_in_log(state_dir)
    restart = _meerkat("coordinator", "--config", str(config), timeout=120)
    assert restart.returncode == 0, restart.stderr
    assert f"this run is {state} (after round {last}" in restart.stderr
    assert _rounds_in_log(state_dir) == before == (last + 1, None)


def test_a_fixed_round_count_finishes_the_run(toy: Toy, broker_url: str, tmp_path: Path) -> None:
    fleet = uid("life-")
    config = _coordinator_toml(toy, broker_url, fleet, tmp_path, rounds=3)
    coord = _spawn_coordinator(config, tmp_path / "coord.log")
    dev_exit, dev_idle = _clients(toy, broker_url, fleet, tmp_path)
    try:
        assert coord.wait(300) == 0, (tmp_path / "coord.log").read_text()[-4000:]
        assert "run finished after round 2" in (tmp_path / "coord.log").read_text()
        _check_ended("finished", 2, config, tmp_path, dev_exit, dev_idle)
    finally:
        for p in (coord, dev_exit.proc, dev_idle.proc):
            if p.poll() is None:
                p.kill()


def test_meerkat_stop_finishes_the_open_round_and_stops(toy: Toy, broker_url: str, tmp_path: Path) -> None:
    fleet = uid("life-")
    config = _coordinator_toml(toy, broker_url, fleet, tmp_path)  # rounds = 0: forever, until `meerkat stop`
    coord = _spawn_coordinator(config, tmp_path / "coord.log")
    dev_exit, dev_idle = _clients(toy, broker_url, fleet, tmp_path)
    try:
        end = time.monotonic() + 240
        while _closed_rounds(tmp_path / "coord") < 2:
            assert time.monotonic() < end and coord.poll() is None, (tmp_path / "coord.log").read_text()[-4000:]
            time.sleep(0.5)
        stop = _meerkat("stop", "--config", str(config), "--wait", "120", timeout=180)
        assert stop.returncode == 0, stop.stdout + stop.stderr
        assert "stop requested: the coordinator finishes its open round, then stops" in stop.stdout
        assert coord.wait(60) == 0
        last = int(_meta(tmp_path / "coord")["run_last_round"])
        assert last >= 1 and f"run stopped after round {last}" in stop.stdout
        text = (tmp_path / "coord.log").read_text()
        assert "stop request (meerkat stop): finishing" in text and f"run stopped after round {last}" in text
        _check_ended("stopped", last, config, tmp_path, dev_exit, dev_idle)
        again = _meerkat("stop", "--config", str(config))
        assert again.returncode == 0 and "already stopped" in again.stdout
    finally:
        for p in (coord, dev_exit.proc, dev_idle.proc):
            if p.poll() is None:
                p.kill()
