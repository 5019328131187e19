"""Coordinator workers (coordinator/workers.py): 2 real `meerkat coordinator` processes on a private Mosquitto
(MQTT 5 shared subscriptions) and the local PostgreSQL. kill -9 of the leader mid-round: the standby takes
over and closes the round; every update counted once; the RoundResults are byte-identical to a single
coordinator (SQLite) fed the same updates. The run's lifecycle (issue 30) as the single coordinator's: the
leader publishes the retained RunState (running, finishing, finished / stopped), honours `meerkat stop`
(through the shared log), writes the report; the standby exits 0 once the run ended."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from coordfakes import FakeClient, uid, wait_until, write_config_toml

from coordinator.eventlog import EventLog
from shared.apply import fedavg_scalars
from shared.codec import decode, encode
from shared.fingerprint import fp_tag
from shared.messages import RoundPlan, RoundResult, RunState, Update
from tests.conftest import Mosquitto

ROOT = Path(__file__).resolve().parents[2]
N = {"a": 5, "b": 7, "c": 11, "d": 13, "e": 3, "f": 9}  # device -> n_samples
STEPS = 2


def grads(k: str, round: int) -> list[float]:
    i = "abcdef".index(k)
    return [0.125 * (i + 1) * (-1) ** round, 0.25 - 0.0625 * i + round]


class Device(FakeClient):
    """A FakeClient that keeps the raw RoundResult payloads and, like a real device (docs/PROTOCOL.md
    "Delivery"), re-sends its kept Update whenever the plan of that round arrives again."""

    def __init__(self, url: str, fleet: str, cid: str) -> None:
        self.kept: dict[int, bytes] = {}  # round -> the Update payload, until its result arrived
        self.raw_results: dict[int, bytes] = {}
        self.resends = 0
        self.run_states: list[RunState] = []  # every RunState received on `run`, in order
        super().__init__(url, fleet, cid, run=True)

    def send(self, round: int, fingerprint: str, n: int, g: list[float]) -> None:
        payload = encode(Update(round, 100 + round, tuple(g), n, fp_tag(fingerprint), 1.0))
        self.kept[round] = payload
        self.publish(self.topics.up(self.cid), payload)

    def seen(self, topic: str, payload: bytes, m: Any) -> None:
        if isinstance(m, RoundResult) and topic == self.topics.result(m.round):
            self.raw_results.setdefault(m.round, payload)
            self.kept.pop(m.round, None)
        if isinstance(m, RoundPlan) and m.round in self.kept:
            self.resends += 1
            self.publish(self.topics.up(self.cid), self.kept[m.round])
        if isinstance(m, RunState):
            self.run_states.append(m)


def _start(cfg: Path, log: Path, *extra: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "shared.cli", "-v", "coordinator", "--config", str(cfg), *extra],
        cwd=ROOT, stdout=log.open("ab"), stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip


def _updates(state: Path, event_log: str, round: int) -> list[str]:
    log = EventLog(state, readonly=True, event_log=event_log)
    try:
        return [u.client for u in log.updates(round=round)]
    finally:
        log.close()


def _meta(state: Path, event_log: str, key: str) -> str | None:
    log = EventLog(state, readonly=True, event_log=event_log)
    try:
        return log.get_meta(key)
    finally:
        log.close()


def _status(cfg: Path) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-m", "shared.cli", "status", "--config", str(cfg), "--json"],
                         cwd=ROOT, capture_output=True)  # fmt: skip
    assert out.returncode == 0, out.stderr.decode()[-2000:]
    rep: dict[str, Any] = json.loads(out.stdout)
    return rep


def _run_fleet(broker: str, fleet: str, tiny: Any, kill: Any = None) -> dict[str, Device]:
    """Join the 6 devices, play 2 rounds (round 0: a, b, c, then `kill()`, then d, e, f); the devices."""
    fp, mid = tiny.fingerprint, tiny.mask.mask_id
    devs = {k: Device(broker, fleet, f"dev-{k}") for k in N}
    for k, d in devs.items():
        d.join(fp, mid, n_samples=N[k])
    devs["a"].wait_for(RoundPlan, lambda p: p.round == 0, timeout=120)
    for k in "abc":
        devs[k].send(0, fp, N[k], grads(k, 0))
    if kill is not None:
        kill()
    for k in "def":
        devs[k].send(0, fp, N[k], grads(k, 0))
    for d in devs.values():
        d.wait_for(RoundResult, lambda r: r.round == 0, timeout=60)
    devs["a"].wait_for(RoundPlan, lambda p: p.round == 1, timeout=30)
    for k, d in devs.items():
        d.send(1, fp, N[k], grads(k, 1))
    for d in devs.values():
        d.wait_for(RoundResult, lambda r: r.round == 1, timeout=60)
    return devs


@pytest.mark.timeout(300)
def test_kill_leader_mid_round_standby_closes_it_byte_identical(tmp_path: Path, tiny_model: Any, pg_url: str) -> None:
    fleet = uid("f")
    keys = dict(fleet=fleet, client_id="coord", model_dir=tiny_model.model_dir, mask=tiny_model.mask_path,
                steps=STEPS, lr=0.01, min_clients=len(N), round_deadline_s=600.0, rounds=2, metrics=False)  # fmt: skip

    # -- 2 workers on PostgreSQL; the leader is killed after part of round 0 was logged ----------------
    (tmp_path / "b1").mkdir()
    broker = Mosquitto(tmp_path / "b1").start()
    state = tmp_path / "state"
    cfg = write_config_toml(tmp_path / "cluster.toml", broker=broker.url, state_dir=state, event_log=pg_url,
                            cluster=True, worker_session_s=3, **keys)  # fmt: skip
    logs = {w: tmp_path / f"{w}.log" for w in ("w1", "w2")}
    procs = {w: _start(cfg, logs[w], "--set", f"worker_id={w}") for w in ("w1", "w2")}
    killed: list[str] = []

    def kill_leader() -> None:
        wait_until(lambda: len(_updates(state, pg_url, 0)) == 3, 30, "a, b, c were not logged")
        leader = _meta(state, pg_url, "leader")
        assert leader in procs
        procs[leader].send_signal(signal.SIGKILL)
        assert procs[leader].wait(10) == -signal.SIGKILL
        killed.append(leader)

    try:
        devs = _run_fleet(broker.url, fleet, tiny_model, kill=kill_leader)
        standby = next(w for w in procs if w not in killed)
        assert procs[standby].wait(60) == 0, logs[standby].read_text()[-3000:]
        for d in devs.values():  # the fleet is told the run is over (retained RunState on `run`)
            d.wait_for(RunState, lambda s: s.state == "finished", timeout=30)
        rep = _status(cfg)
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
        for d in locals().get("devs", {}).values():
            d.close()
        broker.kill()
    text = logs[standby].read_text()
    assert f"worker {standby}: leader" in text and "reopening round 0 with 3 committed updates" in text, text[-3000:]
    assert _meta(state, pg_url, "leader") == standby
    # the run's end, as a single coordinator's: finished after its round count, told to the fleet (retained)
    assert (_meta(state, pg_url, "run_state"), _meta(state, pg_url, "run_last_round")) == ("finished", "1")
    seen = [(s.state, s.last_round) for d in devs.values() for s in d.run_states]
    assert seen and all(s == "running" for s, _ in seen if s != "finished"), seen  # each leader's take-over
    assert all(d.run_states[-1].state == "finished" and d.run_states[-1].last_round == 1 for d in devs.values())
    assert "run finished after round 1" in text
    assert json.loads((state / "report" / "report.json").read_text())["run"]["state"] == "finished"
    # every accepted update counted once: one row per (client, round), each client's count 2, n_clients 6
    assert {c["client"]: c["updates"] for c in rep["clients"]} == {f"dev-{k}": 2 for k in N}
    assert [r["n_clients"] for r in rep["recent_rounds"]] == [len(N), len(N)]
    for r in (0, 1):
        assert sorted(_updates(state, pg_url, r)) == sorted(f"dev-{k}" for k in N)
        res = decode(devs["a"].raw_results[r], RoundResult)
        want = fedavg_scalars({f"dev-{k}": grads(k, r) for k in N}, {f"dev-{k}": float(N[k]) for k in N}, STEPS)
        assert list(res.scalars) == pytest.approx(want, rel=1e-6)
    cluster = {r: hashlib.sha256(devs["a"].raw_results[r]).hexdigest() for r in (0, 1)}
    assert all(d.raw_results == devs["a"].raw_results for d in devs.values())

    # -- the same updates to one coordinator on SQLite: the same bytes ---------------------------------
    (tmp_path / "b2").mkdir()
    broker = Mosquitto(tmp_path / "b2").start()
    cfg1 = write_config_toml(tmp_path / "single.toml", broker=broker.url, state_dir=tmp_path / "state1", **keys)
    proc = _start(cfg1, tmp_path / "single.log")
    try:
        devs = _run_fleet(broker.url, fleet, tiny_model)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for d in devs.values():
            d.close()
        broker.kill()
    single = {r: hashlib.sha256(devs["a"].raw_results[r]).hexdigest() for r in (0, 1)}
    assert cluster == single
    assert rep["values_checksum"] == _status(cfg1)["values_checksum"]


@pytest.mark.timeout(300)
def test_meerkat_stop_ends_a_cluster_run_like_a_single_coordinators(tmp_path: Path, tiny_model: Any, pg_url: str) -> None:
    """No round count: `meerkat stop` (its request in the shared PostgreSQL log) makes the leader finish the
    open round and stop; RunState finishing then stopped on `run`; both workers exit 0; a new worker on the
    stopped run says so and exits 0."""
    fleet = uid("f")
    fp, devices = tiny_model.fingerprint, ("a", "b")
    (tmp_path / "b").mkdir()
    broker = Mosquitto(tmp_path / "b").start()
    state = tmp_path / "state"
    cfg = write_config_toml(tmp_path / "cluster.toml", broker=broker.url, state_dir=state, event_log=pg_url,
                            cluster=True, worker_session_s=3, fleet=fleet, client_id="coord",
                            model_dir=tiny_model.model_dir, mask=tiny_model.mask_path, steps=STEPS, lr=0.01,
                            min_clients=len(devices), round_deadline_s=600.0, metrics=False)  # fmt: skip
    logs = {w: tmp_path / f"{w}.log" for w in ("w1", "w2")}
    procs = {w: _start(cfg, logs[w], "--set", f"worker_id={w}") for w in ("w1", "w2")}
    devs = {k: Device(broker.url, fleet, f"dev-{k}") for k in devices}
    stop: subprocess.Popen[bytes] | None = None
    try:
        for k, d in devs.items():
            d.join(fp, tiny_model.mask.mask_id, n_samples=N[k])
        a = devs["a"]
        a.wait_for(RunState, lambda s: s.state == "running", timeout=120)
        a.wait_for(RoundPlan, lambda p: p.round == 0, timeout=120)
        for k, d in devs.items():
            d.send(0, fp, N[k], grads(k, 0))
        a.wait_for(RoundPlan, lambda p: p.round == 1, timeout=60)  # round 1 open: the stop finishes it
        stop = subprocess.Popen([sys.executable, "-m", "shared.cli", "stop", "--config", str(cfg), "--wait", "90"],
                                cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
        fin = a.wait_for(RunState, lambda s: s.state == "finishing", timeout=60)
        assert (fin.last_round, fin.reason) == (1, "meerkat stop")
        for k, d in devs.items():
            d.send(1, fp, N[k], grads(k, 1))
        end = a.wait_for(RunState, lambda s: s.state == "stopped", timeout=60)
        assert end.last_round == 1
        out = stop.communicate(timeout=60)[0].decode()
        assert stop.returncode == 0 and "run stopped after round 1" in out, out
        for w, p in procs.items():
            assert p.wait(60) == 0, logs[w].read_text()[-3000:]
        leader = _meta(state, pg_url, "leader")
        assert (_meta(state, pg_url, "run_state"), _meta(state, pg_url, "run_last_round")) == ("stopped", "1")
        assert _meta(state, pg_url, "stop_request") is None  # taken once
        assert "stop request (meerkat stop): finishing" in logs[str(leader)].read_text()
        standby = next(w for w in procs if w != leader)
        assert "this run is stopped (after round 1" in logs[standby].read_text()  # took the lock, found it over
        with pytest.raises(TimeoutError):
            a.wait_for(RoundPlan, lambda p: p.round == 2, timeout=2)  # nothing opened after the stop
        again = subprocess.run([sys.executable, "-m", "shared.cli", "-v", "coordinator", "--config", str(cfg), "--set",
                                "worker_id=w3"], cwd=ROOT, capture_output=True, text=True, timeout=120)  # fmt: skip
        assert again.returncode == 0 and "this run is stopped (after round 1" in again.stdout + again.stderr
        assert json.loads((state / "report" / "report.json").read_text())["run"]["state"] == "stopped"
    finally:
        for p in [*procs.values(), *([stop] if stop is not None else [])]:
            if p.poll() is None:
                p.kill()
                p.wait()
        for d in devs.values():
            d.close()
        broker.kill()


def test_cluster_config_is_refused_without_postgresql_or_worker_id(tmp_path: Path) -> None:
    from coordinator.config import CoordinatorConfig
    from coordinator.workers import Worker
    from shared.config import ConfigError

    base = dict(mask=tmp_path / "m.safetensors", metrics=False, cluster=True)
    problems = CoordinatorConfig(**base).validate()  # type: ignore[arg-type]
    assert any(p.startswith("cluster: needs event_log") for p in problems)
    cfg = CoordinatorConfig(**base, event_log="postgresql://nobody@127.0.0.1:1/x")  # type: ignore[arg-type]
    assert not any(p.startswith("cluster") for p in cfg.validate())
    with pytest.raises(ConfigError, match="worker_id: required") as err:
        Worker(cfg)  # refused before it connects anywhere
    assert "mask: " in str(err.value) and "does not exist" in str(err.value)  # a standby loads it only at take-over
