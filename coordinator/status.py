"""`meerkat status`: what the coordinator knows, read from its event log. This module only formats.

Opens the log read-only (`EventLog(..., readonly=True)`: SQLite `mode=ro`), so it works while the
coordinator runs (WAL readers never block the writer) and never changes anything.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from coordinator.availability import from_telemetry
from coordinator.eventlog import DB_NAME, EventLog
from coordinator.fleetview import fleet_view, quality_trend

STALE_AFTER_S = 15.0  # a coordinator that has not written `alive_at` for this long counts as gone (it writes every 2 s)


class StatusError(RuntimeError):
    """The state directory has no coordinator event log."""


RECENT_ROUNDS = 10  # rounds listed with checksum and counters in `meerkat status --json`


def liveness(meta: dict[str, str], now: float, stale_after_s: float) -> dict[str, Any]:
    """Is the coordinator running? From its heartbeat in the log (meta alive_at / stopped_at, server.py).

    Not alive = the open round and the clients' `online` flags are as of `coordinator_alive_at`, the last
    moment the coordinator vouched for them (a stopped coordinator marks nobody offline)."""
    alive_at = float(meta["alive_at"]) if "alive_at" in meta else None
    stopped_at = float(meta["stopped_at"]) if "stopped_at" in meta else None
    alive = alive_at is not None and stopped_at is None and now - alive_at <= stale_after_s
    return {
        "coordinator_alive": alive,
        "coordinator_alive_at": alive_at,
        "coordinator_seen_s_ago": _ago(now, alive_at),
        "coordinator_stopped_at": stopped_at,
        "stale": not alive,
    }


def status_report(
    state_dir: Path, now: float | None = None, events: int = 10, stale_after_s: float = STALE_AFTER_S,
    event_log: str = "sqlite",
) -> dict[str, Any]:
    """Everything `meerkat status` shows, as plain JSON-able data (`event_log`: the config key)."""
    now = time.time() if now is None else now
    try:
        log = EventLog(state_dir, readonly=True, event_log=event_log)
    except FileNotFoundError as exc:
        raise StatusError(f"{Path(state_dir) / DB_NAME} does not exist: is {state_dir} a coordinator state_dir?") from exc
    try:
        meta = log.views.meta()
        results = log.results(after=log.views.last_result_round() - RECENT_ROUNDS)
        last = results[-1] if results else None
        counts = log.views.round_counts()
        duplicates = sum(c.get("duplicate", 0) for c in counts.values())
        recent = [{
            "round": r.round, "n_clients": r.n_clients, "values_checksum": r.values_checksum, "lr": r.lr,
            "duration_s": round(r.duration_s, 3), "duplicates": counts.get(r.round, {}).get("duplicate", 0),
        } for r in results]  # fmt: skip
        o = log.views.open_round()
        open_info = None if o is None else {
            "round": o.round, "opened_at": o.opened_at, "deadline_in_s": round(o.deadline - now, 1),
            "sampled": o.sampled, "reported": o.reported, "extensions": o.extensions,
        }  # fmt: skip
        drift = {d.client: d for d in log.drift_rows()}
        gradips = log.views.latest_gradips()  # one query, not one per client
        clients: list[dict[str, Any]] = []
        for c in log.views.client_status():
            d = drift.get(c.client)
            gi = gradips.get(c.client)
            clients.append({
                "client": c.client, "state": c.state, "reason": c.reason, "online": c.online,
                "n_samples": c.n_samples, "joined_at_round": c.last_round, "seen_s_ago": _ago(now, c.seen_at),
                "heartbeat_s_ago": _ago(now, c.hb_at), "last_update_s_ago": _ago(now, c.last_update_at),
                "updates": c.updates, "telemetry": c.telemetry,
                "dp_epsilon": c.telemetry.get("dp_epsilon"), "dp_exhausted": c.telemetry.get("dp_exhausted"),
                "available": from_telemetry(c.telemetry, c.online)[0],
                "availability": from_telemetry(c.telemetry, c.online)[1],
                "gradip_mean_last": math.fsum(gi) / len(gi) if gi else None,
                "drift": None if d is None else {
                    **{k: v for k, v in asdict(d).items() if k != "client"}, "limited": d.limited_round is not None,
                },
            })  # fmt: skip
        rejects = log.views.reject_counts()
        ev = [asdict(e) for e in reversed(log.views.events(limit=events))]
        lr_rows = [asdict(d) for d in log.views.lr_decisions(limit=RECENT_ROUNDS)]  # lr = "auto" only
        ck = log.checkpoints()
    finally:
        log.close()
    return {
        "state_dir": str(state_dir),
        **liveness(meta, now, stale_after_s),
        "fleet": meta.get("fleet"),
        "run_state": meta.get("run_state", "running"),  # coordinator/lifecycle.py: running|finishing|finished|stopped
        "run_reason": meta.get("run_reason", ""),
        "fingerprint": meta.get("fingerprint"),
        "mask_id": meta.get("mask_id"),
        "nnz": int(meta["nnz"]) if "nnz" in meta else None,
        "last_round": None if last is None else last.round,
        "last_round_clients": None if last is None else last.n_clients,
        "last_round_duration_s": None if last is None else round(last.duration_s, 3),
        "values_checksum": None if last is None else last.values_checksum,
        "recent_rounds": recent,
        "duplicates": duplicates,  # re-sent updates ignored (same client, round, msg_id), all rounds
        "open_round": open_info,
        "clients_online": sum(1 for c in clients if c["online"] and c["state"] == "joined"),
        "clients_offline": sum(1 for c in clients if not c["online"] and c["state"] == "joined"),
        # online and not paused by their device policy (a device that says nothing counts as available)
        "clients_available": sum(1 for c in clients if c["online"] and c["state"] == "joined" and c["available"] is not False),
        "clients": clients,
        "clients_limited": sorted(c["client"] for c in clients if c["drift"] and c["drift"]["limited"]),
        "rejected": rejects,
        "last_checkpoint_round": ck[0][0] if ck else None,
        "recent_events": ev,
        # the step-size controller's last decisions, oldest first (empty: a fixed lr): the lr each round's
        # plan used, the one its result applied (less when damped), the next plan's, and why
        "lr_decisions": lr_rows,
        "lr": None if last is None else last.lr,
        "quality": quality_trend(fleet_view(state_dir, now, event_log=event_log)),
    }


def _ago(now: float, ts: float | None) -> float | None:
    return None if ts is None else round(now - ts, 1)


def _fmt_bytes(n: Any) -> str:
    if not isinstance(n, (int, float)):
        return "-"
    return f"{n / 2**30:.2f}G" if n >= 2**30 else f"{n / 2**20:.0f}M"


def format_status(rep: dict[str, Any]) -> str:
    """Human-readable status (the --json form is `status_report` itself)."""
    lines = [_liveness_line(rep)] if rep.get("stale") else []
    lines += [
        f"fleet {rep['fleet']}  model {str(rep['fingerprint'])[:12]}  mask {rep['mask_id']} ({rep['nnz']} values)",
        f"run: {rep['run_state']}" + (f" ({rep['run_reason']})" if rep["run_reason"] else ""),
        f"last closed round: {rep['last_round']}  (clients {rep['last_round_clients']}, "
        f"{rep['last_round_duration_s']} s)  last checkpoint: {rep['last_checkpoint_round']}",
        f"values checksum: {rep['values_checksum']}  duplicates ignored: {rep['duplicates']}",
    ]
    o = rep["open_round"]
    if o:
        lines.append(
            f"open round {o['round']}: {o['reported']}/{o['sampled']} reported, deadline in {o['deadline_in_s']} s, "
            f"{o['extensions']} extensions"
        )
    else:
        lines.append("no round open")
    lines.append(f"clients: {rep['clients_online']} online, {rep['clients_offline']} offline, "
                 f"{rep['clients_available']} available now")
    hdr = f"  {'client':<20} {'state':<9} {'online':<6} {'available':<22} {'trained':>7} {'updates':>7} {'last upd':>9} {'hb':>7} {'rss':>7} {'peak':>7} {'gpu':>7} {'temp':>6} {'gradip':>10} {'rho_later':>9} {'rho_quie':>8} {'limited':>7} {'dp_eps':>8}"
    lines.append(hdr)
    for c in rep["clients"]:
        t = c["telemetry"]
        temp = t.get("temp_c")
        gi = c["gradip_mean_last"]
        d = c["drift"] or {}
        online = ("yes" if c["online"] else "no") + ("*" if rep.get("stale") else "")
        share = t.get("trained_share")
        lines.append(
            f"  {c['client']:<20} {c['state']:<9} {online:<6} {c['availability']:<22} "
            f"{'-' if share is None else f'{100 * share:.0f}%':>7} {c['updates']:>7} "
            f"{_s(c['last_update_s_ago']):>9} {_s(c['heartbeat_s_ago']):>7} {_fmt_bytes(t.get('rss_bytes')):>7} "
            f"{_fmt_bytes(t.get('peak_rss_bytes')):>7} "
            f"{_fmt_bytes(t.get('gpu_mem_bytes')):>7} {'-' if temp is None else f'{temp:.0f}C':>6} "
            f"{'-' if gi is None else f'{gi:.3g}':>10} {_g(d.get('rho_later')):>9} {_g(d.get('rho_quie')):>8} "
            f"{'-' if not d else ('yes' if d['limited'] else 'no'):>7} {_dp(t):>8}"
        )
    lines += _quality_lines(rep.get("quality") or {})
    lines += _lr_lines(rep)
    spent = [c["client"] for c in rep["clients"] if c["telemetry"].get("dp_exhausted") is True]
    if spent:
        lines.append("privacy budget spent, no longer training: " + ", ".join(spent))
    if rep["clients_limited"]:
        lines.append("limited to 1 local step (MEERKAT-VP): " + ", ".join(rep["clients_limited"]))
    if rep["rejected"]:
        lines.append("rejected messages: " + ", ".join(f"{k}={v}" for k, v in rep["rejected"].items()))
    else:
        lines.append("rejected messages: none")
    return "\n".join(lines)


def _lr_lines(rep: dict[str, Any]) -> list[str]:
    """The lr per round and why it moved (lr = "auto"), or the fixed lr the last result applied."""
    rows = rep.get("lr_decisions") or []
    if not rows:
        return [] if rep.get("lr") is None else [f"lr: {rep['lr']:.4g} (fixed)"]
    out = ["lr (auto), the last rounds: round  plan lr -> applied -> next  action: why"]
    for d in rows[-5:]:
        out.append(f"  {d['round']:>5}  {d['lr_used']:.4g} -> {d['lr_step']:.4g} -> {d['lr_next']:.4g}  "
                   f"{d['action']}: {d['reason']}")
    return out


def _liveness_line(rep: dict[str, Any]) -> str:
    """The banner over stale data: a stopped or silent coordinator vouches for nothing after it went."""
    at = rep["coordinator_alive_at"]
    if at is None:
        return "STALE: no coordinator heartbeat in this log (never started, or older than this version): round and online (*) are as last written"
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at))
    if rep["coordinator_stopped_at"] is not None:
        return f"coordinator stopped at {when}: the round and online flags (*) below are as of then"
    return (f"STALE: coordinator not seen for {rep['coordinator_seen_s_ago']:.0f} s (last heartbeat {when}; "
            "is it running?): the open round and online flags (*) below are as of then")


def _quality_lines(q: dict[str, Any]) -> list[str]:
    """The quality trend beside the fleet table: first -> latest point of each curve."""
    out = []
    for key, label, pct in (
        ("train_loss", "train loss (updates)", False), ("device_eval_loss", "eval loss (devices)", False),
        ("device_eval_accuracy", "eval accuracy (devices)", True), ("coordinator_eval_loss", "eval loss (coordinator)", False),
        ("coordinator_eval_accuracy", "eval accuracy (coordinator)", True),
    ):  # fmt: skip
        t = q.get(key)
        if t:
            f = "{:.1%}" if pct else "{:.4f}"
            arrow = "down" if t["last"] < t["first"] else ("up" if t["last"] > t["first"] else "flat")
            out.append(f"  {label:<28} round {t['first_round']}: {f.format(t['first'])} -> round {t['last_round']}: "
                       f"{f.format(t['last'])} ({arrow})")  # fmt: skip
    rpm = q.get("rounds_per_minute")
    if out or rpm is not None:
        out.insert(0, "quality:" + ("" if rpm is None else f"  {rpm:.1f} rounds/min"))
    return out


def _dp(t: dict[str, Any]) -> str:
    """Spent epsilon of a DP device ('*' once its budget stopped it); '-' outside DP fleets."""
    e = t.get("dp_epsilon")
    return "-" if not isinstance(e, (int, float)) else f"{e:.3g}" + ("*" if t.get("dp_exhausted") is True else "")


def _g(v: float | None) -> str:
    return "-" if v is None else f"{v:.3g}"


def _s(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}s"
