"""Prometheus metrics of one coordinator, served on /metrics (127.0.0.1 by default).

Own `CollectorRegistry` per coordinator (no global state: several coordinators can live in one test
process). When `token` is set every request needs `Authorization: Bearer <token>`; the config refuses a
non-loopback bind without one.
"""

from __future__ import annotations

import hmac
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

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
        self.drift_limited = Counter(
            "meerkat_drift_limited", "clients MEERKAT-VP limited to 1 local step (decisions)", registry=r
        )
        self.clients_limited = Gauge(
            "meerkat_clients_limited", "clients currently limited to 1 local step by MEERKAT-VP", registry=r
        )
        self.current_round.set(-1)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsServer:
    """A tiny HTTP server for /metrics in a daemon thread."""

    def __init__(self, metrics: Metrics, host: str, port: int, token: str = "") -> None:
        self.metrics = metrics
        token_b = token.encode()

        class Handler(BaseHTTPRequestHandler):
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

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        self.port = int(self.server.server_address[1])
        self._thread = threading.Thread(target=self.server.serve_forever, name="metrics-http", daemon=True)

    def start(self) -> None:
        self._thread.start()
        log.info("metrics on http://%s:%d/metrics", self.server.server_address[0], self.port)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
