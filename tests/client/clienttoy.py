"""Test helpers for the edge client: a tiny random model + tokenizer + mask + labelled data on disk, a
client.toml writer, the real coordinator in a thread, a scripted retained plan, and `meerkat client` as a
real subprocess."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from bench.demo.toy import WORDS, Toy, build_toy, toml_text  # noqa: F401  (re-exported for the tests)

REPO = Path(__file__).resolve().parents[2]


def uid(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:8]}"


def client_settings(toy: Toy, broker: str, fleet: str, client_id: str, state_dir: Path, **kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = dict(
        broker=broker, fleet=fleet, client_id=client_id, model_dir=str(toy.model_dir), mask=str(toy.mask_path),
        data=str(toy.data_path), quant="nf4", device="cpu", batch_size=4, seq_len=32, memory_budget_gib=2.0,
        state_dir=str(state_dir), heartbeat_s=1.0, sync_retry_s=1.0, resend_after_s=5.0, log_level="INFO",
        policy={"enabled": False},  # a shared test machine: other processes' load must not pause these clients
    )  # fmt: skip
    base.update(kw)
    return base


def write_toml(path: Path, settings: dict[str, Any]) -> Path:
    path.write_text(toml_text(settings))
    return path


def coordinator_config(toy: Toy, broker: str, fleet: str, state_dir: Path, **kw: Any) -> Any:
    from coordinator.config import CoordinatorConfig

    base: dict[str, Any] = dict(
        broker=broker, fleet=fleet, client_id=uid("coord"), state_dir=state_dir, model_dir=toy.model_dir,
        mask=toy.mask_path, steps=3, lr=1e-3, eps=1e-2, batch_size=4, min_clients=1, round_deadline_s=60.0,
        metrics=False, sqlite_synchronous="normal", offline_after_s=60.0,
    )  # fmt: skip
    base.update(kw)
    return CoordinatorConfig(**base)


class ThreadedCoordinator:
    """The real coordinator (`coordinator.server.Coordinator`) serving in a daemon thread."""

    def __init__(self, config: Any, stop_after_round: int | None = None) -> None:
        from coordinator.server import Coordinator

        self.coord = Coordinator(config, stop_after_round=stop_after_round)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="coordinator", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.coord.run()
        except BaseException as exc:  # surfaced by wait()
            self.error = exc

    def wait(self, timeout: float) -> None:
        self.thread.join(timeout)
        if self.thread.is_alive():
            self.coord.stop()
            self.thread.join(15)
            raise TimeoutError(f"coordinator did not reach its last round within {timeout} s (at {self.coord.last_round})")
        if self.error is not None:
            raise self.error

    def stop(self) -> None:
        self.coord.stop()
        self.thread.join(15)


def coordinator_updates(state_dir: Path) -> list[tuple[str, int, int, str]]:
    """(client, round, msg_id, status) of every update row the coordinator committed (read-only)."""
    from coordinator.eventlog import EventLog

    log = EventLog(state_dir, readonly=True)
    try:
        return [(u.client, u.round, u.msg_id, u.status) for u in log.updates()]  # in (round, client) order
    finally:
        log.close()


class ClientProc:
    """`meerkat client --config` as a real subprocess, its log in a file."""

    def __init__(self, config: Path, log: Path) -> None:
        self.log = log
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "shared.cli", "client", "--config", str(config)],
            cwd=REPO, env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT,
        )

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_log(self, needle: str, timeout: float, count: int = 1) -> None:
        end = time.monotonic() + timeout
        while self.text().count(needle) < count:
            if self.proc.poll() is not None:
                raise AssertionError(f"client exited {self.proc.returncode} before {needle!r}:\n{self.text()[-4000:]}")
            if time.monotonic() > end:
                raise TimeoutError(f"no {needle!r} (x{count}) in the client log within {timeout} s:\n{self.text()[-4000:]}")
            time.sleep(0.05)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self, timeout: float = 30.0) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)


class ThreadedClient:
    """The real client (EngineTrainer + EdgeClient) running `run()` in a daemon thread."""

    def __init__(self, settings: dict[str, Any]) -> None:
        from edge_client.service.client import EdgeClient
        from edge_client.service.config import load_client_config
        from edge_client.service.trainer import EngineTrainer

        cfg = load_client_config(None, settings, environ={})
        self.client = EdgeClient(cfg, EngineTrainer(cfg))
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name=f"client-{cfg.client_id}", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.client.run()
        except BaseException as exc:  # surfaced by stop()
            self.error = exc

    def wait_round(self, round: int, timeout: float) -> None:
        end = time.monotonic() + timeout
        while self.client.st.round < round:
            if self.error is not None or not self.thread.is_alive():
                raise AssertionError(f"client died: {self.error!r}")
            if time.monotonic() > end:
                raise TimeoutError(f"client at round {self.client.st.round}, wanted {round}")
            time.sleep(0.05)

    def stop(self) -> None:
        self.client.stop()
        self.thread.join(15)
        if self.error is not None:
            raise self.error


def retained_plan(toy: Toy, broker_url: str, fleet: str, cid: str, T: int, seed: int) -> tuple[Any, Any]:
    """A one-client RoundPlan of T Gaussian steps (round 0 from v_0) published retained on `fleet`, and the
    started probe link that subscribed to the client's `up/` topic first (it sees every Update)."""
    from shared.apply import values_checksum
    from shared.codec import encode
    from shared.messages import RoundPlan
    from shared.mqtt import MqttLink
    from shared.prng import derive_seed
    from shared.sidecar import initial_values_from_dir
    from shared.topics import Topics

    t = Topics(fleet)
    v0 = initial_values_from_dir(toy.model_dir, toy.mask.layers)
    plan = RoundPlan(
        fleet=fleet, round=0, seeds=tuple(derive_seed(seed, s) for s in range(T)), lr=2.0, eps=5e-2,
        dist="gaussian", steps={cid: T}, base_round=-1, deadline=time.time() + 3600,
        fingerprint=toy.fingerprint, mask_id=toy.mask.mask_id, batch_size=4, values_checksum=values_checksum(v0),
    )  # fmt: skip
    probe = MqttLink(broker_url, uid("probe"), subscriptions=[(t.up(cid), 1)])
    probe.start()
    assert probe.wait_connected(10)
    probe.publish(t.plan, encode(plan), qos=1, retain=True)
    return plan, probe
