"""Column codecs shared by the event log's writer and readers: float64 blobs, optional floats, the plan
row, and the readers' optional WHERE filters."""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from typing import Any, cast

import numpy as np

from coordinator.logstore import Store
from coordinator.records import PlanRow
from shared.prng import Dist

PLAN_COLS = "round, state, opened_at, deadline, seeds, steps, lr, eps, dist, batch_size, base_round, base_checksum, extensions"


_F64: dict[int, struct.Struct] = {}  # n -> Struct("<nd"): an update's grads and GradIP (n = its steps)


def f64_blob(xs: Sequence[float]) -> bytes:
    """Little-endian float64s (struct: the same bytes as numpy "<f8", a few times cheaper for ~10 values)."""
    n = len(xs)
    st = _F64.get(n)
    if st is None:
        st = _F64[n] = struct.Struct(f"<{n}d")
    return st.pack(*xs)


def f64_list(blob: bytes) -> list[float]:
    return [float(x) for x in np.frombuffer(blob, dtype="<f8")]


def opt(v: Any) -> float | None:
    return None if v is None else float(v)


def where(*conditions: tuple[str, Any]) -> tuple[str, list[Any]]:
    """(" WHERE a AND b", [arg_a, arg_b]) from (clause, argument) pairs, leaving out those whose argument
    is None; ("", []) when none is left. The readers' optional filters."""
    kept = [(clause, arg) for clause, arg in conditions if arg is not None]
    return (" WHERE " + " AND ".join(c for c, _ in kept) if kept else ""), [a for _, a in kept]


SAMPLE_MAX_KEY = "$sample_max"  # in the steps JSON of a compact plan (not a client id: no collision)


def steps_json(steps: dict[str, int], sample_max: int | None) -> str:
    """The `steps` column: {client: T_k}, plus {"$sample_max": "decimal u64"} for a compact plan."""
    extra: dict[str, Any] = {} if sample_max is None else {SAMPLE_MAX_KEY: str(sample_max)}
    return json.dumps({**steps, **extra}, sort_keys=True)


def plan_row(row: Sequence[Any]) -> PlanRow:
    """A `rounds` row selected as PLAN_COLS."""
    steps = json.loads(row[5])
    sample_max = steps.pop(SAMPLE_MAX_KEY, None)
    return PlanRow(
        round=int(row[0]), state=str(row[1]), opened_at=float(row[2]), deadline=float(row[3]),
        seeds=tuple(int(s) for s in json.loads(row[4])), steps={str(k): int(v) for k, v in steps.items()},
        lr=float(row[6]), eps=float(row[7]), dist=cast(Dist, str(row[8])), batch_size=int(row[9]), base_round=int(row[10]),
        base_checksum=str(row[11]), extensions=int(row[12]), sample_max=None if sample_max is None else int(sample_max),
    )  # fmt: skip


# the clients' update counters (writer.fold_clients): `clients.updates`, `last_update_at` and the update's
# `seen_at` cover the `updates` rows up to rowid meta[FOLD_KEY]; a row after it counts through `client_sql`
FOLD_KEY = "clients_folded_rowid"
# the rows after the mark by the rowid range (MATERIALIZED: SQLite would otherwise group the whole table by its
# (client, round) index), then per client; a statement using UNFOLDED starts with UNFOLDED_WITH
UNFOLDED_WITH = "WITH r AS MATERIALIZED (SELECT client, received_at FROM updates WHERE rowid > ?) "
UNFOLDED = "SELECT client, COUNT(*) AS n, MAX(received_at) AS at FROM r GROUP BY client"
_SEEN = "CASE WHEN u.at IS NULL OR (c.seen_at IS NOT NULL AND c.seen_at >= u.at) THEN c.seen_at ELSE u.at END"


def get_meta(db: Store, key: str) -> str | None:
    row = db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
    return None if row is None else str(row[0])


def folded_rowid(db: Store) -> int:
    """The rowid through which the clients' counters include the updates (every row: a log without the
    key, which an older build counted row by row and a read-only reader cannot mark)."""
    mark = get_meta(db, FOLD_KEY)
    return last_rowid(db) if mark is None else int(mark)


def last_rowid(db: Store) -> int:
    return int(db.execute("SELECT COALESCE(MAX(rowid), 0) FROM updates").fetchone()[0])


def client_sql(cols: str) -> str:
    """A SELECT of `cols` over the clients, sorted by id, with the updates after the mark (its one argument:
    `folded_rowid`) added: the stored row is `c`, and {seen_at}, {last_update_at}, {updates} in `cols` name
    those columns as a fold now would leave them."""
    sql = cols.format(
        seen_at=_SEEN,
        last_update_at="COALESCE(u.at, c.last_update_at)",
        updates="c.updates + COALESCE(u.n, 0)",
    )
    return f"{UNFOLDED_WITH}SELECT {sql} FROM clients AS c LEFT JOIN ({UNFOLDED}) AS u ON u.client = c.client ORDER BY c.client"
