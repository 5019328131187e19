"""The event log's tables (portable DDL: `coordinator/logstore.py` maps the types per engine).

Seeds and msg_ids are u64, which SQLite INTEGER (signed i64) cannot hold: they are stored as JSON text /
decimal text. Scalars are stored as little-endian float64 blobs (exact round trip, `rows.f64_blob`).
"""

SCHEMA_VERSION = 1

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS clients (
    client TEXT PRIMARY KEY,
    state TEXT NOT NULL,               -- joined | rejected
    reason TEXT NOT NULL DEFAULT '',
    fingerprint TEXT NOT NULL DEFAULT '',
    mask_id TEXT NOT NULL DEFAULT '',
    n_samples INTEGER NOT NULL DEFAULT 0,
    budget_gib REAL NOT NULL DEFAULT 0,
    capabilities TEXT NOT NULL DEFAULT '{}',
    last_round INTEGER NOT NULL DEFAULT -1,
    joined_at REAL,
    online INTEGER NOT NULL DEFAULT 0,
    seen_at REAL,                      -- last join/status/heartbeat/update/sync
    hb_at REAL,
    telemetry TEXT NOT NULL DEFAULT '{}',
    last_update_at REAL,
    updates INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS rounds (
    round INTEGER PRIMARY KEY,
    state TEXT NOT NULL,               -- open | closed
    opened_at REAL NOT NULL,
    deadline REAL NOT NULL,
    seeds TEXT NOT NULL,               -- JSON list of u64
    steps TEXT NOT NULL,               -- JSON {client: T_k}
    lr REAL NOT NULL, eps REAL NOT NULL, dist TEXT NOT NULL, batch_size INTEGER NOT NULL,
    base_round INTEGER NOT NULL,
    base_checksum TEXT NOT NULL,
    extensions INTEGER NOT NULL DEFAULT 0,
    closed_at REAL
);
CREATE TABLE IF NOT EXISTS updates (
    client TEXT NOT NULL,
    round INTEGER NOT NULL,
    msg_id TEXT NOT NULL,
    grads BLOB NOT NULL,               -- float64 LE, one per local step
    n_samples INTEGER NOT NULL,
    loss REAL NOT NULL,
    received_at REAL NOT NULL,
    status TEXT NOT NULL,              -- accepted | late | dropped | folded
    used_in INTEGER,                   -- round whose result used it (NULL while pending)
    gradip BLOB,                       -- float64 LE per step: g_{k,t} * c_t (MEERKAT-VP), if the mask has grads
    -- round first: a batch's rows go to the open round's few index pages, not to one page per client spread
    -- over every round (a log created before keeps (client, round): the same rows, the same SQL)
    PRIMARY KEY (round, client)
);
CREATE INDEX IF NOT EXISTS updates_round ON updates(round, status);
CREATE TABLE IF NOT EXISTS results (
    round INTEGER PRIMARY KEY,
    seeds TEXT NOT NULL,               -- JSON list of u64 (may include late seeds of an older round)
    scalars BLOB NOT NULL,             -- float64 LE
    lr REAL NOT NULL, dist TEXT NOT NULL,
    n_clients INTEGER NOT NULL,
    values_checksum TEXT NOT NULL,
    closed_at REAL NOT NULL,
    duration_s REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS rejects (reason TEXT PRIMARY KEY, count INTEGER NOT NULL);
-- per-round counters beside the records (duplicates ignored: re-sent updates after reconnects, storms)
CREATE TABLE IF NOT EXISTS round_counts (
    round INTEGER NOT NULL, kind TEXT NOT NULL, count INTEGER NOT NULL, PRIMARY KEY (round, kind)
);
CREATE TABLE IF NOT EXISTS reject_log (
    id INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL, client TEXT NOT NULL, topic TEXT NOT NULL,
    reason TEXT NOT NULL, detail TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL, round INTEGER, kind TEXT NOT NULL, detail TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS drift (
    client TEXT PRIMARY KEY,           -- MEERKAT-VP state per client (coordinator/drift.py)
    n_steps INTEGER NOT NULL,          -- GradIP values observed
    early REAL, late REAL,             -- mean |GradIP| of the first / last window (NULL until both filled)
    rho_later REAL, rho_quie REAL,
    limited_round INTEGER,             -- round whose update flagged it (sticky); NULL = not limited
    limited_at REAL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS checkpoints (
    round INTEGER PRIMARY KEY, path TEXT NOT NULL, values_checksum TEXT NOT NULL, written_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS evals (
    source TEXT NOT NULL,              -- client id (its Heartbeat eval keys) or '@coordinator' (eval_data)
    round INTEGER NOT NULL,            -- values after this round were evaluated (-1 = v_0)
    loss REAL NOT NULL, accuracy REAL, n INTEGER NOT NULL, ts REAL NOT NULL,
    PRIMARY KEY (source, round)
);
-- the step-size controller's decision after each round (coordinator/lrctl.py; lr = "auto"): the lr the
-- round's plan used, the one its result was applied with, the next plan's, why; `state` (JSON) only on the newest row: what a restart resumes from
CREATE TABLE IF NOT EXISTS lr_decisions (
    round INTEGER PRIMARY KEY, lr_used REAL NOT NULL, lr_step REAL NOT NULL, lr_next REAL NOT NULL, action TEXT NOT NULL,
    reason TEXT NOT NULL, loss REAL, state TEXT, ts REAL NOT NULL
);
-- per-device resource history for the dashboard and the run report: the last heartbeat of each
-- (client, round) (the device's round when it sent it), one row per device and round like `evals`
CREATE TABLE IF NOT EXISTS resources (
    client TEXT NOT NULL,
    round INTEGER NOT NULL,
    ts REAL NOT NULL,
    rss_bytes INTEGER, peak_mem_bytes INTEGER, cpu_pct REAL, step_time_s REAL,
    peak_rss_bytes INTEGER,            -- the largest peak RSS (Heartbeat key 19) a heartbeat of the round reported
    PRIMARY KEY (client, round)
);
"""

# columns added to a table after it first shipped: (table, column, type); `EventLog` adds the missing ones to
# a log an older build created (CREATE TABLE IF NOT EXISTS leaves an existing table as it was), and readers
# of such a log that cannot write (read-only SQLite) see NULL for them (`LogViews`)
ADDED_COLUMNS: tuple[tuple[str, str, str], ...] = (("resources", "peak_rss_bytes", "INTEGER"),)
