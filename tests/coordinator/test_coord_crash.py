"""kill -9 of the coordinator process between acking updates and closing the round: after a restart the
round closes with every acked update exactly once (plus the ones the broker held while it was dead)."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from coordfakes import FakeClient, sampled, uid, wait_until, write_config_toml

from coordinator.eventlog import EventLog
from shared.apply import fedavg_scalars
from shared.messages import RoundPlan, RoundResult

ROOT = Path(__file__).resolve().parents[2]


def _start(cfg: Path, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "shared.cli", "-v", "coordinator", "--config", str(cfg)],
        cwd=ROOT, stdout=log.open("ab"), stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip


def _rows(state: Path, round: int) -> list[tuple[str, str]]:
    try:
        log = EventLog(state, readonly=True)
    except (FileNotFoundError, sqlite3.OperationalError):
        return []
    try:
        return [(u.client, str(u.msg_id)) for u in log.updates(round=round)]
    except sqlite3.OperationalError:
        return []  # no schema yet
    finally:
        log.close()


@pytest.mark.timeout(120)
def test_sigkill_between_ack_and_close(tmp_path: Path, broker_url: str, tiny_model) -> None:  # type: ignore[no-untyped-def]
    fleet, state = uid("f"), tmp_path / "state"
    cfg = write_config_toml(
        tmp_path / "coordinator.toml", broker=broker_url, fleet=fleet, client_id=uid("coord"), state_dir=state,
        model_dir=tiny_model.model_dir, mask=tiny_model.mask_path, steps=2, lr=0.01, min_clients=4,
        round_deadline_s=600.0, rounds=1, metrics=False, aggregation="fedavg",
    )  # fmt: skip
    # aggregation fedavg: the result must be the plain FedAvg of the four (the default rule would clip b's 2.0)
    log = tmp_path / "coordinator.log"
    fp, mid = tiny_model.fingerprint, tiny_model.mask.mask_id
    n = {"a": 5, "b": 7, "c": 11, "d": 13}
    grads = {"a": [0.5, -1.0], "b": [0.25, 2.0], "c": [-0.75, 0.125], "d": [1.5, -0.5]}
    clients = {k: FakeClient(broker_url, fleet, uid(k)) for k in n}
    proc = _start(cfg, log)
    try:
        for k, cl in clients.items():
            cl.join(fp, mid, n_samples=n[k])
        plan = clients["a"].wait_for(RoundPlan, lambda p: p.round == 0, timeout=60)
        assert len(sampled(plan, [cl.cid for cl in clients.values()])) == 4
        for k in ("a", "b"):
            clients[k].update(0, grads[k], n[k], fp, msg_id=10)
        ids = {k: cl.cid for k, cl in clients.items()}
        wait_until(lambda: len(_rows(state, 0)) == 2, 20, "a and b were not committed")
        time.sleep(0.3)  # their acks go out
        clients["c"].update(0, grads["c"], n["c"], fp, msg_id=10)  # races the kill: committed or redelivered
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(10) == -signal.SIGKILL
        committed = _rows(state, 0)
        assert len(committed) in (2, 3)

        clients["d"].update(0, grads["d"], n["d"], fp, msg_id=10)  # held by the broker while nobody listens
        clients["a"].update(0, grads["a"], n["a"], fp, msg_id=10)  # a re-send (lost PUBACK): same msg_id
        proc = _start(cfg, log)
        res = clients["b"].wait_for(RoundResult, lambda r: r.round == 0, timeout=60)
        assert proc.wait(60) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for cl in clients.values():
            cl.close()

    rows = _rows(state, 0)
    assert sorted(c for c, _ in rows) == sorted(ids.values())  # every update once, none twice
    assert res.n_clients == 4 and list(res.seeds) == list(plan.seeds)
    want = fedavg_scalars({ids[k]: grads[k] for k in n}, {ids[k]: float(n[k]) for k in n}, 2)
    assert list(res.scalars) == pytest.approx(want, rel=1e-6)
    text = log.read_text()
    assert "reopening round 0 with" in text
