"""`meerkat bench fleet` end to end (real mosquitto, real `meerkat coordinator` process, real MQTT devices)
plus the ground-truth arithmetic and the tiny MQTT client it rests on."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.fleet.devices import gaussian_grads, uniforms
from bench.fleet.fleet import ingest_rates, lost_and_double
from bench.fleet.mqttlite import open_client

KEYS = ("ingest_msgs_per_s", "close_latency_p50_s", "close_latency_p99_s", "lost", "double_counted",
        "coordinator_rss_mib", "coordinator_cpu_pct", "broker_cpu_pct", "vp_time_per_round_s", "rounds_closed",
        "plan_bytes", "fanout_bytes_per_round", "coordinator_cpu_us_per_msg", "broker_cpu_us_per_msg",
        "coordinator_cpu_us_per_msg_serving", "broker_cpu_us_per_msg_serving", "coordinator_cpu_s_ready")


def test_fleet_50_devices_3_rounds_with_dropouts(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "shared.cli", "bench", "fleet", "--devices", "50", "--rounds", "3", "--steps", "3",
           "--dropout", "0.1", "--outage-s", "0.5", "--compute-s", "0.3", "--heartbeat-s", "2", "--nnz", "5000",
           "--workdir", str(tmp_path / "fleet"), "--timeout", "240", "--json"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    for key in KEYS:
        assert key in res, key
    assert res["rounds_closed"] == 3 and res["all_rounds_closed"]
    assert res["lost"] == 0 and res["double_counted"] == 0
    assert res["updates_acked"] == res["updates_logged"] == res["n_clients_in_results"] >= 3 * 47
    assert res["reconnects"] > 0  # dropouts happened (deterministic: seed 0) and every update still arrived
    assert res["vp_checksums_ok"]
    assert res["ingest_msgs_per_s"] > 0 and res["close_latency_p99_s"] is not None
    # issue 31: every device gets each round's plan and result at least once: fan-out >= 50 x (plan + result)
    assert res["fanout_bytes_per_round"] >= 50 * res["plan_bytes"] and res["coordinator_cpu_us_per_msg"] > 0
    # the serving window leaves out the coordinator's start-up (before its /metrics was up), nothing else
    assert 0 < res["coordinator_cpu_us_per_msg_serving"] < res["coordinator_cpu_us_per_msg"]
    assert res["coordinator_cpu_s_ready"] > 0 and 0 <= res["broker_cpu_us_per_msg_serving"] <= res["broker_cpu_us_per_msg"]
    assert "RLIMIT_NOFILE raised" in r.stdout


def test_lost_and_double_counted_from_per_client_counts() -> None:
    sent, acked = {"a": 3, "b": 2}, {"a": 3, "b": 1}  # b's second update never got a PUBACK
    assert lost_and_double(sent, acked, {"a": 3, "b": 2}, 5) == (0, 0)
    assert lost_and_double(sent, acked, {"a": 3, "b": 1}, 4) == (0, 0)  # unacked and not logged: not lost
    assert lost_and_double(sent, acked, {"a": 2, "b": 2}, 4) == (1, 0)  # acked by the broker, not in the log
    assert lost_and_double(sent, acked, {"a": 4, "b": 2}, 5) == (0, 1)  # a counted one more than it sent
    assert lost_and_double(sent, acked, {"a": 3, "b": 2, "zz": 1}, 5) == (0, 1)  # a client nobody simulated
    assert lost_and_double(sent, acked, {"a": 3, "b": 2}, 7) == (0, 2)  # results count more than was sent


def test_ingest_rate_from_counter_samples() -> None:
    # 0.2 s samples: the counter rises 0 -> 1000 between t=1.0 and t=2.0, round window 0.5 .. 2.5
    pts = [(0.2 * i, min(1000.0, max(0.0, (0.2 * i - 1.0) * 1000))) for i in range(15)]
    rates = ingest_rates(pts, {0: (0.5, 2.5)})
    assert rates[0] == pytest.approx(1000.0, rel=0.25)
    assert ingest_rates(pts, {1: (2.6, 2.8)}) == {}  # nothing committed in that window


def test_simulated_draws_are_deterministic_and_plausible() -> None:
    g = gaussian_grads(0, 7, 3, 4000, 1.0)
    assert g == gaussian_grads(0, 7, 3, 4000, 1.0) and g != gaussian_grads(0, 7, 4, 4000, 1.0)
    mean = sum(g) / len(g)
    var = sum((x - mean) ** 2 for x in g) / len(g)
    assert abs(mean) < 0.1 and 0.85 < var < 1.15
    u = uniforms(1, 2, 3, 4, 1000)
    assert 0.0 <= u.min() and u.max() < 1.0


@pytest.mark.parametrize("n", [0, 1, 3, 4, 5, 20])
def test_small_draws_on_python_ints_have_the_numpy_bits(n: int) -> None:
    """uniforms() of a few values skips numpy: the floats must be bit-identical to the array path."""
    import numpy as np

    from shared.prng import derive_seed, raw_u64

    for seed, tag, index, rnd in ((0, 0x4D534744, 5, 0), (7, 0x464C454554, 12345, 19), (2**64 - 1, 1, 0, -1)):
        want = (raw_u64(derive_seed(seed, tag, index, rnd + 1), n) >> np.uint64(11)).astype(np.float64) / 2.0**53
        got = uniforms(seed, tag, index, rnd, n)
        assert got.dtype == np.float64 and got.tobytes() == want.tobytes()


def test_simulator_does_not_import_torch() -> None:
    """A device worker only draws numbers and speaks the codec: no ~2 s / ~250 MiB torch import per worker."""
    code = "import sys, bench.fleet.devices; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0


def test_mqttlite_publish_subscribe_qos1_and_will(broker_url: str) -> None:
    from bench.fleet.mqttlite import LiteWill

    async def scenario() -> list[tuple[str, bytes]]:
        host, port = broker_url.split("://")[1].rsplit(":", 1)
        got: list[tuple[str, bytes]] = []
        sub = await open_client(host, int(port), "lite-sub-t1", lambda t, p: got.append((t, p)), clean=True)
        assert await sub.subscribe([("lite-t1/#", 1)]) == 1
        pub = await open_client(host, int(port), "lite-pub-t1", lambda t, p: None, clean=True,
                                will=LiteWill("lite-t1/will", b"gone", 1, False))
        fut = pub.publish("lite-t1/x", b"\x00" * 300, 1)  # > 127 bytes: a two-byte remaining length
        assert fut is not None and await asyncio.wait_for(fut, 5) == 0
        pub.abort()  # no DISCONNECT: the broker must publish the will
        for _ in range(50):
            if len(got) >= 2:
                break
            await asyncio.sleep(0.1)
        sub.disconnect()
        return got

    got = asyncio.run(scenario())
    assert ("lite-t1/x", b"\x00" * 300) in got and ("lite-t1/will", b"gone") in got


def test_soak_slopes_flat_and_growing() -> None:
    from bench.fleet.fleet import soak_slopes

    closed = {r: 10.0 * r for r in range(100)}
    flat = soak_slopes({r: 0.5 for r in closed}, closed, [(10.0 * r - 1, 300.0) for r in range(100)])
    assert flat["close_latency_slope_s_per_100_rounds"] == 0.0
    assert flat["coordinator_rss_slope_mib_per_100_rounds"] == 0.0
    grow = soak_slopes({r: 0.01 * r for r in closed}, closed, [(10.0 * r - 1, 300.0 + 0.5 * r) for r in range(100)])
    assert grow["close_latency_slope_s_per_100_rounds"] == pytest.approx(1.0)
    assert grow["coordinator_rss_slope_mib_per_100_rounds"] == pytest.approx(50.0)
    assert soak_slopes({0: 1.0}, {0: 1.0}, [])["close_latency_slope_s_per_100_rounds"] is None


def test_fleet_with_2_coordinator_workers_on_postgresql(tmp_path: Path) -> None:
    """--workers 2: two `cluster = true` workers share the ingest (MQTT 5 shared subscriptions) on PostgreSQL."""
    import os
    import re

    psycopg = pytest.importorskip("psycopg")
    url = os.environ.get("MEERKAT_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
    try:
        psycopg.connect(url, connect_timeout=3).close()
    except psycopg.OperationalError as exc:
        pytest.skip(f"no PostgreSQL at {url} (set MEERKAT_TEST_PG): {str(exc).strip()[:200]}")
    cmd = [sys.executable, "-m", "shared.cli", "bench", "fleet", "--devices", "40", "--rounds", "2", "--steps", "3",
           "--compute-s", "0.3", "--heartbeat-s", "2", "--nnz", "5000", "--workers", "2", "--event-log", url,
           "--workdir", str(tmp_path / "fleet"), "--timeout", "200", "--json"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=260)
    res = json.loads(r.stdout.strip().splitlines()[-1]) if r.stdout.strip() else {}
    schema = re.search(r"search_path%3D(\w+)", res.get("config", {}).get("event_log", ""))
    if schema:
        with psycopg.connect(url, autocommit=True) as db:
            db.execute(f"DROP SCHEMA IF EXISTS {schema[1]} CASCADE".encode())
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert res["all_rounds_closed"] and res["lost"] == 0 and res["double_counted"] == 0
    assert res["updates_acked"] == res["updates_logged"] == res["n_clients_in_results"] >= 2 * 38
    assert res["vp_checksums_ok"] and res["messages_received"] > 0
    logs = {p.name: p.read_text() for p in (tmp_path / "fleet" / "logs").glob("coordinator*.log")}
    assert len(logs) == 2
    ingested = [int(m[1]) for t in logs.values() for m in re.finditer(r"worker w\d: (\d+) messages ingested", t)]
    assert len(ingested) == 2 and all(n > 0 for n in ingested), logs  # both workers took a share
