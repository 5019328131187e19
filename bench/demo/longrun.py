"""A long run's event log from the in-process fleet, its report and a dashboard screenshot.

    python -m bench.demo.longrun --rounds 500 --model <demo model dir> --screenshot docs/img/dashboard.png

The defaults (2 devices, 2 steps of batch 8 a round, lr 2e-3, eps 1e-2, the coordinator's evaluation of
128 examples every 10 rounds) learn the demo model's topic task over a few hundred rounds at ~0.4 s a
round on one core, so the picture shows a whole learning curve (docs/COORDINATOR.md "Dashboard").

The demo's inputs (tiny model, mask, Non-IID task split, configs: bench/demo/demo.py) run through
`bench.inproc.from_configs` (the product's RoundBook and device cores, the real engine, simulated time)
with the book's records written to a real event log (`journal`), the coordinator's own evaluation
(`CoordinatorEvaluator`, round -1 = the baseline, then every `--eval-every` rounds) and the run ended as
the coordinator ends it (run_state finished). Heartbeats carry this process's RSS, peak RSS and CPU (all
simulated devices share it). Then `coordinator/report.py` writes the report and the coordinator's own dashboard
code (`coordinator.dashboard.pages` on a MetricsServer) is shot in headless Chromium: what docs/img/
dashboard.png shows is the dashboard of a 500+ round run, not a drawing of one.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil

from bench.demo.demo import DemoConfig, prepare, write_configs

log = logging.getLogger(__name__)


def make_history(out: Path, rounds: int, clients: int, steps: int, eval_every: int, model: Path | None,
                 batch_size: int = 8, seq_len: int = 64, lr: float = 2e-3, eval_max: int = 128) -> Path:
    """Run `rounds` rounds in process into out/state/coordinator (its event log); returns that state_dir."""
    from bench.inproc import from_configs
    from coordinator.config import load_coordinator_config
    from coordinator.evaluator import CoordinatorEvaluator
    from coordinator.eventlog import EventLog
    from coordinator.records import Record
    from edge_client.service.telemetry import Reading, peak_rss_bytes
    from shared.fingerprint import fingerprint_model_dir
    from shared.maskfile import load_mask

    cfg = DemoConfig(clients=clients, rounds=rounds, steps=steps, workdir=out, eval_every=eval_every,
                     batch_size=batch_size, seq_len=seq_len, lr=lr, size="demo")  # fmt: skip
    paths = prepare(cfg, model)
    shutil.rmtree(out / "state", ignore_errors=True)
    coord_toml, client_tomls = write_configs(cfg, paths, "mqtt://127.0.0.1:1883", "longrun")
    config = load_coordinator_config(coord_toml, overrides={"eval_max": eval_max})
    state = Path(config.state_dir)
    events = EventLog(state, "normal")
    mask = load_mask(paths["mask"])
    fingerprint = fingerprint_model_dir(paths["model"])
    proc = psutil.Process()
    proc.cpu_percent()

    def journal(records: list[Record]) -> None:
        with events.transaction():
            events.persist_many(records)

    last: dict[float, Reading] = {}

    def reading(client: str, now: float) -> Reading:
        """The process's reading, taken once per simulated instant: every device shares the process (a
        second cpu_percent() in the same instant would read ~0 % for the second device)."""
        if now not in last:
            rss = int(proc.memory_info().rss)
            last.clear()
            last[now] = Reading(proc.cpu_percent(), rss, None, None, None, max(peak_rss_bytes() or 0, rss))
        return last[now]

    # simulated time ends about now (a round takes a tick or two), so "last seen" reads like a real run's
    fleet = from_configs(coord_toml, client_tomls, journal=journal, reading=reading, start=time.time() - 2.0 * rounds)
    with events.transaction():
        for key, value in (("fleet", config.fleet), ("fingerprint", fingerprint), ("mask_id", mask.mask_id),
                           ("nnz", str(mask.nnz)), ("master_seed", str(config.master_seed))):  # fmt: skip
            events.set_meta(key, value)
    evaluator = CoordinatorEvaluator(config, mask, fingerprint)
    t0 = time.monotonic()
    journal([evaluator.evaluate(-1, fleet.book.values, fleet.now)])
    while fleet.book.last_round < rounds - 1:
        fleet.run(min(eval_every, rounds - 1 - fleet.book.last_round))
        rec = evaluator.evaluate(fleet.book.last_round, fleet.book.values, fleet.now)
        journal([rec])
        print(f"round {fleet.book.last_round}: eval loss {rec.loss:.4f} acc {rec.accuracy} "
              f"({time.monotonic() - t0:.0f} s)", flush=True)  # fmt: skip
    with events.transaction():  # ended as the coordinator ends a run (coordinator/lifecycle.py)
        for key, value in (("run_state", "finished"), ("run_last_round", str(fleet.book.last_round)),
                           ("run_reason", f"{rounds} rounds"), ("run_ended_at", repr(fleet.now))):  # fmt: skip
            events.set_meta(key, value)
    events.close()
    return state


def screenshot(state: Path, path: Path, width: int = 1600, height: int = 1080) -> None:
    """The coordinator's dashboard on `state`'s event log, shot in headless Chromium."""
    from coordinator.dashboard import pages
    from coordinator.metrics import Metrics, MetricsServer

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("chromium is not installed")
    server = MetricsServer(Metrics(), "127.0.0.1", 0, pages=pages(state))
    server.start()
    try:
        subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        f"--user-data-dir={path.parent / '.chromium-profile'}", f"--window-size={width},{height}",
                        f"--screenshot={path.resolve()}", f"http://127.0.0.1:{server.port}/"],
                       check=True, capture_output=True, timeout=120)  # fmt: skip
    finally:
        server.stop()
        shutil.rmtree(path.parent / ".chromium-profile", ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=500)
    p.add_argument("--clients", type=int, default=2)
    p.add_argument("--steps", type=int, default=2, help="local SPSA steps per round")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--eval-max", type=int, default=128, help="examples per coordinator evaluation")
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--model", type=Path, help="tiny-model dir (default: the demo model, built once and cached)")
    p.add_argument("--out", type=Path, default=Path("longrun-out"))
    p.add_argument("--screenshot", type=Path, help="write the dashboard's PNG here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, force=True)
    state = make_history(args.out.resolve(), args.rounds, args.clients, args.steps, args.eval_every, args.model,
                         args.batch_size, lr=args.lr, eval_max=args.eval_max)  # fmt: skip
    from coordinator.report import write_report

    print(f"report: {write_report(state, state / 'report')}")
    if args.screenshot is not None:
        screenshot(state, args.screenshot)
        print(f"dashboard: {args.screenshot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
