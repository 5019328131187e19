"""CPU of the event log's writes as a fleet round makes them (docs/SCALING.md "Fifth pass").

    python -m bench.fleet.log_cost [--clients 10000] [--batch 220] [--rounds 6] [--pragma cache_size=-2000 ...]

The real `EventLog` on a SQLite file (WAL, `synchronous = full`) in a temporary directory: `--clients` joined
clients with one heartbeat each, then `--rounds` rounds of one Update + one Drift record per client, in
random client order, committed `--batch` updates at a time (the pump's batch at 10,000 devices is ~200);
every 9th batch also carries the heartbeats held since the last flush (a seventh of the fleet: 15 s
heartbeats, 2 s flushes); each round ends with its ResultRecord (all of its updates used). Reported:
`time.thread_time` per update of the writes (statements and row building) and of the COMMITs, and of the
last close. `--pragma` runs a PRAGMA on the writer's connection after it opened (the defaults are
coordinator/logstore.py's). The draws come from shared.prng (seed `--seed`).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from typing import Any

from coordinator.eventlog import EventLog
from coordinator.records import (
    DriftRecord,
    HeartbeatRecord,
    JoinRecord,
    Record,
    ResultRecord,
    ResultRow,
    UpdateRecord,
    UpdateRow,
)
from shared.prng import derive_seed, raw_u64


def measure(clients: int, batch: int, rounds: int, pragmas: list[str], seed: int = 0) -> dict[str, Any]:
    work = tempfile.mkdtemp(prefix="log-cost-")
    log = EventLog(work, "full")
    try:
        for p in pragmas:
            log.db.execute("PRAGMA " + p)
        ids = [f"d{i:05d}" for i in range(clients)]
        now = 1000.0
        tele = {"ts": now, "loss": 3.0, "rss_bytes": 200 << 20, "peak_mem_bytes": None, "cpu_pct": 45.0,
                "step_time_s": 5.0, "trained_share": 0.5, "peak_rss_bytes": 300 << 20, "round": -1}  # fmt: skip
        with log.transaction():
            log.persist_many([JoinRecord(c, "joined", "", "f" * 64, "m" * 16, 100, 2.0, {"compact_plan": True}, -1, now)
                              for c in ids])  # fmt: skip
            log.persist_many([HeartbeatRecord(c, dict(tele), now) for c in ids])
        t_write = t_commit = t_close = 0.0
        n_up, steps = 0, dict.fromkeys(ids, 0)
        for r in range(rounds):
            u = raw_u64(derive_seed(seed, r), 2 * clients)
            order = [ids[int(i)] for i in sorted(range(clients), key=lambda i: int(u[i]))]  # a random order
            vals = (u[clients:] >> 11).astype("float64") / 2**53 - 0.5  # one value per update, in [-0.5, 0.5)
            for start in range(0, clients, batch):
                recs: list[Record] = []
                for j, c in enumerate(order[start : start + batch]):
                    now += 0.0002
                    v = float(vals[start + j])
                    grads = tuple(v * (t + 1) for t in range(10))
                    recs.append(UpdateRecord(UpdateRow(c, r, int(u[start + j]) >> 1, grads, 100, 2.0, now, "accepted", None),
                                             tuple(g * 0.5 for g in grads)))  # fmt: skip
                    steps[c] += 10
                    recs.append(DriftRecord(c, steps[c], 0.1, 0.2, 0.3, 0.4, now))
                if (start // batch) % 9 == 8:
                    held = order[: clients // 7]
                    recs += [HeartbeatRecord(c, dict(tele, round=r), now) for c in held]
                t0 = time.thread_time()
                log.db.begin()
                log._in_tx = True  # as EventLog.transaction(), its COMMIT timed apart
                log.persist_many(recs)
                t1 = time.thread_time()
                log.db.commit()
                log._in_tx = False
                t_write += t1 - t0
                t_commit += time.thread_time() - t1
                n_up += len(order[start : start + batch])
            row = ResultRow(r, (1,) * 10, (0.1,) * 10, 0.01, "rademacher", clients, "0" * 64, now, 3.0)
            used = tuple((c, r, "accepted") for c in sorted(ids))
            t0 = time.thread_time()
            with log.transaction():
                log.persist_many([ResultRecord(row, used, all_accepted=True)])
            t_close = time.thread_time() - t0
            t_write += t_close
        return {"clients": clients, "batch": batch, "rounds": rounds, "pragmas": pragmas,
                "write_us_per_update": round(1e6 * t_write / n_up, 1), "commit_us_per_update": round(1e6 * t_commit / n_up, 1),
                "total_us_per_update": round(1e6 * (t_write + t_commit) / n_up, 1), "last_close_ms": round(1e3 * t_close, 1)}  # fmt: skip
    finally:
        log.close()
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=10_000)
    p.add_argument("--batch", type=int, default=220, help="updates per transaction (default 220)")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pragma", action="append", default=[], help="e.g. cache_size=-2000 (repeatable)")
    args = p.parse_args(argv)
    print(json.dumps(measure(args.clients, args.batch, args.rounds, args.pragma, args.seed)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
