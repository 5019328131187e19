"""Issue 28 end to end over Mosquitto: three devices train a DP fleet (sigma derived on each device from the
target epsilon), end bit-identical with the coordinator, stop when the budget is spent, and `meerkat status
--json` shows each device's epsilon equal to dp-accounting's value for the steps it published."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import dp_accounting
from dp_accounting import rdp

from coordinator.eventlog import EventLog
from shared.accountant import default_delta, noise_multiplier

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "client"))
from clienttoy import (  # noqa: E402
    REPO,
    ThreadedClient,
    ThreadedCoordinator,
    Toy,
    build_toy,
    client_settings,
    coordinator_config,
    uid,
)

N, B, STEPS, ROUNDS, TARGET = 24, 4, 3, 3, 4.0


def _status(state: Path) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-m", "shared.cli", "status", "--json", "--state-dir", str(state)],
                         cwd=REPO, capture_output=True, text=True, timeout=120, check=True)  # fmt: skip
    return json.loads(out.stdout)


def test_three_dp_devices_over_mosquitto(broker_url: str, tmp_path: Path) -> None:
    toy: Toy = build_toy(tmp_path / "toy")
    fleet = uid("f")
    coord = ThreadedCoordinator(coordinator_config(
        toy, broker_url, fleet, tmp_path / "coord", steps=STEPS, batch_size=B, min_clients=3, min_updates=3,
        dp_epsilon=TARGET, dp_steps=ROUNDS * STEPS, dp_clip=0.5,
    ))  # fmt: skip
    ids = [uid(f"d{i}") for i in range(3)]
    clients = [ThreadedClient(client_settings(toy, broker_url, fleet, c, tmp_path / c, eval_every=0, heartbeat_s=0.5))
               for c in ids]  # fmt: skip
    try:
        for c in clients:
            c.wait_round(ROUNDS - 1, 240)
        checksums = {c.client.st.checksum for c in clients}
        log = EventLog(tmp_path / "coord", readonly=True)
        try:
            last = log.results(after=ROUNDS - 2, upto=ROUNDS - 1)
        finally:
            log.close()
        assert [r.round for r in last] == [ROUNDS - 1] and checksums == {last[0].values_checksum}
        end = time.monotonic() + 60
        while True:  # the plan of round ROUNDS does not fit the budget: each device says so in its heartbeat
            rep = _status(tmp_path / "coord")
            mine = {c["client"]: c for c in rep["clients"] if c["client"] in ids}
            if len(mine) == 3 and all(c["dp_exhausted"] is True for c in mine.values()) or time.monotonic() > end:
                break
            time.sleep(0.5)
        # the accountant, called directly: sigma each device derived, ROUNDS * STEPS Poisson-sampled steps
        delta, q = default_delta(N), B / N
        sigma = noise_multiplier(TARGET, delta, q, ROUNDS * STEPS)
        acc = rdp.RdpAccountant()
        acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), ROUNDS * STEPS)
        want = float(acc.get_epsilon(delta))
        assert want <= TARGET
        assert {c: (m["dp_epsilon"], m["telemetry"]["dp_delta"], m["dp_exhausted"]) for c, m in mine.items()} == {
            c: (want, delta, True) for c in ids
        }
    finally:
        for c in clients:
            c.stop()
        coord.stop()
