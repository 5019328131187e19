"""The run report: JSON + plots of a whole run, read from the coordinator's event log.

    report = run_report(state_dir)                # plain JSON-able data (read-only open of the log)
    path = write_report(state_dir, out_dir)       # out_dir/report.json + out_dir/report.png

Written by the coordinator when its run ends (finished or stopped, coordinator/lifecycle.py) into
state_dir/report, and on demand by `meerkat report` (also while the run goes on: WAL readers never block
the writer). Its shape follows `meerkat demo`'s report: `before` / `after` (eval loss and accuracy, the
round -1 baseline = the values before round 0), `rounds` (clients, mean client loss, duration, bytes),
`bytes`, `memory` (per device: the process's peak RSS (its high-water mark, Heartbeat key 19; None from a
device before protocol 1.3), the largest RSS sample, the step's peak, the budget), plus `run` (its lifecycle
state), `evals` (the coordinator's own and the devices' mean, per round) and `devices` (per-device
resource history, one point per round). Bytes are those of the messages re-encoded from the log
(`shared.codec.encode`: the wire bytes of each plan, result and update; a pruned log
(docs/COORDINATOR.md "Retention") counts the rounds it keeps).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from coordinator.actions import plan_message, result_message
from coordinator.eventlog import DB_NAME, EventLog
from coordinator.fleetview import CurvePoint, fleet_view
from coordinator.records import ResourcePoint
from shared.codec import encode
from shared.fingerprint import fp_tag
from shared.messages import Update

log = logging.getLogger(__name__)

REPORT_JSON, REPORT_PNG = "report.json", "report.png"


class ReportError(RuntimeError):
    """No event log at the state_dir the report was asked for."""


def _wire_bytes(log_: EventLog, fleet: str, fingerprint: str, mask_id: str) -> dict[int, dict[str, int]]:
    """round -> bytes of its plan (published once, retained), its result, and the updates it used."""
    out: dict[int, dict[str, int]] = {}
    tag = fp_tag(fingerprint) if fingerprint else 0
    for p in log_.plans(since=0):
        out.setdefault(p.round, {})["plan"] = len(encode(plan_message(p, fleet, fingerprint, mask_id)))
    for r in log_.results():
        out.setdefault(r.round, {})["result"] = len(encode(result_message(r)))
    for u in log_.updates():
        if u.used_in is None or not u.grads:
            continue
        up = Update(u.round, u.msg_id, tuple(u.grads), u.n_samples, tag, u.loss)
        b = out.setdefault(u.used_in, {})
        b["up"] = b.get("up", 0) + len(encode(up))
    return out


def _ends(curve: list[CurvePoint]) -> tuple[dict[str, Any], dict[str, Any]]:
    def one(p: CurvePoint | None) -> dict[str, Any]:
        return {"round": None, "eval_loss": None, "eval_accuracy": None} if p is None else {
            "round": p.round, "eval_loss": p.loss, "eval_accuracy": p.accuracy}  # fmt: skip

    return one(curve[0] if curve else None), one(curve[-1] if curve else None)


PLOT_DEVICES = 12  # memory lines drawn (the largest RSS first): 10,000 lines and their legend take minutes


def _by_client(history: list[ResourcePoint]) -> dict[str, list[ResourcePoint]]:
    """The history grouped by client in one pass (a 10,000-device run has 200,000 points: a scan per
    client would be 2e9 steps, minutes of the coordinator's CPU after the run)."""
    out: dict[str, list[ResourcePoint]] = {}
    for p in history:
        out.setdefault(p.client, []).append(p)
    return out


def _memory(history: list[ResourcePoint], budgets: dict[str, int | None]) -> dict[str, dict[str, int | None]]:
    out: dict[str, dict[str, int | None]] = {}
    by = _by_client(history)
    for c in sorted(set(by) | set(budgets)):
        mine = by.get(c, [])
        rss = [p.rss_bytes for p in mine if p.rss_bytes]
        pk = [p.peak_mem_bytes for p in mine if p.peak_mem_bytes]
        hwm = [p.peak_rss_bytes for p in mine if p.peak_rss_bytes]
        out[c] = {"peak_rss_bytes": max(hwm + rss) if hwm else None, "max_rss_bytes": max(rss) if rss else None,
                  "peak_step_bytes": max(pk) if pk else None, "budget_bytes": budgets.get(c)}  # fmt: skip
    return out


def run_report(state_dir: str | Path, event_log: str = "sqlite", now: float | None = None) -> dict[str, Any]:
    """The whole run as plain JSON-able data (see the module doc for the keys)."""
    now = time.time() if now is None else now
    if event_log == "sqlite" and not (Path(state_dir) / DB_NAME).exists():
        raise ReportError(f"{Path(state_dir) / DB_NAME} does not exist: is {state_dir} a coordinator state_dir?")
    view = fleet_view(state_dir, now, last=None, event_log=event_log)
    log_ = EventLog(state_dir, readonly=True, event_log=event_log)
    try:
        meta = log_.views.meta()
        history = log_.views.resources()
        wire = _wire_bytes(log_, view.fleet, meta.get("fingerprint", ""), meta.get("mask_id", ""))
    finally:
        log_.close()
    curve = view.coordinator_evals or view.device_evals  # the coordinator's own when it has eval_data
    before, after = _ends(curve)
    n_devices = max(1, len(view.devices))
    rounds = [{"round": r.round, "clients": r.n_clients, "mean_client_loss": r.train_loss, "duration_s": r.duration_s,
               "closed_at": r.closed_at, "uplink_bytes": wire.get(r.round, {}).get("up", 0),
               "downlink_bytes": wire.get(r.round, {}).get("plan", 0) + wire.get(r.round, {}).get("result", 0)}
              for r in view.rounds]  # fmt: skip
    by_kind = {k: sum(b.get(k, 0) for b in wire.values()) for k in ("plan", "result", "up")}
    down = by_kind["plan"] + by_kind["result"]
    ended = meta.get("run_ended_at")
    return {
        "run": {
            "fleet": view.fleet, "state": meta.get("run_state", "running"), "reason": meta.get("run_reason", ""),
            "last_round": view.last_round, "rounds": len(view.rounds), "ended_at": float(ended) if ended else None,
            "written_at": now, "eval_source": "coordinator" if view.coordinator_evals else "devices",
        },
        "before": before,  # the first evaluation: round -1 = the values before round 0 (the baseline)
        "after": after,
        "rounds": rounds,
        "evals": {"coordinator": [asdict(p) for p in view.coordinator_evals],
                  "devices": [asdict(p) for p in view.device_evals]},
        "bytes": {"uplink_total": by_kind["up"], "uplink_updates": by_kind["up"], "downlink_published": down,
                  "downlink_delivered_estimate": down * n_devices, "by_kind": by_kind},
        "memory": _memory(history, {d.client: d.budget_bytes for d in view.devices}),
        "devices": {c: [{k: v for k, v in asdict(p).items() if k != "client"} for p in pts]
                    for c, pts in sorted(_by_client(history).items())},
    }  # fmt: skip


def write_report(state_dir: str | Path, out_dir: str | Path, event_log: str = "sqlite") -> Path:
    """run_report -> out_dir/report.json (+ report.png when matplotlib is installed); returns the JSON's path."""
    report = run_report(state_dir, event_log)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / REPORT_JSON
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=1, sort_keys=True) + "\n")
    tmp.replace(path)
    plot_report(report, out / REPORT_PNG)
    return path


