"""Prometheus metrics of one coordinator, served on /metrics (127.0.0.1 by default).

Own `CollectorRegistry` per coordinator (no global state: several coordinators can live in one test
process). When `token` is set every request needs `Authorization: Bearer <token>`; the config refuses a
non-loopback bind without one.

The HTTP server is bounded (issues 14 and 26, coordinator/httpserve.py): one intake thread reads every
request head without blocking, a fixed pool of worker threads serves complete requests, each request has a
total deadline (`timeout`, from accept to the last byte) and each peer a bounded number of connections.
300 idle connections cost `workers` + 1 threads (not 300), and slow-drip sockets never hold a worker: they
do not delay anyone else's /metrics. The token is never logged (`?token=` is redacted in request lines).
"""

from __future__ import annotations

import hmac
import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from coordinator.fleetview import FleetView, fleet_view
from coordinator.httpserve import PooledHTTPServer, PrefetchedHandler

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
        self.bytes_received = Counter(
            "meerkat_bytes_received", "payload bytes received (uplink), by topic kind", ["kind"], registry=r
        )
        self.bytes_sent = Counter(
            "meerkat_bytes_sent", "payload bytes published (downlink, once per publish), by topic kind", ["kind"], registry=r
        )
        self.eval_seconds = Histogram(
            "meerkat_eval_duration_seconds", "the coordinator's own evaluation (eval_data)", registry=r,
            buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 300),
        )  # fmt: skip
        self.current_round.set(-1)

    def watch_fleet(self, state_dir: Path, per_device: bool, event_log: str = "sqlite") -> None:
        """Also export the event log's fleet snapshot (devices, quality) on every scrape (`event_log`: the
        config key, so a PostgreSQL log is read where it is)."""
        self.registry.register(FleetCollector(state_dir, per_device, event_log))

    def bytes_totals(self) -> tuple[float, float]:
        """(bytes received, bytes sent) so far, all kinds."""
        up = sum(s.value for m in self.bytes_received.collect() for s in m.samples if s.name.endswith("_total"))
        down = sum(s.value for m in self.bytes_sent.collect() for s in m.samples if s.name.endswith("_total"))
        return up, down

    def render(self, names: list[str] | None = None) -> bytes:
        """The exposition text; `names` (the `name[]` query of a scrape): only those series."""
        return generate_latest(self.registry.restricted_registry(names) if names else self.registry)


# per-device gauges: (metric name, help, DeviceView attribute); each is one series per device
DEVICE_GAUGES: tuple[tuple[str, str, str], ...] = (
    ("meerkat_device_online", "1 while the device is online", "online"),
    ("meerkat_device_last_seen_timestamp_seconds", "unix time of the device's last message", "seen_at"),
    ("meerkat_device_cpu_percent", "CPU of the client process (100 = one core)", "cpu_pct"),
    ("meerkat_device_rss_bytes", "resident memory of the client process", "rss_bytes"),
    ("meerkat_device_peak_rss_bytes", "peak resident memory of the client process over the run (its high-water "
     "mark; a device before protocol 1.3: its largest RSS sample)", "peak_rss_bytes"),
    ("meerkat_device_gpu_memory_bytes", "GPU memory in use", "gpu_mem_bytes"),
    ("meerkat_device_memory_budget_bytes", "memory budget announced in the Join", "budget_bytes"),
    ("meerkat_device_peak_step_memory_bytes", "planned/measured peak memory of one SPSA step", "peak_mem_bytes"),
    ("meerkat_device_temperature_celsius", "hottest sensor", "temp_c"),
    ("meerkat_device_power_watts", "power draw", "power_w"),
    ("meerkat_device_step_seconds", "wall time of the last SPSA step", "step_time_s"),
    ("meerkat_device_train_loss", "training loss (Update.loss) of its newest update", "train_loss"),
    ("meerkat_device_eval_loss", "loss on its held-out slice, newest evaluation", "eval_loss"),
    ("meerkat_device_eval_accuracy", "accuracy on its held-out slice, newest evaluation", "eval_acc"),
    ("meerkat_device_gradip", "mean |GradIP| of its newest update (MEERKAT-VP)", "gradip"),
    ("meerkat_device_vp_limited", "1 when MEERKAT-VP limited it to 1 local step", "limited"),
    ("meerkat_device_dp_epsilon", "differential privacy epsilon the device has spent (DP fleets)", "dp_epsilon"),
    ("meerkat_device_dp_exhausted", "1 when its privacy budget stopped it from training", "dp_exhausted"),
    ("meerkat_device_available", "1 when its device policy lets it train now, 0 when paused or offline", "available"),
    ("meerkat_device_trained_share", "share of wall time its client spent in local steps since it started", "trained_share"),
)


class FleetCollector(Collector):
    """Reads the event log (read-only, one connection per scrape) and yields device + quality gauges."""

    def __init__(self, state_dir: Path, per_device: bool, event_log: str = "sqlite") -> None:
        self.state_dir = state_dir
        self.per_device = per_device
        self.event_log = event_log

    def describe(self) -> Iterator[GaugeMetricFamily]:
        """The names it yields, without reading the log: a `?name[]=` scrape that asks for none of them
        (the fleet bench polls two counters 5 times a second) then skips the snapshot, which reads every
        client (~0.3 s of CPU at 3,000 devices)."""
        for name in FLEET_NAMES:
            yield GaugeMetricFamily(name, "")

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            view = fleet_view(self.state_dir, time.time(), event_log=self.event_log)
        except Exception:  # a scrape must never break /metrics; the counters above still answer
            log.debug("metrics: fleet snapshot failed", exc_info=True)
            return
        yield from fleet_families(view, self.per_device)


