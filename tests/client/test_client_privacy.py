"""Device-level DP through the real client process and the real coordinator over Mosquitto: the device
spends its budget, stops with a clear log line, reports its epsilon, and a SIGKILL + restart does not
give it back (issue 28)."""

from __future__ import annotations

import time
from pathlib import Path

from clienttoy import (
    ClientProc,
    ThreadedCoordinator,
    Toy,
    client_settings,
    coordinator_config,
    coordinator_updates,
    uid,
    write_toml,
)

from coordinator.eventlog import EventLog
from edge_client.service.state import StateStore
from shared.accountant import Spend, epsilon

N, B, STEPS, SIGMA, DELTA = 24, 4, 3, 1.0, 1e-3  # the toy's 24 examples, nothing held out (eval_every = 0)
Q = B / N


def _spends(state_dir: Path) -> list[Spend]:
    store = StateStore(state_dir, read_only=True)
    try:
        return store.dp_spends()
    finally:
        store.close()


def _telemetry(coord_state: Path, client: str, timeout: float) -> dict[str, object]:
    """The newest heartbeat telemetry of `client` once it carries dp_exhausted = True."""
    end = time.monotonic() + timeout
    while True:
        log = EventLog(coord_state, readonly=True)
        try:
            t = next((c.telemetry for c in log.views.client_status() if c.client == client), {})
        finally:
            log.close()
        if t.get("dp_exhausted") is True or time.monotonic() > end:
            return t
        time.sleep(0.3)


def test_budget_stop_survives_sigkill(toy: Toy, broker_url: str, tmp_path: Path) -> None:
    two_rounds = epsilon([Spend(Q, SIGMA, 2 * STEPS)], DELTA)
    three_rounds = epsilon([Spend(Q, SIGMA, 3 * STEPS)], DELTA)
    target = (two_rounds + three_rounds) / 2  # pays for rounds 0 and 1, not round 2
    fleet, cid = uid("f"), uid("dev")
    coord = ThreadedCoordinator(coordinator_config(
        toy, broker_url, fleet, tmp_path / "coord", steps=STEPS, batch_size=B, dp_epsilon=target, dp_noise=SIGMA,
        dp_delta=DELTA, dp_clip=1.0, round_deadline_s=3.0,
    ))  # fmt: skip
    settings = client_settings(toy, broker_url, fleet, cid, tmp_path / "c", eval_every=0, heartbeat_s=0.5)
    conf = write_toml(tmp_path / "client.toml", settings)
    stop_line = "privacy budget spent: epsilon"  # "not training round 2: ..." or, once the coordinator
    # no longer samples it, "round R is not ours, but ours would not fit: ..."
    client = ClientProc(conf, tmp_path / "client1.log")
    try:
        client.wait_log(stop_line, 180)
        assert _spends(tmp_path / "c") == [Spend(Q, SIGMA, 2 * STEPS)]
        t = _telemetry(tmp_path / "coord", cid, 20)
        assert t.get("dp_exhausted") is True
        assert t.get("dp_epsilon") == epsilon([Spend(Q, SIGMA, 2 * STEPS)], DELTA) and t.get("dp_delta") == DELTA
        client.kill()  # SIGKILL: no clean shutdown
        client = ClientProc(conf, tmp_path / "client2.log")
        client.wait_log(stop_line, 180)  # the restarted device still knows what it spent
        time.sleep(2.0)  # a few more plans / extensions of round 2 arrive: it still does not train
        text = client.text()
        assert "round 2: training" not in text and "round 2: resuming" not in text
        assert _spends(tmp_path / "c") == [Spend(Q, SIGMA, 2 * STEPS)]
        assert client.terminate() == 0
    finally:
        if client.proc.poll() is None:
            client.kill()
        coord.stop()
    ups = [(r, s) for c, r, _, s in coordinator_updates(tmp_path / "coord") if c == cid]
    assert ups == [(0, "accepted"), (1, "accepted")], ups
