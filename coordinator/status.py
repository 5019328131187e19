"""`meerkat status`: what the coordinator knows, read straight from its SQLite event log.

Opens the database read-only (`mode=ro`), so it works while the coordinator runs (WAL readers never
block the writer) and never changes anything.
"""

from __future__ import annotations

import json
import math
import sqlite3
import time
from pathlib import Path
from typing import Any

from coordinator.eventlog import DB_NAME, f64_list


class StatusError(RuntimeError):
    """The state directory has no coordinator event log."""


def _connect(state_dir: Path) -> sqlite3.Connection:
    path = Path(state_dir) / DB_NAME
    if not path.is_file():
        raise StatusError(f"{path} does not exist: is {state_dir} a coordinator state_dir?")
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    db.execute("PRAGMA busy_timeout=5000")
    return db


def status_report(state_dir: Path, now: float | None = None, events: int = 10) -> dict[str, Any]:
    """Everything `meerkat status` shows, as plain JSON-able data."""
    now = time.time() if now is None else now
    db = _connect(state_dir)
    try:
        meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
        last = db.execute(
            "SELECT round, n_clients, closed_at, duration_s FROM results ORDER BY round DESC LIMIT 1"
        ).fetchone()
        open_row = db.execute(
            "SELECT round, opened_at, deadline, steps, extensions FROM rounds WHERE state='open'"
        ).fetchone()
        open_info = None
        if open_row is not None:
            steps = json.loads(open_row[3])
            got = db.execute(
                "SELECT COUNT(*) FROM updates WHERE round=? AND status='accepted'", (open_row[0],)
            ).fetchone()[0]
            open_info = {
                "round": open_row[0], "opened_at": open_row[1], "deadline_in_s": round(open_row[2] - now, 1),
                "sampled": len(steps), "reported": int(got), "extensions": open_row[4],
            }  # fmt: skip
        drift = _drift(db)
        clients = []
        for row in db.execute(
            """SELECT client, state, reason, online, n_samples, last_round, seen_at, hb_at, telemetry, last_update_at,
                      updates FROM clients ORDER BY client"""
        ):
            c, state, reason, online, n, lr, seen, hb, tele, lu, nup = row
            clients.append({
                "client": c, "state": state, "reason": reason, "online": bool(online), "n_samples": n,
                "joined_at_round": lr, "seen_s_ago": _ago(now, seen), "heartbeat_s_ago": _ago(now, hb),
                "last_update_s_ago": _ago(now, lu), "updates": nup, "telemetry": json.loads(tele or "{}"),
                "gradip_mean_last": _gradip(db, c), "drift": drift.get(c),
            })  # fmt: skip
        rejects = dict(db.execute("SELECT reason, count FROM rejects ORDER BY reason").fetchall())
        ev = [
            {"ts": ts, "round": r, "kind": k, "detail": d}
            for ts, r, k, d in db.execute(
                "SELECT ts, round, kind, detail FROM events ORDER BY id DESC LIMIT ?", (events,)
            )
        ]
        ck = db.execute("SELECT round, path FROM checkpoints ORDER BY round DESC LIMIT 1").fetchone()
    finally:
        db.close()
    return {
        "state_dir": str(state_dir),
        "fleet": meta.get("fleet"),
        "fingerprint": meta.get("fingerprint"),
        "mask_id": meta.get("mask_id"),
        "nnz": int(meta["nnz"]) if "nnz" in meta else None,
        "last_round": None if last is None else last[0],
        "last_round_clients": None if last is None else last[1],
        "last_round_duration_s": None if last is None else round(last[3], 3),
        "open_round": open_info,
        "clients_online": sum(1 for c in clients if c["online"] and c["state"] == "joined"),
        "clients_offline": sum(1 for c in clients if not c["online"] and c["state"] == "joined"),
        "clients": clients,
        "clients_limited": sorted(c["client"] for c in clients if c["drift"] and c["drift"]["limited"]),
        "rejected": rejects,
        "last_checkpoint_round": None if ck is None else ck[0],
        "recent_events": ev,
    }


def _ago(now: float, ts: float | None) -> float | None:
    return None if ts is None else round(now - ts, 1)


def _gradip(db: sqlite3.Connection, client: str) -> float | None:
    """Mean GradIP of the client's latest update (MEERKAT-VP signal), if the mask carried gradients."""
    row = db.execute(
        "SELECT gradip FROM updates WHERE client=? AND gradip IS NOT NULL ORDER BY round DESC LIMIT 1",
        (client,),
    ).fetchone()
    if row is None:
        return None
    vals = f64_list(row[0])
    return math.fsum(vals) / len(vals) if vals else None


def _drift(db: sqlite3.Connection) -> dict[str, dict[str, Any]]:
    """MEERKAT-VP state per client (the coordinator updates it with every update that has GradIP)."""
    out: dict[str, dict[str, Any]] = {}
    if db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='drift'").fetchone() is None:
        return out  # a log written before MEERKAT-VP drift control existed
    for c, n, early, late, rl, rq, lr in db.execute(
        "SELECT client, n_steps, early, late, rho_later, rho_quie, limited_round FROM drift"
    ):
        out[str(c)] = {
            "n_steps": n, "early": early, "late": late, "rho_later": rl, "rho_quie": rq,
            "limited": lr is not None, "limited_round": lr,
        }  # fmt: skip
    return out


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
