"""The live dashboard: server-rendered HTML + inline SVG, no script, nothing fetched (no CDN).

Served by the metrics server (`coordinator/metrics.py`, same bind, same token, same bounded worker
pool) on `/` (HTML, reloads itself every 5 s) and `/dashboard.json` (the same data). It reads the fleet
through `coordinator.fleetview.fleet_view` (EventLog methods on a read-only connection): the whole run
the log keeps (evaluations are never pruned; training loss, durations and GradIP follow `retain_rounds`),
each curve thinned to at most MAX_POINTS points so a 100,000-round run draws as fast as a short one, and
the first evaluation (round -1 = v_0 when the coordinator has eval_data) drawn as a dashed baseline.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from html import escape
from pathlib import Path

from coordinator.fleetview import DeviceView, FleetView, fleet_view, quality_trend

REFRESH_S = 5
MAX_POINTS = 400  # per curve: a chart is ~500 px wide, more points draw nothing new
PALETTE = ("#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#ca8a04", "#db2777")

CSS = """
body{font:14px/1.4 system-ui,-apple-system,'Segoe UI',sans-serif;margin:0;background:#f4f5f7;color:#1f2937}
header{background:#111827;color:#f9fafb;padding:12px 20px;display:flex;gap:18px;align-items:baseline;flex-wrap:wrap}
header h1{font-size:16px;margin:0 6px 0 0}
header .muted{margin-left:auto}
.kpi{color:#d1d5db;font-size:13px}.kpi b{font-size:15px;margin-left:5px;color:#fff}
main{padding:14px 20px;display:grid;grid-template-columns:1fr 1fr;gap:14px}
section{background:#fff;border-radius:8px;padding:10px 14px;box-shadow:0 1px 2px rgba(0,0,0,.08)}
section.wide{grid-column:1 / span 2}
h2{font-size:14px;margin:2px 0 8px;color:#374151}
table{border-collapse:collapse;width:100%}
th,td{padding:4px 8px;text-align:right;border-bottom:1px solid #e5e7eb;white-space:nowrap}
th:first-child,td:first-child{text-align:left}
th{font-weight:600;color:#6b7280;font-size:12px}
.dot{display:inline-block;width:9px;height:9px;border-radius:50%;margin-right:6px}
.on{background:#16a34a}.off{background:#9ca3af}
.bar{display:inline-block;width:90px;height:9px;background:#e5e7eb;border-radius:4px;vertical-align:middle;margin-right:6px}
.bar i{display:block;height:100%;border-radius:4px;background:#2563eb}
.bar i.hot{background:#dc2626}
.flag{color:#b45309;font-weight:600}
svg text{font:11px system-ui,sans-serif;fill:#4b5563}
.muted{color:#9ca3af}
"""


def _f(v: float | None, fmt: str = "{:.3f}", none: str = "–") -> str:
    return none if v is None else fmt.format(v)


def _bytes(n: float | None) -> str:
    if n is None:
        return "–"
    for unit, k in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= k:
            return f"{n / k:.1f} {unit}"
    return f"{n:.0f} B"


def _ago(now: float, ts: float | None) -> str:
    if ts is None:
        return "–"
    s = max(0.0, now - ts)
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.0f} min"


def thin(points: Sequence[tuple[float, float]], n: int = MAX_POINTS) -> list[tuple[float, float]]:
    """At most `n` points, evenly spaced by index, the first and the last always kept."""
    if len(points) <= n:
        return list(points)
    step = (len(points) - 1) / (n - 1)
    return [points[round(i * step)] for i in range(n)]


def _nice_step(span: float, ticks: int = 6) -> int:
    """A whole-round tick step of 1, 2 or 5 times a power of ten giving about `ticks` ticks."""
    raw = max(1.0, span / ticks)
    mag = 10 ** math.floor(math.log10(raw))
    return int(next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw))


def line_chart(
    title: str, series: Sequence[tuple[str, Sequence[tuple[float, float]]]], *, width: int = 560, height: int = 220,
    y_fmt: str = "{:.3g}", x_label: str = "round", colors: Sequence[str] = PALETTE,
    hlines: Sequence[tuple[str, float]] = (),
) -> str:  # fmt: skip
    """An SVG line chart: one `<polyline class="curve">` per series (thinned to MAX_POINTS), axes, ticks, a
    legend, and `hlines` (label, y) as dashed `<line class="baseline">` (inside the y range)."""
    series = [(name, thin(s)) for name, s in series]
    pts = [p for _, s in series for p in s]
    if not pts:
        return f'<svg class="chart empty" width="{width}" height="60"><text x="10" y="30">{escape(title)}: no data yet</text></svg>'
    left, right, top, bottom = 52, 12, 10, 34
    xs, ys = [p[0] for p in pts], [p[1] for p in pts] + [y for _, y in hlines]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    pad = (y1 - y0) * 0.08 or abs(y1) * 0.05 or 1.0
    y0, y1 = (max(0.0, y0 - pad) if y0 >= 0 else y0 - pad), y1 + pad  # no negative axis for non-negative data
    w, h = width - left - right, height - top - bottom

    def px(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * w

    def py(y: float) -> float:
        return top + (1 - (y - y0) / (y1 - y0)) * h

    out = [f'<svg class="chart" width="{width}" height="{height}" role="img" aria-label="{escape(title)}">']
    for i in range(5):  # horizontal grid + y ticks
        yv = y0 + (y1 - y0) * i / 4
        out.append(f'<line x1="{left}" x2="{width - right}" y1="{py(yv):.1f}" y2="{py(yv):.1f}" stroke="#eef0f3"/>')
        out.append(f'<text x="{left - 6}" y="{py(yv) + 4:.1f}" text-anchor="end">{escape(y_fmt.format(yv))}</text>')
    step = _nice_step(x1 - x0)  # whole rounds on the x axis: 1, 2, 5, 10, 20, 50 ...
    for xv in range(math.ceil(x0 / step) * step, math.floor(x1) + 1, step):
        out.append(f'<text x="{px(xv):.1f}" y="{height - bottom + 14}" text-anchor="middle">{xv}</text>')
    out.append(f'<text x="{left + w / 2:.0f}" y="{height - 4}" text-anchor="middle">{escape(x_label)}</text>')
    out.append(f'<line x1="{left}" x2="{left}" y1="{top}" y2="{top + h}" stroke="#9ca3af"/>')
    out.append(f'<line x1="{left}" x2="{width - right}" y1="{top + h}" y2="{top + h}" stroke="#9ca3af"/>')
    for name, yv in hlines:
        out.append(f'<line class="baseline" data-label="{escape(name)}" x1="{left}" x2="{width - right}" '
                   f'y1="{py(yv):.1f}" y2="{py(yv):.1f}" stroke="#6b7280" stroke-dasharray="5,4"/>')
        out.append(f'<text x="{width - right - 4}" y="{py(yv) - 4:.1f}" text-anchor="end">{escape(name)}</text>')
    lx = left + 8
    for i, (name, s) in enumerate(series):
        if not s:
            continue
        color = colors[i % len(colors)]
        coords = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in s)
        out.append(f'<polyline class="curve" data-series="{escape(name)}" fill="none" stroke="{color}" '
                   f'stroke-width="2" points="{coords}"/>')  # fmt: skip
        if len(s) <= 60:
            out += [f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="2.5" fill="{color}"/>' for x, y in s]
        out.append(f'<rect x="{lx}" y="{top + 4}" width="10" height="10" fill="{color}"/>')
        out.append(f'<text x="{lx + 14}" y="{top + 13}">{escape(name)}</text>')
        lx += 22 + 7 * len(name)
    out.append("</svg>")
    return "".join(out)


def _mem_cell(d: DeviceView) -> str:
    """What memory_budget_gib bounds, against it: the process's peak RSS on a CPU device (its high-water mark,
    Heartbeat key 19; a device before 1.3: its largest RSS sample, marked `~`), GPU memory on a CUDA one, with
    the SPSA step's own share (planned tensors) beside it."""
    gpu = d.device == "cuda" and bool(d.gpu_mem_bytes)
    used = d.gpu_mem_bytes if gpu else d.peak_rss_bytes
    what = "GPU memory" if gpu else "peak RSS of the process" if d.peak_rss_measured else "largest RSS sample"
    approx = "" if gpu or d.peak_rss_measured or used is None else "~"
    step = f' <span class="muted">step {_bytes(d.peak_mem_bytes)}</span>' if d.peak_mem_bytes else ""
    if used is None or not d.budget_bytes:
        return f'<span class="mem" title="{what}">{approx}{_bytes(used)} / {_bytes(d.budget_bytes)}</span>{step}'
    share = used / d.budget_bytes
    hot = ' class="hot"' if share > 0.9 else ""
    return (f'<span class="bar" title="{what}: {share:.0%} of budget"><i{hot} style="width:{min(share, 1) * 100:.0f}%"></i></span>'
            f'<span class="mem" title="{what}">{approx}{_bytes(used)} / {_bytes(d.budget_bytes)}</span>{step}')  # fmt: skip


def _device_rows(view: FleetView) -> str:
    rows = []
    for d in view.devices:
        online = '<span class="dot on"></span>online' if d.online else '<span class="dot off"></span>offline'
        vp = '<span class="flag">1 step</span>' if d.limited else "–"
        avail = ("–" if d.available is None else "yes" if d.available
                 else f'<span class="flag">paused: {escape(d.pause_reason or "?")}</span>')  # fmt: skip
        rows.append(
            f'<tr class="device" data-device="{escape(d.client)}"><td>{escape(d.client)}</td><td>{online}</td>'
            f"<td class=\"available\">{avail}</td><td>{_f(d.trained_share, '{:.0%}')}</td>"
            f"<td>{_ago(view.now, d.seen_at)}</td><td>{escape(d.device or '–')}</td><td>{_mem_cell(d)}</td>"
            f"<td>{_bytes(d.rss_bytes)}</td><td>{_f(d.cpu_pct, '{:.0f}%')}</td><td>{_f(d.temp_c, '{:.0f} °C')}</td>"
            f"<td>{_f(d.step_time_s, '{:.2f} s')}</td><td>{d.updates}</td><td class=\"train-loss\">{_f(d.train_loss, '{:.4f}')}</td>"
            f"<td class=\"eval-loss\">{_f(d.eval_loss, '{:.4f}')}</td><td>{_f(d.eval_acc, '{:.1%}')}</td>"
            f"<td>{_f(d.gradip, '{:.3g}')}</td><td>{vp}</td><td>{_f(d.dp_epsilon, '{:.3g}')}"
            f"{' (spent)' if d.dp_exhausted else ''}</td></tr>"
        )
    if not rows:
        rows.append('<tr><td colspan="18" class="muted">no device has joined yet</td></tr>')
    hdr = ("device", "status", "available", "trained", "last seen", "kind", "peak memory / budget (step)", "RSS", "CPU", "temp", "step time",
           "updates", "train loss", "eval loss", "eval acc", "GradIP", "VP", "DP ε")  # fmt: skip
    return (f'<table id="fleet"><thead><tr>{"".join(f"<th>{h}</th>" for h in hdr)}</tr></thead>'
            f"<tbody>{''.join(rows)}</tbody></table>")  # fmt: skip


def render_html(view: FleetView, bytes_up: float | None = None, bytes_down: float | None = None) -> str:
    trend = quality_trend(view)
    rpm = trend["rounds_per_minute"]
    online = sum(1 for d in view.devices if d.online and d.state == "joined")
    last_eval = view.coordinator_evals[-1] if view.coordinator_evals else (view.device_evals[-1] if view.device_evals else None)
    kpis = [
        ("run", f'<span id="run-state">{escape(view.run_state)}</span>'),
        ("round", str(view.last_round)), ("devices online", f"{online}/{len(view.devices)}"),
        ("available now", str(view.available_now())),
        ("rounds/min", _f(rpm, "{:.1f}")), ("eval loss", '<span id="eval-loss">' + _f(None if last_eval is None else last_eval.loss, "{:.4f}") + "</span>"),
        ("bytes up", _bytes(bytes_up)), ("bytes down", _bytes(bytes_down)),
    ]  # fmt: skip
    loss_series = [
        ("train (updates)", [(r.round, r.train_loss) for r in view.rounds if r.train_loss is not None]),
        ("eval, devices", [(p.round, p.loss) for p in view.device_evals]),
        ("eval, coordinator", [(p.round, p.loss) for p in view.coordinator_evals]),
    ]
    acc_series = [
        ("eval acc, devices", [(p.round, p.accuracy) for p in view.device_evals if p.accuracy is not None]),
        ("eval acc, coordinator", [(p.round, p.accuracy) for p in view.coordinator_evals if p.accuracy is not None]),
    ]
    gradip_series = [(c, [(float(r), v) for r, v in pts]) for c, pts in sorted(view.gradip.items())]
    dur_series = [("round duration", [(float(r.round), r.duration_s) for r in view.rounds])]
    base = view.coordinator_evals[0] if view.coordinator_evals else (view.device_evals[0] if view.device_evals else None)
    loss_base = [] if base is None else [(f"baseline {base.loss:.4g} (round {base.round})", base.loss)]
    acc_base = [] if base is None or base.accuracy is None else [(f"baseline {base.accuracy:.1%} (round {base.round})", base.accuracy)]
    rss_series = [(c, [(float(p.round), p.rss_bytes / 2**20) for p in pts if p.rss_bytes]) for c, pts in sorted(view.resources.items())]
    cpu_series = [(c, [(float(p.round), p.cpu_pct) for p in pts if p.cpu_pct is not None]) for c, pts in sorted(view.resources.items())]
    budgets = sorted({d.budget_bytes for d in view.devices if d.budget_bytes and d.device != "cuda"})
    budget_lines = [(f"budget {b / 2**30:.1f} GiB", b / 2**20) for b in budgets]
    head = (f'<meta charset="utf-8"><meta http-equiv="refresh" content="{REFRESH_S}">'
            f"<title>meerkat {escape(view.fleet)}: round {view.last_round}</title><style>{CSS}</style>")  # fmt: skip
    kpi_html = "".join(f'<span class="kpi">{k}<b>{v}</b></span>' for k, v in kpis)
    stamp = time.strftime("%H:%M:%S", time.localtime(view.now))
    return (
        f"<!doctype html><html><head>{head}</head><body>"
        f'<header><h1>meerkat · {escape(view.fleet)}</h1>{kpi_html}<span class="muted">updated {stamp}</span></header><main>'
        f'<section class="wide"><h2>Fleet</h2>{_device_rows(view)}</section>'
        f'<section id="loss"><h2>Loss (whole run)</h2>{line_chart("loss", loss_series, hlines=loss_base)}</section>'
        f'<section id="accuracy"><h2>Accuracy (whole run)</h2>'
        f'{line_chart("accuracy", acc_series, y_fmt="{:.0%}", colors=PALETTE[1:], hlines=acc_base)}</section>'
        f'<section id="memory"><h2>Memory per device (RSS, MiB)</h2>'
        f'{line_chart("memory", rss_series, y_fmt="{:.0f}", hlines=budget_lines)}</section>'
        f'<section id="cpu"><h2>CPU per device (%)</h2>{line_chart("cpu", cpu_series, y_fmt="{:.0f}")}</section>'
        f'<section id="gradip"><h2>GradIP per device (mean |g·c|, MEERKAT-VP)</h2>{line_chart("gradip", gradip_series)}</section>'
        f'<section id="rounds"><h2>Round duration (s)</h2>{line_chart("round duration", dur_series)}</section>'
        "</main></body></html>"
    )


def render_json(view: FleetView, bytes_up: float | None = None, bytes_down: float | None = None) -> str:
    return json.dumps({
        "fleet": view.fleet, "now": view.now, "last_round": view.last_round, "run_state": view.run_state, "devices_available": view.available_now(),
        "devices": [asdict(d) for d in view.devices], "rounds": [asdict(r) for r in view.rounds],
        "device_evals": [asdict(p) for p in view.device_evals],
        "coordinator_evals": [asdict(p) for p in view.coordinator_evals],
        "gradip": view.gradip, "trend": quality_trend(view), "bytes_up": bytes_up, "bytes_down": bytes_down,
        "resources": {c: [asdict(p) for p in pts] for c, pts in view.resources.items()},
    })  # fmt: skip


def pages(
    state_dir: Path, totals: Callable[[], tuple[float, float]] | None = None, event_log: str = "sqlite"
) -> Callable[[str], tuple[bytes, str]]:
    """The metrics server's page callback: path -> (body, content type); `event_log` as the config key."""

    def serve(path: str) -> tuple[bytes, str]:
        view = fleet_view(state_dir, time.time(), last=None, event_log=event_log, history=True)  # the whole run
        up, down = totals() if totals is not None else (None, None)
        if path == "/dashboard.json":
            return render_json(view, up, down).encode(), "application/json"
        return render_html(view, up, down).encode(), "text/html; charset=utf-8"

    return serve
