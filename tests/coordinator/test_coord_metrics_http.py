"""The /metrics HTTP server under idle-connection abuse (issue 14, item 7), with real sockets.

300 idle connections must not make 300 threads (a fixed pool serves them), and once the socket timeout
has cut the idle ones off, /metrics answers again. ~3 s.
"""

from __future__ import annotations

import socket
import threading
import time
import urllib.error
import urllib.request

import pytest

from coordinator.metrics import Metrics, MetricsServer

N_IDLE = 300
TIMEOUT_S = 0.5
WORKERS = 4


def _get(port: int, token: str = "") -> tuple[int, bytes]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/metrics")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, b""


def test_idle_connections_cost_a_fixed_pool_and_metrics_recover() -> None:
    metrics = Metrics()
    metrics.rounds_closed.inc(3)
    base = threading.active_count()
    server = MetricsServer(metrics, "127.0.0.1", 0, token="t0k", workers=WORKERS, timeout=TIMEOUT_S)
    server.start()
    idle: list[socket.socket] = []
    try:
        assert _get(server.port, "t0k")[0] == 200
        for _ in range(N_IDLE):
            s = socket.create_connection(("127.0.0.1", server.port), timeout=5)
            s.sendall(b"GET /metr")  # a request that never ends
            idle.append(s)
        peak = threading.active_count()
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            peak = max(peak, threading.active_count())
            time.sleep(0.02)
        assert peak <= base + 1 + WORKERS, f"{peak - base} threads for {N_IDLE} idle connections"
        # every idle connection is closed by the server: refused at once, or cut off by the timeout
        for s in idle:  # EOF, or an HTTP 408/400 reply and then EOF: nothing stays open
            s.settimeout(10)
            while s.recv(4096):
                pass
        assert server.server.refused > N_IDLE // 2  # most never reached a worker: closed at accept
        status, body = _get(server.port, "t0k")
        assert status == 200 and b"meerkat_rounds_closed_total 3.0" in body
        assert _get(server.port)[0] == 401
    finally:
        for s in idle:
            s.close()
        server.stop()
    time.sleep(0.1)
    assert threading.active_count() <= base


@pytest.mark.parametrize("workers", [1, 2])
def test_a_trickling_client_is_cut_off_by_the_timeout(workers: int) -> None:
    server = MetricsServer(Metrics(), "127.0.0.1", 0, workers=workers, timeout=TIMEOUT_S)
    server.start()
    try:
        hogs = [socket.create_connection(("127.0.0.1", server.port), timeout=5) for _ in range(workers)]
        t0 = time.monotonic()
        status, _ = _get(server.port)  # waits for a worker: the hogs are dropped after TIMEOUT_S
        assert status == 200
        assert TIMEOUT_S * 0.8 <= time.monotonic() - t0 < TIMEOUT_S * 6
        for h in hogs:
            h.close()
    finally:
        server.stop()
