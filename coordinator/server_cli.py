"""`meerkat coordinator`, `meerkat export`, `meerkat status` (see docs/COORDINATOR.md)."""

from __future__ import annotations

import argparse
import gc
import json
import logging
import signal
import sys
from pathlib import Path
from typing import Any

from shared.config import ConfigError, parse_overrides
from shared.fsio import permission_hint

log = logging.getLogger(__name__)

# `meerkat coordinator` exit statuses (docs/COORDINATOR.md "Exit status"; the systemd unit's
# RestartPreventExitStatus lists those a restart cannot fix); 5 / 7 / 8: storage faults (coordinator/storage.py)
EXIT_CONFIG = 2  # bad config, or model / mask / state dir unusable
EXIT_BROKER = 4  # --check only: the broker test failed
EXIT_PORT_IN_USE = 9  # metrics_port is taken by another process

GC_THRESHOLDS = (50_000, 20, 10)  # the cyclic GC's generation thresholds while serving (Python's: 700, 10, 10)


def settle_heap() -> None:
    """Before serving. The start-up heap (torch, numpy, the recovered book: ~190,000 objects) lives as long as
    the process: frozen, the cyclic GC's full passes stop walking it again and again (one such pass cost
    ~40 us per update of a 3,000-update round). And the young generation is collected every 50,000 new
    containers instead of 700: a batch's records and rows (the book keeps many of them) are walked less
    often, and far fewer full passes walk the book's growing state (GC 18.7 -> ~6 us per Update at 10,000
    clients; docs/SCALING.md). Reference counting still frees what dies; cycles wait a little longer."""
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def register(sub: Any) -> None:
    p = sub.add_parser("coordinator", help="run the fleet coordinator (rounds, aggregation, event log)")
    p.add_argument("--config", type=Path, help="coordinator TOML ([coordinator] table or top level)")
    p.add_argument("--print-config", action="store_true", help="print every key with its default and exit")
    p.add_argument("--rounds", type=int, help="stop after this many closed rounds (overrides the config)")
    p.add_argument("--state-dir", type=Path, help="override state_dir")
    p.add_argument("--broker", help="override broker url")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override any config key")
    p.add_argument(
        "--check", action="store_true",
        help="validate config, mask and model, read eval_data, bind metrics_port, test the broker (TLS, login, "
        "subscribe, read+write round trip); exit 0, 2 (config, model, mask, eval data), 9 (metrics_port taken) or "
        "4 (broker); run it while the coordinator is stopped: it uses the same session",
    )
    p.set_defaults(func=_run_coordinator)

    e = sub.add_parser("export", help="merge the learned values into the base model (HF save_pretrained dir)")
    e.add_argument("--config", type=Path, help="the coordinator's TOML (state_dir, model_dir, mask, quant)")
    e.add_argument("--state-dir", type=Path, help="coordinator state_dir (overrides the config)")
    e.add_argument("--model", type=Path, help="base model dir (overrides model_dir)")
    e.add_argument("--mask", type=Path, help="mask file (overrides mask)")
    e.add_argument(
        "--quant", choices=("nf4", "int8", "none"), help="quantisation the fleet ran (overrides quant)"
    )
    e.add_argument(
        "--base", choices=("dequantized", "original"), default="dequantized",
        help="dequantized: the weights the fleet computed with (default; matches the coordinator's eval); "
        "original: the untouched checkpoint weights with the learned values written in",
    )  # fmt: skip
    e.add_argument(
        "--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
        help="dtype of the written weights (default auto: the checkpoint's)",
    )  # fmt: skip
    e.add_argument("--out", type=Path, required=True, help="output directory")
    e.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    e.set_defaults(func=_run_export)

    s = sub.add_parser(
        "status", help="rounds, clients, telemetry and rejects from the coordinator's event log"
    )
    s.add_argument("--state-dir", type=Path, help="coordinator state_dir")
    s.add_argument("--config", type=Path, help="take state_dir from this coordinator TOML")
    s.add_argument("--json", action="store_true", help="print JSON (one object)")
    s.add_argument("--stale-after", type=float, default=15.0, metavar="S",
                   help="the coordinator counts as gone when its heartbeat (written every 2 s) is older (default 15)")
    s.set_defaults(func=_run_status)


def _load(args: argparse.Namespace, extra: dict[str, Any] | None = None) -> Any:
    from coordinator.config import load_coordinator_config

    return load_coordinator_config(args.config, overrides=extra or {})


