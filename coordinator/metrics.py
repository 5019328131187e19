"""Prometheus metrics of one coordinator, served on /metrics (127.0.0.1 by default).

Own `CollectorRegistry` per coordinator (no global state: several coordinators can live in one test
process). When `token` is set every request needs `Authorization: Bearer <token>`; the config refuses a
non-loopback bind without one.

The HTTP server is bounded (issue 14): a fixed pool of worker threads serves accepted connections from a
short queue, every socket read/write times out, and a connection that finds the queue full is closed at
once. 300 idle connections therefore cost `workers` threads (not 300), and /metrics answers again at
most ~`timeout` x (queue / workers + 1) seconds after they stop being served.
"""

from __future__ import annotations

import hmac
import logging
import queue
import socket
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

log = logging.getLogger(__name__)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.rounds_closed = Counter("meerkat_rounds_closed", "rounds closed", registry=r)
        self.current_round = Gauge("meerkat_round", "last closed round (-1 = none)", registry=r)
        self.round_open = Gauge("meerkat_round_open", "1 while a round is open", registry=r)
        self.updates_accepted = Counter(
            "meerkat_updates_accepted", "updates committed to the log", ["kind"], registry=r
        )
        self.rejected = Counter(
            "meerkat_messages_rejected", "messages rejected, by reason", ["reason"], registry=r
        )
        self.duplicates = Counter(
            "meerkat_updates_duplicate", "re-sent updates (same msg_id) acked and ignored", registry=r
        )
        self.clients_online = Gauge("meerkat_clients_online", "joined clients currently online", registry=r)
        self.round_duration = Histogram(
            "meerkat_round_duration_seconds", "open -> close of a round", registry=r,
            buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800),
        )  # fmt: skip
        self.messages = Counter(
            "meerkat_messages_received", "messages received, by topic kind", ["kind"], registry=r
        )
        self.dropped = Counter(
            "meerkat_messages_dropped",
            "client messages dropped unread or unanswered (rate_limited, retained, reply_budget, ...)",
            ["reason"],
            registry=r,
        )
        self.drift_limited = Counter(
            "meerkat_drift_limited", "clients MEERKAT-VP limited to 1 local step (decisions)", registry=r
        )
        self.clients_limited = Gauge(
            "meerkat_clients_limited", "clients currently limited to 1 local step by MEERKAT-VP", registry=r
        )
        self.current_round.set(-1)

    def render(self) -> bytes:
        return generate_latest(self.registry)


WORKERS = 4  # threads serving /metrics requests
TIMEOUT_S = 5.0  # per socket read/write of one connection


class PooledHTTPServer(HTTPServer):
    """HTTPServer whose accepted connections are served by `workers` fixed threads from a bounded queue.

    http.server's ThreadingHTTPServer starts one thread per connection, unbounded: idle connections
    alone could exhaust the coordinator's threads and memory.
    """

    request_queue_size = 128  # listen() backlog: accept fast and refuse here, not by SYN retransmits

    def __init__(
        self, addr: tuple[str, int], handler: type[BaseHTTPRequestHandler], workers: int, backlog: int
    ) -> None:
        super().__init__(addr, handler)
        self.refused = 0  # connections closed because every worker and queue slot was taken
        self._jobs: queue.Queue[tuple[socket.socket, object] | None] = queue.Queue(maxsize=backlog)
        self._workers = [
            threading.Thread(target=self._work, name=f"metrics-http-{i}", daemon=True) for i in range(workers)
        ]
        for t in self._workers:
            t.start()

    def process_request(self, request: socket.socket, client_address: object) -> None:  # type: ignore[override]
        try:
            self._jobs.put_nowait((request, client_address))
        except queue.Full:
            self.refused += 1
            log.debug("metrics http: all %d workers busy, closing a connection", len(self._workers))
            self.shutdown_request(request)

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            request, client_address = job
            try:
                self.finish_request(request, client_address)
            except Exception:  # a client's broken connection must not kill the worker
                log.debug("metrics http: request from %s failed", client_address, exc_info=True)
            finally:
                self.shutdown_request(request)

    def server_close(self) -> None:
        super().server_close()
        while True:  # close what is still queued, then stop every worker
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                self.shutdown_request(job[0])
        for _ in self._workers:
            self._jobs.put(None)
        for t in self._workers:
            t.join(timeout=TIMEOUT_S + 1)


class MetricsServer:
    """A tiny HTTP server for /metrics: one accept thread plus a fixed pool of `workers` threads."""

    def __init__(
        self,
        metrics: Metrics,
        host: str,
        port: int,
        token: str = "",
        *,
        workers: int = WORKERS,
        timeout: float = TIMEOUT_S,
    ) -> None:
        self.metrics = metrics
        token_b = token.encode()

        sock_timeout = timeout

        class Handler(BaseHTTPRequestHandler):
            timeout = sock_timeout  # set on the socket by StreamRequestHandler: every read/write is bounded

            def do_GET(self) -> None:  # noqa: N802 (http.server API)
                if self.path.split("?")[0] != "/metrics":
                    self.send_error(404, "only /metrics here")
                    return
                if token_b:
                    got = self.headers.get("Authorization", "").encode()
                    if not hmac.compare_digest(got, b"Bearer " + token_b):
                        self.send_error(401, "bearer token required")
                        return
                body = metrics.render()
                self.send_response(200)
                self.send_header("Content-Type", CONTENT_TYPE_LATEST)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                log.debug("metrics http: " + format, *args)

        self.server = PooledHTTPServer((host, port), Handler, workers=workers, backlog=2 * workers)
        self.port = int(self.server.server_address[1])
        self._thread = threading.Thread(target=self.server.serve_forever, name="metrics-http", daemon=True)

    def start(self) -> None:
        self._thread.start()
        log.info("metrics on http://%s:%d/metrics", self.server.server_address[0], self.port)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
