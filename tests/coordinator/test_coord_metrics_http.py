"""The /metrics HTTP server under connection abuse (issue 14 item 7, issue 26), with real sockets.

300 idle connections must not make 300 threads (a fixed pool serves them); slow-drip sockets must not
delay anyone's /metrics (12 of them at the default deadline: answers within 2 s) and are cut off at the
total deadline however fast they drip; one peer's connections are bounded; the token is never logged;
a busy port is named. ~15 s.
"""

from __future__ import annotations

import errno
import logging
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest

from coordinator.httpserve import PER_PEER, PortInUse
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


def _wait_closed(s: socket.socket, within: float) -> bytes:
    """What the server sent before it closed `s` (fails the test when it is still open after `within` s)."""
    s.settimeout(within)
    got = b""
    try:
        while chunk := s.recv(4096):
            got += chunk
    except ConnectionResetError:
        pass
    return got


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
        for s in idle:  # EOF or a reset, or an HTTP 408 reply and then EOF: nothing stays open
            _wait_closed(s, 10)
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


def _drip(socks: list[socket.socket], stop: threading.Event) -> None:
    """One byte of an endless header on every socket every 0.2 s (a slow-drip attack)."""
    while not stop.wait(0.2):
        for s in socks:
            try:
                s.sendall(b"x")
            except OSError:
                pass


def test_slow_drip_sockets_do_not_starve_metrics_and_are_cut_off_at_the_deadline() -> None:
    server = MetricsServer(Metrics(), "127.0.0.1", 0, token="t0k")  # the defaults: 4 workers, 5 s deadline
    server.start()
    drippers = [socket.create_connection(("127.0.0.1", server.port), timeout=5) for _ in range(12)]
    for s in drippers:
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Slow: ")
    stop = threading.Event()
    t = threading.Thread(target=_drip, args=(drippers, stop), daemon=True)
    t.start()
    try:
        t_open = time.monotonic()
        worst = 0.0
        while time.monotonic() - t_open < 3.0:  # while all 12 are open and dripping
            t0 = time.monotonic()
            status, body = _get(server.port, "t0k")
            worst = max(worst, time.monotonic() - t0)
            assert status == 200 and b"meerkat_rounds_closed_total" in body
            time.sleep(0.2)
        assert worst < 2.0, f"/metrics took {worst:.2f} s with 12 slow-drip sockets open"
        # still dripping, yet each is closed at the 5 s total deadline (a per-read timeout never would)
        for s in drippers:
            assert _wait_closed(s, 5.0 + 3.0 - (time.monotonic() - t_open)).startswith(b"HTTP/1.0 408")
        assert time.monotonic() - t_open < 5.0 + 3.0
        assert server.server.timed_out == 12
    finally:
        stop.set()
        t.join()
        for s in drippers:
            s.close()
        server.stop()


def test_one_peer_cannot_take_every_connection() -> None:
    server = MetricsServer(Metrics(), "127.0.0.1", 0, timeout=TIMEOUT_S * 10)
    server.start()
    greedy: list[socket.socket] = []
    try:
        for _ in range(PER_PEER + 10):  # from another loopback address: a peer of its own
            s = socket.socket()
            s.bind(("127.0.0.2", 0))
            s.connect(("127.0.0.1", server.port))
            greedy.append(s)
        for s in greedy[PER_PEER:]:  # the ones over the bound are closed at once, without a reply
            assert _wait_closed(s, 2.0) == b""
        assert server.server.refused == 10
        t0 = time.monotonic()
        assert _get(server.port)[0] == 200  # another peer is served at once
        assert time.monotonic() - t0 < 1.0
    finally:
        for s in greedy:
            s.close()
        server.stop()


def test_the_token_is_never_logged(caplog: pytest.LogCaptureFixture) -> None:
    secret = "s3cr3t-t0ken"
    server = MetricsServer(Metrics(), "127.0.0.1", 0, token=secret, pages=lambda path: (b"<html/>", "text/html"))
    server.start()
    caplog.set_level(logging.DEBUG)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/?token={secret}", timeout=5) as resp:
            assert resp.status == 200  # the dashboard: a browser passes the token in the query
        assert _get(server.port, secret)[0] == 200
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:  # a malformed request line
            s.sendall(f"GET /?token={secret}&x=1 HTTP/1.0 junk\r\n\r\n".encode())
            assert b"400" in _wait_closed(s, 5.0)
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:  # a wrong token
            s.sendall(f"GET /metrics?TOKEN={secret}x HTTP/1.0\r\n\r\n".encode())
            assert b" 401 " in _wait_closed(s, 5.0)
    finally:
        server.stop()
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("coordinator.")]
    assert any("GET /?token=<redacted>" in m for m in lines), lines  # the request lines are logged ...
    assert not any(secret in m for m in lines), lines  # ... without the token


def test_a_busy_port_is_named_not_an_attribute_error() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(PortInUse) as exc:
            MetricsServer(Metrics(), "127.0.0.1", port)
    msg = str(exc.value)
    assert f"metrics_port {port} on 127.0.0.1 is already in use" in msg and "metrics_port to a free port" in msg
    assert isinstance(exc.value.__cause__, OSError) and exc.value.__cause__.errno == errno.EADDRINUSE
