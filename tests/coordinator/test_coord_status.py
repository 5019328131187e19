"""`meerkat status` reads the event log while the coordinator runs; /metrics serves Prometheus text on
loopback and wants the bearer token when one is configured."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from coordfakes import (
    FakeClient,
    ThreadedCoordinator,
    make_config,
    synthetic_mask,
    synthetic_v0,
    uid,
    write_config_toml,
)

from coordinator.server import Coordinator
from shared.apply import values_checksum
from shared.cli import main
from shared.messages import RoundPlan, RoundResult


def _get(url: str, token: str | None = None) -> tuple[int, str]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, ""


def test_status_and_metrics_while_running(
    tmp_path: Path, broker_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    mask = synthetic_mask((100,))
    cfg = make_config(
        tmp_path, broker_url, min_clients=1, steps=2, metrics=True, metrics_port=0, metrics_token="tok"
    )
    coord = Coordinator(cfg, mask=mask, initial_values=synthetic_v0(mask.nnz))
    runner = ThreadedCoordinator(coord).start()
    fp = mask.meta.fingerprint
    dev, off = FakeClient(broker_url, cfg.fleet, uid("dev")), FakeClient(broker_url, cfg.fleet, uid("off"))
    try:
        dev.join(fp, mask.mask_id, n_samples=4)
        dev.wait_for(RoundPlan, lambda p: p.round == 0)
        off.join(fp, mask.mask_id, n_samples=4)
        dev.heartbeat(round=0)
        dev.update(0, [0.5, -0.5], 4, fp, msg_id=3)
        dev.wait_for(RoundResult, lambda r: r.round == 0)
        off.go_offline()
        dev.update(0, [0.5, -0.5], 4, fp, msg_id=3)  # re-sent: a duplicate, counted per round
        dev.publish(dev.topics.up(dev.cid), b"junk")
        deadline = time.monotonic() + 10
        while True:  # wait for the coordinator to have logged what we sent
            assert main(["status", "--json", "--state-dir", str(cfg.state_dir)]) == 0
            rep = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
            if rep["rejected"] and rep["clients_offline"] == 1 and rep["duplicates"] or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        base = f"http://127.0.0.1:{coord.metrics_port}/metrics"
        assert _get(base)[0] == 401 and _get(base, "wrong")[0] == 401
        code, text = _get(base, "tok")
        assert main(["status", "--state-dir", str(cfg.state_dir)]) == 0
        human = capsys.readouterr().out
    finally:
        runner.stop()
        dev.close()
        off.close()
    assert rep["coordinator_alive"] is True and rep["stale"] is False and rep["coordinator_seen_s_ago"] < 5
    assert "STALE" not in human and "stopped" not in human
    assert main(["status", "--json", "--state-dir", str(cfg.state_dir)]) == 0  # after a clean stop
    after = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert after["coordinator_alive"] is False and after["coordinator_stopped_at"] is not None and after["stale"]
    assert rep["last_round"] == 0 and rep["clients_online"] == 1 and rep["clients_offline"] == 1
    assert rep["rejected"] == {"decode_bad_magic": 1}
    assert rep["duplicates"] == 1 and rep["values_checksum"] == values_checksum(coord.values)
    assert rep["recent_rounds"][-1] == {"round": 0, "n_clients": 1, "values_checksum": rep["values_checksum"],
                                        "duration_s": rep["last_round_duration_s"], "duplicates": 1,
                                        "lr": coord.config.lr}
    me = next(c for c in rep["clients"] if c["client"] == dev.cid)
    assert me["telemetry"]["temp_c"] == 51.5 and me["telemetry"]["rss_bytes"] == 300 << 20
    assert me["updates"] == 1 and me["last_update_s_ago"] is not None and me["gradip_mean_last"] is not None
    assert rep["open_round"] is None or rep["open_round"]["round"] == 1
    assert code == 200
    assert "meerkat_rounds_closed_total 1.0" in text
    assert 'meerkat_messages_rejected_total{reason="decode_bad_magic"} 1.0' in text
    assert 'meerkat_updates_accepted_total{kind="accepted"} 1.0' in text
    assert dev.cid in human and "decode_bad_magic=1" in human and "52C" in human
    assert f"values checksum: {rep['values_checksum']}" in human


def test_status_on_a_missing_state_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status", "--state-dir", str(tmp_path / "nothing")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.timeout(120)
def test_status_after_the_coordinator_is_sigkilled(
    tmp_path: Path, broker_url: str, tiny_model: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 16: a dead coordinator left status showing an open round and `online yes`. Now its heartbeat
    (meta alive_at) ages, and status says the round and the online flags are as of then."""
    state, fleet = tmp_path / "state", uid("f")
    cfg = write_config_toml(
        tmp_path / "coordinator.toml", broker=broker_url, fleet=fleet, client_id=uid("coord"), state_dir=state,
        model_dir=tiny_model.model_dir, mask=tiny_model.mask_path, steps=2, lr=0.01, min_clients=1,
        round_deadline_s=600.0, metrics=False,
    )  # fmt: skip
    log = tmp_path / "coordinator.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "shared.cli", "coordinator", "--config", str(cfg)], cwd=Path(__file__).parents[2],
        stdout=log.open("ab"), stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    dev = FakeClient(broker_url, fleet, uid("dev"))

    def status() -> dict[str, Any]:
        assert main(["status", "--json", "--stale-after", "3", "--state-dir", str(state)]) == 0
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    try:
        dev.join(tiny_model.fingerprint, tiny_model.mask.mask_id, n_samples=4)
        dev.wait_for(RoundPlan, lambda p: p.round == 0, timeout=60)
        time.sleep(0.5)
        live = status()
        assert live["coordinator_alive"] and live["open_round"]["round"] == 0, log.read_text()[-2000:]
        assert [c["online"] for c in live["clients"]] == [True]
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(10) == -signal.SIGKILL
        time.sleep(3.5)
        dead = status()
        assert main(["status", "--stale-after", "3", "--state-dir", str(state)]) == 0
        human = capsys.readouterr().out
    finally:
        if proc.poll() is None:
            proc.kill()
        dev.close()
    assert dead["coordinator_alive"] is False and dead["stale"] is True and dead["coordinator_stopped_at"] is None
    assert dead["coordinator_alive_at"] == pytest.approx(live["coordinator_alive_at"], abs=3.0)
    assert dead["coordinator_seen_s_ago"] >= 3.0
    assert dead["open_round"]["round"] == 0  # still in the log, but flagged as of the last heartbeat
    assert human.startswith("STALE: coordinator not seen for") and "as of then" in human and "yes*" in human
