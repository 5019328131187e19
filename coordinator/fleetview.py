"""One read-only snapshot of the fleet for /metrics, the dashboard and `meerkat status`'s quality trend.

Everything comes from the event log's read-only views (`EventLog.views`: `LogViews`) and drift rows on a
read-only connection (SQLite `mode=ro`, WAL: readers never block the coordinator's writer); this module
only joins and summarises what they return.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coordinator.availability import from_telemetry
from coordinator.eventlog import EventLog
from coordinator.records import COORDINATOR_EVAL, EvalRow, ResourcePoint, RoundPoint


@dataclass(frozen=True)
class DeviceView:
    client: str
    state: str
    online: bool
    seen_at: float | None
    cpu_pct: float | None
    rss_bytes: int | None
    peak_rss_bytes: int | None  # its process's peak RSS over the run (what memory_budget_gib bounds on a CPU device)
    gpu_mem_bytes: int | None
    budget_bytes: int | None  # memory budget announced in the Join
    temp_c: float | None
    power_w: float | None
    step_time_s: float | None
    peak_mem_bytes: int | None  # planned or measured peak of one SPSA step
    device: str  # capabilities["device"]: cpu | cuda
    updates: int
    train_loss: float | None  # loss of its newest update
    eval_round: int | None
    eval_loss: float | None  # newest evaluation on its held-out slice
    eval_acc: float | None
    gradip: float | None  # mean |GradIP| of its newest update (MEERKAT-VP)
    limited: bool  # MEERKAT-VP limited it to 1 local step
    rho_later: float | None
    rho_quie: float | None
    dp_epsilon: float | None = None  # differential privacy spent by the device (its newest heartbeat)
    dp_exhausted: bool | None = None  # its budget no longer fits a round: it stopped training (None: no DP)
    available: bool | None = None  # its device policy's word (protocol 1.3); None: it does not say; offline: False
    pause_reason: str | None = None  # why it is paused ("offline" for an offline device)
    trained_share: float | None = None  # share of time its client spent in local steps
    peak_rss_measured: bool = False  # peak_rss_bytes is the process's high-water mark (Heartbeat key 19), not
    # the largest RSS sample of a device before protocol 1.3 (which misses every peak between two heartbeats)


@dataclass(frozen=True)
class CurvePoint:
    round: int
    loss: float
    accuracy: float | None
    n: int


@dataclass(frozen=True)
class FleetView:
    fleet: str
    now: float
    last_round: int
    run_state: str  # coordinator/lifecycle.py: running | finishing | finished | stopped
    devices: list[DeviceView]
    rounds: list[RoundPoint]  # oldest first
    device_evals: list[CurvePoint]  # per round: n-weighted mean of the devices' evaluations
    coordinator_evals: list[CurvePoint]  # the coordinator's own (eval_data)
    gradip: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # client -> (round, mean |GradIP|)
    resources: dict[str, list[ResourcePoint]] = field(default_factory=dict)  # client -> history (history=True)

    def available_now(self) -> int:
        """Joined devices online and not paused by their policy (one that does not say counts as available)."""
        return sum(1 for d in self.devices if d.state == "joined" and d.online and d.available is not False)

    def rounds_per_minute(self, window_s: float = 600.0) -> float | None:
        """Closed rounds per minute over the last `window_s` seconds of closes (None: fewer than 2)."""
        ts = [r.closed_at for r in self.rounds if r.closed_at >= self.now - window_s]
        if len(ts) < 2 or ts[-1] <= ts[0]:
            return None
        return 60.0 * (len(ts) - 1) / (ts[-1] - ts[0])


def _mean_curve(rows: list[EvalRow]) -> list[CurvePoint]:
    by_round: dict[int, list[EvalRow]] = {}
    for e in rows:
        by_round.setdefault(e.round, []).append(e)
    out = []
    for r in sorted(by_round):
        es = by_round[r]
        n = sum(max(e.n, 1) for e in es)
        loss = math.fsum(e.loss * max(e.n, 1) for e in es) / n
        accs = [e for e in es if e.accuracy is not None]
        acc = math.fsum(e.accuracy * max(e.n, 1) for e in accs if e.accuracy is not None) / sum(
            max(e.n, 1) for e in accs
        ) if accs else None  # fmt: skip
        out.append(CurvePoint(r, loss, acc, n))
    return out


def _num(t: dict[str, Any], key: str) -> Any:
    v = t.get(key)
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _peak_rss(logged: tuple[int, bool] | None, hwm: int | None, rss: int | None) -> tuple[int | None, bool]:
    """(peak RSS, measured) from the log's history and the newest heartbeat (a device with no round row yet)."""
    if hwm is not None:
        return max(hwm, rss or 0, logged[0] if logged is not None and logged[1] else 0), True
    if logged is not None:
        return logged
    return rss, False


