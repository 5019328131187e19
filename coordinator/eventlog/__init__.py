"""The coordinator's durable event log, the source of truth after kill -9: a SQLite file in WAL mode
(`state_dir/events.sqlite`, the default) or a PostgreSQL database (`event_log = "postgresql://..."`),
reached through one seam (`coordinator/logstore.py` `Store`).

What is logged (`schema.py`): the client registry (join, status, last heartbeat + telemetry), every
round plan, every accepted update (its per-step scalars, kept for MEERKAT-VP analysis), every round
result (seeds + aggregated scalars: scalar replay and restart rebuild from them), reject counters by
reason, round decisions (events), MEERKAT-VP drift state per client and written checkpoints.

Crash-safety rules (the ingest contract): the caller runs a batch of writes inside `with
log.transaction():` and acks the MQTT messages only after the block returns (= committed); a write
outside a transaction raises. The round book (`coordinator/rounds.py`) decides what to write;
`persist(record)` / `persist_many(records)` write its records through one writer per record type
(`writer.py`), so a batch and the same records one by one leave the same rows. Dedupe is the primary key
(client, round) of `updates` plus its stored msg_id.

The package owns ALL of the SQL, written once in portable SQL: the pump, recovery, `meerkat status`,
export and tests go through its methods (typed rows from `coordinator/records.py`), never through their
own SELECTs.

    schema.py   the DDL                      writer.py  every INSERT / UPDATE / DELETE
    log.py      EventLog: open, transaction, writes, the reads recovery needs
    views.py    LogViews (`EventLog.views`): read-only views for status, /metrics and the dashboard
    rows.py     column codecs (float64 blobs, plan rows, optional filters)
"""

from coordinator.eventlog.log import EventLog as EventLog
from coordinator.eventlog.schema import SCHEMA_VERSION as SCHEMA_VERSION
from coordinator.eventlog.views import LogViews as LogViews
from coordinator.logstore import DB_NAME as DB_NAME  # re-exported: status, export, tests

__all__ = ["DB_NAME", "SCHEMA_VERSION", "EventLog", "LogViews"]
