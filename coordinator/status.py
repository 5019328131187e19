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

from coordinator.eventlog import DB_NAME, EventLog


class StatusError(RuntimeError):
    """The state directory has no coordinator event log."""


RECENT_ROUNDS = 10  # rounds listed with checksum and counters in `meerkat status --json`


def status_report(
    state_dir: Path, now: float | None = None, events: int = 10, event_log: str = "sqlite"
) -> dict[str, Any]:
    """Everything `meerkat status` shows, as plain JSON-able data (`event_log`: the config key)."""
    now = time.time() if now is None else now
    try:
        log = EventLog(state_dir, readonly=True, event_log=event_log)
    except FileNotFoundError as exc:
        raise StatusError(f"{Path(state_dir) / DB_NAME} does not exist: is {state_dir} a coordinator state_dir?") from exc
    try:
        meta = log.meta()
        results = log.results(after=log.last_result_round() - RECENT_ROUNDS)
        last = results[-1] if results else None
        counts = log.round_counts()
        duplicates = sum(c.get("duplicate", 0) for c in counts.values())
        recent = [{
            "round": r.round, "n_clients": r.n_clients, "values_checksum": r.values_checksum,
            "duration_s": round(r.duration_s, 3), "duplicates": counts.get(r.round, {}).get("duplicate", 0),
        } for r in results]  # fmt: skip
        o = log.open_round()
        open_info = None if o is None else {
            "round": o.round, "opened_at": o.opened_at, "deadline_in_s": round(o.deadline - now, 1),
            "sampled": o.sampled, "reported": o.reported, "extensions": o.extensions,
        }  # fmt: skip
        drift = {d.client: d for d in log.drift_rows()}
        clients: list[dict[str, Any]] = []
        for c in log.client_status():
            d = drift.get(c.client)
            gi = log.latest_gradip(c.client)
            clients.append({
                "client": c.client, "state": c.state, "reason": c.reason, "online": c.online,
                "n_samples": c.n_samples, "joined_at_round": c.last_round, "seen_s_ago": _ago(now, c.seen_at),
                "heartbeat_s_ago": _ago(now, c.hb_at), "last_update_s_ago": _ago(now, c.last_update_at),
                "updates": c.updates, "telemetry": c.telemetry,
                "gradip_mean_last": math.fsum(gi) / len(gi) if gi else None,
                "drift": None if d is None else {
                    **{k: v for k, v in asdict(d).items() if k != "client"}, "limited": d.limited_round is not None,
                },
            })  # fmt: skip
        rejects = log.reject_counts()
        ev = [asdict(e) for e in reversed(log.events(limit=events))]
        ck = log.checkpoints()
    finally:
        log.close()
    return {
        "state_dir": str(state_dir),
        "fleet": meta.get("fleet"),
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
        "clients": clients,
        "clients_limited": sorted(c["client"] for c in clients if c["drift"] and c["drift"]["limited"]),
        "rejected": rejects,
        "last_checkpoint_round": ck[0][0] if ck else None,
        "recent_events": ev,
    }


def _ago(now: float, ts: float | None) -> float | None:
    return None if ts is None else round(now - ts, 1)


def _fmt_bytes(n: Any) -> str:
    if not isinstance(n, (int, float)):
        return "-"
    return f"{n / 2**30:.2f}G" if n >= 2**30 else f"{n / 2**20:.0f}M"


def format_status(rep: dict[str, Any]) -> str:
    """Human-readable status (the --json form is `status_report` itself)."""
    lines = [
        f"fleet {rep['fleet']}  model {str(rep['fingerprint'])[:12]}  mask {rep['mask_id']} ({rep['nnz']} values)",
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
    lines.append(f"clients: {rep['clients_online']} online, {rep['clients_offline']} offline")
    hdr = f"  {'client':<20} {'state':<9} {'online':<6} {'updates':>7} {'last upd':>9} {'hb':>7} {'rss':>7} {'gpu':>7} {'temp':>6} {'gradip':>10} {'rho_later':>9} {'rho_quie':>8} {'limited':>7}"
    lines.append(hdr)
    for c in rep["clients"]:
        t = c["telemetry"]
        temp = t.get("temp_c")
        gi = c["gradip_mean_last"]
        d = c["drift"] or {}
        lines.append(
            f"  {c['client']:<20} {c['state']:<9} {'yes' if c['online'] else 'no':<6} {c['updates']:>7} "
            f"{_s(c['last_update_s_ago']):>9} {_s(c['heartbeat_s_ago']):>7} {_fmt_bytes(t.get('rss_bytes')):>7} "
            f"{_fmt_bytes(t.get('gpu_mem_bytes')):>7} {'-' if temp is None else f'{temp:.0f}C':>6} "
            f"{'-' if gi is None else f'{gi:.3g}':>10} {_g(d.get('rho_later')):>9} {_g(d.get('rho_quie')):>8} "
            f"{'-' if not d else ('yes' if d['limited'] else 'no'):>7}"
        )
    if rep["clients_limited"]:
        lines.append("limited to 1 local step (MEERKAT-VP): " + ", ".join(rep["clients_limited"]))
    if rep["rejected"]:
        lines.append("rejected messages: " + ", ".join(f"{k}={v}" for k, v in rep["rejected"].items()))
    else:
        lines.append("rejected messages: none")
    return "\n".join(lines)


def _g(v: float | None) -> str:
    return "-" if v is None else f"{v:.3g}"


def _s(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}s"
