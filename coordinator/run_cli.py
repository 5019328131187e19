"""`meerkat stop` and `meerkat report`: end a run, review it (docs/COORDINATOR.md "The end of a run")."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from shared.config import ConfigError


def register(sub: Any) -> None:
    s = sub.add_parser("stop", help="end the run: the coordinator finishes its open round, then stops (exit 0)")
    _where(s)
    s.add_argument("--wait", type=float, default=0.0, metavar="S",
                   help="wait up to S seconds for the run to be stopped (exit 1 if it is not by then; default 0)")
    s.set_defaults(func=_run_stop)
    r = sub.add_parser("report", help="write the run report (report.json + report.png) from the event log")
    _where(r)
    r.add_argument("--out", type=Path, help="output directory (default: state_dir/report)")
    r.add_argument("--json", action="store_true", help="print the report JSON instead of the file's path")
    r.set_defaults(func=_run_report)


def _where(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="the coordinator's TOML (state_dir, event_log)")
    p.add_argument("--state-dir", type=Path, help="coordinator state_dir (overrides the config)")


def _state_dir(args: argparse.Namespace) -> tuple[Path, str]:
    state_dir, event_log = args.state_dir, "sqlite"
    if args.config is not None:
        from coordinator.config import load_coordinator_config

        loaded = load_coordinator_config(args.config)
        state_dir, event_log = state_dir or loaded.state_dir, loaded.event_log
    if state_dir is None:
        raise ConfigError(["--state-dir (or --config): required"])
    return Path(state_dir), event_log


def _run_state(state_dir: Path, event_log: str) -> dict[str, str]:
    from coordinator.eventlog import EventLog

    log = EventLog(state_dir, readonly=True, event_log=event_log)
    try:
        return log.views.meta()
    finally:
        log.close()


def _request_stop_in_log(state_dir: Path, event_log: str) -> None:
    from coordinator.eventlog import EventLog
    from coordinator.lifecycle import request_stop_in_log

    log = EventLog(state_dir, event_log=event_log)
    try:
        request_stop_in_log(log, "meerkat stop")
    finally:
        log.close()


def _run_stop(args: argparse.Namespace) -> int:
    from coordinator.lifecycle import request_stop
    from coordinator.status import STALE_AFTER_S, liveness

    try:
        state_dir, event_log = _state_dir(args)
        meta = _run_state(state_dir, event_log)
    except (ConfigError, FileNotFoundError, ValueError, OSError) as exc:
        print(f"meerkat stop: {exc}", file=sys.stderr)
        return 2
    if meta.get("run_state") in ("finished", "stopped"):
        print(f"the run is already {meta['run_state']} (after round {meta.get('run_last_round', '?')})")
        return 0
    if event_log == "sqlite":
        request_stop(state_dir, "meerkat stop")
    else:  # PostgreSQL: coordinator workers, each with its own state_dir: the request goes into the shared log
        _request_stop_in_log(state_dir, event_log)
    if liveness(meta, time.time(), STALE_AFTER_S)["coordinator_alive"]:
        print("stop requested: the coordinator finishes its open round, then stops")
    else:
        print("stop requested; the coordinator is not running: it finishes the open round and stops when started")
    end = time.monotonic() + args.wait
    while args.wait > 0:
        meta = _run_state(state_dir, event_log)
        if meta.get("run_state") in ("finished", "stopped"):
            print(f"run {meta['run_state']} after round {meta.get('run_last_round', '?')}")
            return 0
        if time.monotonic() >= end:
            print(f"meerkat stop: not stopped after {args.wait:g} s (state {meta.get('run_state', 'running')})",
                  file=sys.stderr)  # fmt: skip
            return 1
        time.sleep(0.5)
    return 0


def _run_report(args: argparse.Namespace) -> int:
    from coordinator.report import REPORT_PNG, ReportError, run_report, write_report

    try:
        state_dir, event_log = _state_dir(args)
        if args.json:
            print(json.dumps(run_report(state_dir, event_log), sort_keys=True))
            return 0
        path = write_report(state_dir, args.out or state_dir / "report", event_log)
    except (ConfigError, ReportError, FileNotFoundError, ValueError) as exc:
        print(f"meerkat report: {exc}", file=sys.stderr)
        return 2
    png = path.with_name(REPORT_PNG)
    print(f"{path}" + (f" (+ {png})" if png.exists() else ""))
    return 0