def fleet_families(view: FleetView, per_device: bool) -> Iterator[GaugeMetricFamily]:
    if per_device:
        for name, doc, attr in DEVICE_GAUGES:
            g = GaugeMetricFamily(name, doc, labels=["device"])
            for d in view.devices:
                v: Any = getattr(d, attr)
                if v is not None:
                    g.add_metric([d.client], float(v))
            yield g
        p = GaugeMetricFamily("meerkat_device_paused", "1 while its device policy pauses it, by reason",
                              labels=["device", "reason"])
        for d in view.devices:
            if d.available is False and d.pause_reason not in (None, "offline"):
                p.add_metric([d.client, str(d.pause_reason)], 1.0)
        yield p
    yield GaugeMetricFamily("meerkat_devices_available", "devices online and not paused by their policy, now",
                            value=view.available_now())  # fmt: skip
    q = GaugeMetricFamily("meerkat_eval_loss", "newest fleet evaluation loss, by source", labels=["source"])
    a = GaugeMetricFamily("meerkat_eval_accuracy", "newest fleet evaluation accuracy, by source", labels=["source"])
    er = GaugeMetricFamily("meerkat_eval_round", "round of the newest evaluation, by source", labels=["source"])
    for source, curve in (("devices", view.device_evals), ("coordinator", view.coordinator_evals)):
        if curve:
            q.add_metric([source], curve[-1].loss)
            er.add_metric([source], curve[-1].round)
            if curve[-1].accuracy is not None:
                a.add_metric([source], curve[-1].accuracy)
    yield from (q, a, er)
    losses = [r for r in view.rounds if r.train_loss is not None]
    t = GaugeMetricFamily("meerkat_train_loss", "n_samples-weighted mean Update.loss of the last closed round")
    if losses:
        t.add_metric([], losses[-1].train_loss or 0.0)
    yield t
    rpm = view.rounds_per_minute()
    g = GaugeMetricFamily("meerkat_rounds_per_minute", "closed rounds per minute over the last 10 minutes")
    if rpm is not None:
        g.add_metric([], rpm)
    yield g
    yield GaugeMetricFamily("meerkat_devices_known", "devices in the registry (per-device series: one each)",
                            value=len(view.devices))  # fmt: skip


FLEET_NAMES: tuple[str, ...] = tuple(name for name, _, _ in DEVICE_GAUGES) + (
    "meerkat_eval_loss", "meerkat_eval_accuracy", "meerkat_eval_round", "meerkat_train_loss",
    "meerkat_rounds_per_minute", "meerkat_devices_known", "meerkat_device_paused", "meerkat_devices_available",
)  # every family fleet_families() may yield  # fmt: skip
PAGES = {"/", "/dashboard", "/dashboard.json"}  # served when the coordinator's `dashboard` is on
WORKERS = 4  # threads serving /metrics requests
TIMEOUT_S = 5.0  # the whole request, from accept to its last byte written (coordinator/httpserve.py)


class MetricsServer:
    """A tiny HTTP server for /metrics: one intake thread plus a fixed pool of `workers` threads."""

    def __init__(
        self,
        metrics: Metrics,
        host: str,
        port: int,
        token: str = "",
        *,
        workers: int = WORKERS,
        timeout: float = TIMEOUT_S,
        pages: Callable[[str], tuple[bytes, str]] | None = None,
    ) -> None:
        """`pages(path) -> (body, content type)` serves the dashboard (PAGES) beside /metrics; `timeout`: the
        deadline of one request, in total. Raises PortInUse when host:port is taken."""
        self.metrics = metrics
        token_b = token.encode()
        routes = {"/metrics"} | (PAGES if pages is not None else set())

        class Handler(PrefetchedHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server API)
                path, _, query = self.path.partition("?")
                if path not in routes:
                    self.send_error(404, "only " + " ".join(sorted(routes)) + " here")
                    return
                if token_b:  # a browser cannot set a header: the dashboard also takes ?token=
                    got = self.headers.get("Authorization", "").encode()
                    q = parse_qs(query).get("token", [""])[0].encode()
                    if not (hmac.compare_digest(got, b"Bearer " + token_b) or hmac.compare_digest(q, token_b)):
                        self.send_error(401, "bearer token required")
                        return
                if path == "/metrics":  # ?name[]=a&name[]=b: only those series (as prometheus_client's own app)
                    body, ctype = metrics.render(parse_qs(query).get("name[]")), CONTENT_TYPE_LATEST
                else:
                    assert pages is not None
                    try:
                        body, ctype = pages(path)
                    except Exception:
                        log.exception("dashboard: rendering %s failed", path)
                        self.send_error(500, "dashboard rendering failed (see the coordinator log)")
                        return
                self.send_response(200)
                self.send_header("Content-Type", ctype)
                self.send_header("Cache-Control", "no-store")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self._routes = routes
        self.server = PooledHTTPServer((host, port), Handler, workers=workers, deadline=timeout)
        self.port = int(self.server.server_address[1])
        self._thread = threading.Thread(target=self.server.serve_forever, name="metrics-http", daemon=True)

    def start(self) -> None:
        self._thread.start()
        host = self.server.server_address[0]
        log.info("metrics on http://%s:%d/metrics", host, self.port)
        if PAGES & self._routes:
            log.info("dashboard on http://%s:%d/", host, self.port)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