def fleet_view(
    state_dir: str | Path, now: float, last: int | None = 200, event_log: str = "sqlite", *, history: bool = False
) -> FleetView:
    """Read the snapshot (the last `last` rounds of curves; None: the whole run the log keeps) from the event
    log (`event_log`: the config key); `history`: each device's resource history too (dashboard, report)."""
    log = EventLog(state_dir, readonly=True, event_log=event_log)
    try:
        meta = log.views.meta()
        budgets = log.views.client_budgets()
        losses = log.views.last_losses()
        drift = {d.client: d for d in log.drift_rows()}
        gradip = log.views.gradip_means(last if last is not None else 1 << 62)
        evals = log.views.evals(last=last)
        rounds = log.views.round_points(last)
        peak_rss = log.views.peak_rss()
        resources: dict[str, list[ResourcePoint]] = {}
        for p in log.views.resources() if history else []:
            resources.setdefault(p.client, []).append(p)
        devices = []
        for c in log.views.client_status():
            t = c.telemetry
            budget, caps = budgets.get(c.client, (0.0, {}))
            d = drift.get(c.client)
            g = gradip.get(c.client)
            av, words = from_telemetry(t, c.online)
            peak, measured = _peak_rss(peak_rss.get(c.client), _num(t, "peak_rss_bytes"), _num(t, "rss_bytes"))
            devices.append(DeviceView(
                client=c.client, state=c.state, online=c.online, seen_at=c.seen_at, cpu_pct=_num(t, "cpu_pct"),
                rss_bytes=_num(t, "rss_bytes"), peak_rss_bytes=peak, peak_rss_measured=measured,
                gpu_mem_bytes=_num(t, "gpu_mem_bytes"),
                budget_bytes=int(budget * 2**30) if budget > 0 else None, temp_c=_num(t, "temp_c"),
                power_w=_num(t, "power_w"), step_time_s=_num(t, "step_time_s"), peak_mem_bytes=_num(t, "peak_mem_bytes"),
                device=str(caps.get("device", "")), updates=c.updates, train_loss=losses.get(c.client),
                eval_round=_num(t, "eval_round"), eval_loss=_num(t, "eval_loss"), eval_acc=_num(t, "eval_acc"),
                gradip=g[-1][1] if g else None, limited=d is not None and d.limited_round is not None,
                rho_later=None if d is None else d.rho_later, rho_quie=None if d is None else d.rho_quie,
                dp_epsilon=_num(t, "dp_epsilon"), dp_exhausted=t["dp_exhausted"] if isinstance(t.get("dp_exhausted"), bool) else None,
                available=av, pause_reason=None if av is not False else words.removeprefix("paused: "),
                trained_share=_num(t, "trained_share"),
            ))  # fmt: skip
    finally:
        log.close()
    return FleetView(
        fleet=meta.get("fleet", ""),
        now=now,
        run_state=meta.get("run_state", "running"),
        last_round=rounds[-1].round if rounds else -1,
        devices=devices,
        rounds=rounds,
        device_evals=_mean_curve([e for e in evals if e.source != COORDINATOR_EVAL]),
        coordinator_evals=[CurvePoint(e.round, e.loss, e.accuracy, e.n) for e in evals if e.source == COORDINATOR_EVAL],
        gradip=gradip,
        resources=resources,
    )


def quality_trend(view: FleetView) -> dict[str, Any]:
    """First and latest point of each quality curve (what `meerkat status` prints next to the table)."""

    def ends(points: list[Any], key: str) -> dict[str, Any] | None:
        pts = [p for p in points if getattr(p, key) is not None]
        if not pts:
            return None
        a, b = pts[0], pts[-1]
        return {"first_round": a.round, "first": getattr(a, key), "last_round": b.round, "last": getattr(b, key)}

    return {
        "train_loss": ends(view.rounds, "train_loss"),
        "device_eval_loss": ends(view.device_evals, "loss"),
        "device_eval_accuracy": ends(view.device_evals, "accuracy"),
        "coordinator_eval_loss": ends(view.coordinator_evals, "loss"),
        "coordinator_eval_accuracy": ends(view.coordinator_evals, "accuracy"),
        "rounds_per_minute": view.rounds_per_minute(),
    }