def _run_coordinator(args: argparse.Namespace) -> int:
    from coordinator.config import describe

    if args.print_config:
        print(describe(), end="")
        return 0
    try:
        over = parse_overrides(args.set)
        over.update(
            {
                k: v
                for k, v in (("rounds", args.rounds), ("state_dir", args.state_dir), ("broker", args.broker))
                if v is not None
            }
        )
        config = _load(args, over)
    except (ConfigError, ValueError, RuntimeError, OSError) as exc:
        print(f"meerkat coordinator: {exc}", file=sys.stderr)
        return 2
    from coordinator.lifecycle import RunOver
    from coordinator.storage import StorageFault, check_state, full_disk_fault

    try:
        if config.cluster and not args.check:  # one of several workers (coordinator/workers.py)
            from coordinator.workers import Worker

            worker = Worker(config)
        else:
            from coordinator.server import Coordinator

            check_state(config.state_dir, config.event_log)  # a lost or damaged log: refused, never a new fleet
            coord = Coordinator(config)
    except RunOver as exc:  # an ended run is not started again: said once, exit 0 (systemd leaves it stopped)
        print(f"meerkat coordinator: {exc}", file=sys.stderr)
        return 0
    except StorageFault as exc:
        print(f"meerkat coordinator: {exc}", file=sys.stderr)
        return exc.code
    except Exception as exc:
        if (fault := full_disk_fault(exc, config.state_dir, config.event_log)) is not None:
            print(f"meerkat coordinator: {fault}", file=sys.stderr)
            return fault.code
        if isinstance(exc, (ConfigError, ValueError, RuntimeError, OSError)):  # mask/model/state problems, each named
            print(f"meerkat coordinator: {exc}{permission_hint(exc)}", file=sys.stderr)
            return EXIT_CONFIG
        raise
    if args.check:
        from coordinator.selfcheck import local_checks

        checks, code = local_checks(config, coord)
        for c in checks:
            print(c.line(), file=sys.stderr if c.ok is False else sys.stdout)
        if code != 0:
            return code
        return 0 if _broker_check(config) else EXIT_BROKER
    from coordinator.httpserve import PortInUse

    try:
        if config.cluster:
            signal.signal(signal.SIGTERM, lambda *_: worker.stop())
            signal.signal(signal.SIGINT, lambda *_: worker.stop())
            return worker.run()
        signal.signal(signal.SIGTERM, lambda *_: coord.stop())
        signal.signal(signal.SIGINT, lambda *_: coord.stop())
        settle_heap()
        return coord.run()
    except PortInUse as exc:  # one line naming the port and the fix, not a traceback
        print(f"meerkat coordinator: {exc}", file=sys.stderr)
        return EXIT_PORT_IN_USE
    except Exception as exc:
        if (fault := full_disk_fault(exc, config.state_dir, config.event_log)) is None:
            raise
        print(f"meerkat coordinator: {fault}", file=sys.stderr)
        return fault.code


def _run_export(args: argparse.Namespace) -> int:
    from coordinator.export import ExportError, export_merged, values_from_state
    from shared.architectures import UnsupportedModelError
    from shared.fingerprint import fingerprint_model_dir
    from shared.maskfile import MaskError, load_mask

    try:
        if args.config is not None:
            c = _load(args)
            state_dir, model, mask_path, quant, event_log = c.state_dir, c.model_dir, c.mask, c.quant, c.event_log
        else:
            state_dir = model = mask_path = None
            quant, event_log = "nf4", "sqlite"
        state_dir = args.state_dir or state_dir
        model = args.model or model
        mask_path = args.mask or mask_path
        quant = args.quant or quant
        missing = [
            n for n, v in (("state-dir", state_dir), ("model", model), ("mask", mask_path)) if v is None
        ]
        if missing:
            raise ConfigError([f"--{n}: required (or give --config)" for n in missing])
        fp = fingerprint_model_dir(model)
        mask = load_mask(mask_path, expected_fingerprint=fp)
        values, round = values_from_state(state_dir, mask, model, fp, event_log=event_log)
        out = export_merged(
            model, mask, values, quant, args.out, round=round, overwrite=args.overwrite, base=args.base, dtype=args.dtype
        )
    except (ConfigError, ExportError, MaskError, FileNotFoundError, UnsupportedModelError) as exc:
        print(f"meerkat export: {exc}", file=sys.stderr)
        return 2
    print(f"exported round {round} to {out}")
    return 0


def _run_status(args: argparse.Namespace) -> int:
    from coordinator.status import StatusError, format_status, status_report

    try:
        state_dir, event_log = args.state_dir, "sqlite"
        if args.config is not None:  # the config says where the log is (SQLite in state_dir, or PostgreSQL)
            loaded = _load(args)
            state_dir, event_log = state_dir or loaded.state_dir, loaded.event_log
        if state_dir is None:
            raise ConfigError(["--state-dir (or --config): required"])
        rep = status_report(state_dir, stale_after_s=args.stale_after, event_log=event_log)
    except (ConfigError, StatusError) as exc:
        print(f"meerkat status: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(rep) if args.json else format_status(rep))
    return 0


def _broker_check(c: Any) -> bool:
    """The coordinator's side of the preflight (shared/preflight.py): prints the report, True when it passed."""
    from shared.mqtt import read_secret, tls_for
    from shared.preflight import Plan, report, run_preflight
    from shared.topics import Topics

    t = Topics(c.fleet)
    plan = Plan(
        read=tuple(t.filter(k) for k in ("up", "join", "hb", "status", "sync")),
        write=(),
        roundtrip=t.to(c.client_id),  # no device reads it; the coordinator's ACL must allow read+write
    )
    tls = tls_for(c.broker, c.tls_ca, c.tls_cert, c.tls_key)
    checks = run_preflight(c.broker, c.client_id, plan, username=c.username,
                           password=read_secret(c.password_file), tls=tls)
    text, ok = report(checks)
    print(text, file=sys.stdout if ok else sys.stderr)
    return ok
