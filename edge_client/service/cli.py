"""`meerkat client --config client.toml`: the long-lived edge client service.

Exit codes: 0 clean stop (SIGTERM/SIGINT: the current step finishes, offline status is published);
2 bad configuration (every problem listed, nothing started); 3 the model, mask, data, memory budget or
state directory cannot be used (nothing published; a damaged state directory is refused, never reset);
4 (`--check` only) the broker check failed; 5 the state directory's disk is full (at start, or a stop
request while a write kept failing): free space and start again (nothing half-written was committed);
6 the fleet runs another model, mask or quantization: the coordinator refused this device's Join and the
fleet's plan (or repeated refusals) confirm it (the message says what the device holds, what the fleet
runs, and how to fix it). systemd's RestartPreventExitStatus covers 2, 3 and 6: restarting would not help
(5 is restarted: space may have been freed).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path
from types import FrameType
from typing import Any

from edge_client.service.actions import EXIT_MISMATCH
from edge_client.service.config import ENV_PREFIX, ClientConfig, ConfigError, load_client_config
from shared.cli import log_level_given
from shared.config import describe, parse_overrides
from shared.fsio import permission_hint

log = logging.getLogger("edge_client.service")

EXIT_CONFIG = 2
EXIT_SETUP = 3
EXIT_BROKER = 4
EXIT_STORAGE_FULL = 5
__all__ = ["EXIT_BROKER", "EXIT_CONFIG", "EXIT_MISMATCH", "EXIT_SETUP", "EXIT_STORAGE_FULL", "register", "run"]


def register(sub: Any) -> None:
    p = sub.add_parser(
        "client",
        help="run the edge client service (train rounds from the coordinator over MQTT)",
        description=f"Run the edge client. Config: TOML file < {ENV_PREFIX}* environment < --set.",
    )
    p.add_argument("--config", type=Path, help="client.toml (keys: see --print-config)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one config key")
    p.add_argument("--print-config", action="store_true", help="print every key with its default and exit")
    p.add_argument("--check", action="store_true", help="validate config, test the broker (TLS, login, subscribe, publish), load model/mask/data, plan memory, "
        "compare model and mask with the coordinator's retained plan on this fleet, "
        "exit (0 ok, 2 config, 3 setup, 4 broker, 6 the fleet runs another model/mask); run it before the service starts: "
        "it uses the same session")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.print_config:
        print(describe(ClientConfig), end="")
        return 0
    try:
        cfg = load_client_config(args.config, parse_overrides(args.set))
    except ConfigError as exc:
        print(f"meerkat client: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if not log_level_given(args):  # -v/-q on the command line win over the file's log_level
        logging.getLogger().setLevel(cfg.log_level)
    log.info("client %s, fleet %s, broker %s", cfg.client_id, cfg.fleet, cfg.broker)
    retained: dict[str, bytes] = {}  # the coordinator's retained plan / result, captured by --check
    if args.check and not _broker_check(cfg, retained):
        return EXIT_BROKER

    from edge_client.service.client import EdgeClient
    from edge_client.service.state import StateError, StorageFull
    from edge_client.service.trainer import EngineTrainer

    try:
        trainer = EngineTrainer(cfg)
    except (OSError, ValueError, RuntimeError) as exc:  # MaskError/DataError/SideCarError/MemoryBudgetError...
        print(f"meerkat client: cannot set up {cfg.client_id}: {type(exc).__name__}: {exc}{permission_hint(exc)}",
              file=sys.stderr)  # fmt: skip
        return EXIT_SETUP
    if args.check:
        print(
            f"ok: model {trainer.fingerprint[:16]} mask {trainer.mask_id} nnz {trainer.nnz} "
            f"examples {trainer.n_samples} micro-batch {trainer.micro_batch} device {trainer.device}"
        )
        from edge_client.service.fleetcheck import fleet_check

        fc = fleet_check(cfg.fleet, retained, trainer.fingerprint, trainer.mask_id)
        print(fc.line(), file=sys.stderr if fc.ok is False else sys.stdout)
        return EXIT_MISMATCH if fc.ok is False else 0
    try:
        client = EdgeClient(cfg, trainer)
    except StorageFull as exc:
        print(f"meerkat client: {exc}", file=sys.stderr)
        return EXIT_STORAGE_FULL
    except StateError as exc:
        print(f"meerkat client: {exc}", file=sys.stderr)
        return EXIT_SETUP

    def _stop(signum: int, frame: FrameType | None) -> None:
        log.info("%s: stopping after the current step", signal.Signals(signum).name)
        client.stop()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        code = client.run()
    except StorageFull as exc:
        print(f"meerkat client: {exc}", file=sys.stderr)
        return EXIT_STORAGE_FULL
    if client.exit is not None:
        print(f"meerkat client: {client.exit.reason}", file=sys.stderr)
    return code


def _broker_check(cfg: ClientConfig, retained: dict[str, bytes]) -> bool:
    """The device's side of the preflight (shared/preflight.py): prints the report, True when it passed;
    the coordinator's retained plan and latest result go into `retained` (edge_client/service/fleetcheck.py)."""
    import time

    from shared.codec import encode
    from shared.messages import Status
    from shared.mqtt import tls_for
    from shared.preflight import Plan, report, run_preflight
    from shared.topics import Topics

    t, c = Topics(cfg.fleet), cfg.client_id
    offline = encode(Status(client="", online=False, ts=time.time()))  # what a stopped client shows anyway
    plan = Plan(
        read=(t.plan, t.filter("result"), t.to(c)),
        write=((t.status(c), offline, True),),
        must_not_read=(t.filter("status"),) if cfg.username else (),
        capture=(t.plan, t.result_latest),
    )
    tls = tls_for(cfg.broker, cfg.tls_ca, cfg.tls_cert, cfg.tls_key, cfg.tls_insecure)
    checks = run_preflight(cfg.broker, c, plan, username=cfg.username, password=cfg.read_password(), tls=tls,
                           captured=retained)  # fmt: skip
    text, ok = report(checks)
    print(text, file=sys.stdout if ok else sys.stderr)
    return ok