def plot_report(report: dict[str, Any], path: Path) -> bool:
    """Six panels: eval loss and accuracy vs round (baseline dashed), bytes, devices, round duration per round,
    per-device memory (RSS solid, the process's peak RSS dash-dot, step peak dotted, budget dashed). False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib not installed (pip install 'meerkat-edge[plot]'): no PNG")
        return False
    ev = report["evals"]["coordinator"] or report["evals"]["devices"]
    who = report["run"]["eval_source"]
    rows = report["rounds"]
    x = [r["round"] for r in rows]
    fig, ax = plt.subplots(2, 3, figsize=(14, 7))
    for a, key, label in ((ax[0][0], "loss", "eval loss"), (ax[0][1], "accuracy", "eval accuracy")):
        pts = [(p["round"], p[key]) for p in ev if p[key] is not None]
        if pts:
            a.plot([p[0] for p in pts], [p[1] for p in pts], lw=1.2, label=f"{who} eval")
            a.axhline(pts[0][1], color="grey", ls="--", lw=1, label=f"baseline (round {pts[0][0]})")
            a.legend(fontsize=8)
        a.set(xlabel="round", ylabel=label, title=label)
    a = ax[0][2]
    a.plot(x, [r["uplink_bytes"] for r in rows], lw=1, label="uplink (updates)")
    a.plot(x, [r["downlink_bytes"] for r in rows], lw=1, label="downlink (plan + result, published)")
    a.set(xlabel="round", ylabel="bytes", title="bytes per round")
    a.legend(fontsize=8)
    ax[1][0].plot(x, [r["clients"] for r in rows], lw=1, drawstyle="steps-mid")
    ax[1][0].set(xlabel="round", ylabel="devices", title="devices per round (results)")
    ax[1][1].plot(x, [r["duration_s"] for r in rows], lw=1)
    ax[1][1].set(xlabel="round", ylabel="seconds", title="round duration")
    a = ax[1][2]
    mem = report["memory"]
    shown = sorted(report["devices"], key=lambda c: -((mem.get(c) or {}).get("max_rss_bytes") or 0))[:PLOT_DEVICES]
    for c in sorted(shown):
        pts = report["devices"][c]
        line = a.plot([p["round"] for p in pts], [(p["rss_bytes"] or 0) / 2**20 for p in pts], lw=1, label=f"{c} RSS")
        a.plot([p["round"] for p in pts], [(p["peak_mem_bytes"] or 0) / 2**20 for p in pts], lw=1, ls=":",
               color=line[0].get_color())  # fmt: skip
        hwm = [(p["round"], p["peak_rss_bytes"] / 2**20) for p in pts if p.get("peak_rss_bytes")]
        if hwm:
            a.plot([h[0] for h in hwm], [h[1] for h in hwm], lw=1, ls="-.", color=line[0].get_color())
        budget = report["memory"].get(c, {}).get("budget_bytes")
        if budget:
            a.axhline(budget / 2**20, color=line[0].get_color(), ls="--", lw=0.8)
    more = f"; the {PLOT_DEVICES} of {len(report['devices'])} with the largest RSS" if len(report["devices"]) > PLOT_DEVICES else ""
    a.set(xlabel="round", ylabel="MiB", title=f"device memory, MiB (RSS; peak RSS -.; step peak :; budget --{more})")
    if report["devices"]:
        a.legend(fontsize=7)
    r = report["run"]
    fig.suptitle(f"fleet {r['fleet']}: {r['state']} after round {r['last_round']} ({r['rounds']} rounds)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def write_run_report(state_dir: Path, event_log: str = "sqlite") -> None:
    """The coordinator's report at the end of a run, into state_dir/report; a failure is logged, never fatal:
    the run is over and its log is intact (`meerkat report` writes it again)."""
    out = state_dir / "report"
    try:
        path = write_report(state_dir, out, event_log=event_log)
    except Exception as exc:  # matplotlib or a full disk: the log keeps everything for `meerkat report`
        log.warning("run report not written to %s: %s (run `meerkat report` later)", out, exc)
    else:
        log.info("run report: %s", path)
