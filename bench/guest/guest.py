"""`meerkat bench guest`: how much a training client slows the owner's own work, with and without its policy.

One run, three conditions, the same fixed CPU-bound foreground job (pure-Python arithmetic, one core):
    alone     nothing else of ours runs (timed before and after the fleets; the median of both)
    off       beside a 1-device fleet training at full speed (`[policy] enabled = false`)
    default   beside the same fleet with the default device policy (edge_client/service/policy.py)
Each fleet is the real thing: broker (1883 or a private mosquitto), the coordinator and the client in
this process's threads (coordinator.server.Coordinator, edge_client.service.client.EdgeClient over
MQTT), a model of the `small` tiny-model shape (hidden 256, 4 layers, MLP 1024: steps that keep a core
busy; random prng weights, built in seconds: a step costs the same whatever the weights know) on
64-token examples. The job starts once the client is training;
then the fleet must still complete its rounds after the jobs end (the default policy resumes after
`quiet_s` of quiet).

The foreground job runs in a runner process started before anything else, so the niceness the policy
gives this process does not reach it. `--scope tree` counts only this benchmark's own child processes
(the job) as the owner's load, for a machine whose CPUs other people keep busy (a shared CI box: with
`machine`, the default, the policy would never let the client train there at all).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.cli import add_defaults, add_json_flag, print_json_last

RUNNER = """import sys, time
for line in sys.stdin:
    n = int(line)
    t = time.perf_counter()
    s = 0
    for i in range(n):
        s += i * i
    print(time.perf_counter() - t, flush=True)
"""


@dataclass(frozen=True)
class GuestConfig:
    hidden: int = 256  # the `small` tiny-model shape (bench/tinylm/pretrain.py), random weights
    layers: int = 4
    intermediate: int = 1024
    filler: int = 40  # extra words per example: about 64 tokens, so a step is real work
    rounds: int = 3  # rounds each fleet must complete
    steps: int = 10  # local SPSA steps per round
    jobs: int = 3  # foreground job runs per condition
    job_iters: int = 8_000_000  # work of one job (sum of i*i): about 1-3 s on one core
    quiet_s: float = 30.0  # the default policy's quiet period (lower it for a quick run)
    max_other_cpu_pct: float = 30.0  # the default policy's busy line (% of one core)
    scope: str = "machine"  # whose CPU counts as the owner's load: machine | tree (this benchmark's children)
    workdir: Path = Path("guest-out")
    timeout_s: float = 900.0  # per fleet
    broker: str | None = None


class JobRunner:
    """The foreground job in its own process (nice 0 whatever this process becomes): `run()` -> seconds."""

    def __init__(self, iters: int) -> None:
        self.iters = iters
        self.proc = subprocess.Popen([sys.executable, "-c", RUNNER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)  # fmt: skip

    def run(self) -> float:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"{self.iters}\n")
        self.proc.stdin.flush()
        return float(self.proc.stdout.readline())

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(10)


def add_parser(sub: Any) -> None:
    d = GuestConfig()
    p = sub.add_parser("guest", help="foreground job slowdown beside a training client: alone, policy off, default policy",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_defaults(
        p, d,
        ("--hidden", "hidden", "model width"), ("--layers", "layers", "model layers"),
        ("--rounds", "rounds", "rounds each fleet completes"),
        ("--steps", "steps", "local SPSA steps per round"), ("--jobs", "jobs", "foreground job runs per condition"),
        ("--job-iters", "job_iters", "work of one foreground job"),
        ("--quiet-s", "quiet_s", "the default policy's quiet_s"),
        ("--max-other-cpu-pct", "max_other_cpu_pct", "the default policy's max_other_cpu_pct"), ("--workdir", "workdir", "state and logs"),
        ("--timeout", "timeout_s", "give up on a fleet after this many seconds"),
    )  # fmt: skip
    p.add_argument("--scope", choices=("machine", "tree"), default=d.scope,
                   help="the owner's load: every other process (machine) or this benchmark's children (tree)")
    p.add_argument("--broker", default=None, help="mqtt://host:port (default: 127.0.0.1:1883 or a private mosquitto)")
    add_json_flag(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    cfg = GuestConfig(hidden=args.hidden, layers=args.layers, rounds=args.rounds, steps=args.steps, jobs=args.jobs, job_iters=args.job_iters,
                      quiet_s=args.quiet_s, max_other_cpu_pct=args.max_other_cpu_pct, scope=args.scope, workdir=args.workdir, timeout_s=args.timeout,
                      broker=args.broker)  # fmt: skip
    from bench.demo.demo import _quiet_libraries

    _quiet_libraries()  # the CLI only: a caller in the same process (a test) keeps its own logging
    result = run_guest(cfg)
    for k in ("off", "default"):
        r = result[k]
        print(f"{k:>8}: job {r['job_median_s']:.2f} s ({100 * r['slowdown']:+.1f} % vs alone "
              f"{result['alone_median_s']:.2f} s), {r['steps_during_jobs']} steps during the jobs, "
              f"rounds {r['rounds_done']}/{cfg.rounds} ({r['done_after_jobs_s']:.0f} s after the jobs)")
    if args.json:
        print_json_last(result)
    ok = all(result[k]["rounds_done"] == cfg.rounds for k in ("off", "default"))
    return 0 if ok else 1


def run_guest(cfg: GuestConfig) -> dict[str, Any]:
    from bench.demo.broker import find_or_start_broker
    from bench.demo.toy import build_toy

    runner = JobRunner(cfg.job_iters)  # first: nice 0 whatever the client does to this process later
    work = cfg.workdir.resolve()
    shutil.rmtree(work, ignore_errors=True)
    toy = build_toy(work / "toy", n_examples=64, hidden=cfg.hidden, layers_n=cfg.layers,
                    intermediate=cfg.intermediate, filler=cfg.filler)  # fmt: skip
    paths = {"model": toy.model_dir, "mask": toy.mask_path, "task": toy.data_path}
    broker = find_or_start_broker(cfg.broker, work / "broker")
    try:
        alone = [runner.run() for _ in range(cfg.jobs)]
        off = _fleet(cfg, paths, broker.url, runner, {"enabled": False}, "off")
        # last: the default policy lowers this process's priority for good (torch threads, nice, IO class)
        default = _fleet(cfg, paths, broker.url, runner,
                         {"quiet_s": cfg.quiet_s, "max_other_cpu_pct": cfg.max_other_cpu_pct}, "default")
        alone += [runner.run() for _ in range(cfg.jobs)]
    finally:
        runner.close()
        broker.stop()
    base = statistics.median(alone)
    for r in (off, default):
        r["slowdown"] = r["job_median_s"] / base - 1.0
    return {
        "bench": "guest", "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
        "cores": os.cpu_count(), "load_avg_1m": os.getloadavg()[0], "alone_s": alone, "alone_median_s": base,
        "off": off, "default": default,
    }


def _fleet(cfg: GuestConfig, paths: dict[str, Path], broker: str, runner: JobRunner, policy: dict[str, Any],
           name: str) -> dict[str, Any]:  # fmt: skip
    """One fleet (coordinator + one client, in threads) trained beside `cfg.jobs` foreground jobs."""
    from coordinator.config import CoordinatorConfig
    from coordinator.server import Coordinator
    from edge_client.service.client import EdgeClient
    from edge_client.service.config import load_client_config
    from edge_client.service.sensors import SystemSensors, TreeCpu
    from edge_client.service.trainer import EngineTrainer

    work = cfg.workdir.resolve() / name
    fleet = f"guest-{name}-{os.getpid()}-{int(time.time())}"
    coord = Coordinator(CoordinatorConfig(
        broker=broker, fleet=fleet, client_id=f"coord-{fleet}", state_dir=work / "coordinator",
        model_dir=paths["model"], mask=paths["mask"], steps=cfg.steps, lr=2e-3, eps=1e-2, batch_size=16,
        min_clients=1, round_deadline_s=cfg.timeout_s, metrics=False, rounds=cfg.rounds, offline_after_s=600.0,
        sqlite_synchronous="normal",
    ))  # fmt: skip
    ccfg = load_client_config(None, {
        "broker": broker, "fleet": fleet, "client_id": "owner-laptop", "model_dir": str(paths["model"]),
        "mask": str(paths["mask"]), "data": str(paths["task"]), "quant": "nf4", "device": "cpu", "seq_len": 96,
        "memory_budget_gib": 2.0, "state_dir": str(work / "client"), "heartbeat_s": 2.0, "eval_every": 0,
        "policy": policy,
    }, environ={})  # fmt: skip
    sensors = SystemSensors(others=TreeCpu(os.getpid())) if cfg.scope == "tree" else None
    client = EdgeClient(ccfg, EngineTrainer(ccfg), sensors=sensors)
    errors: list[BaseException] = []

    def _guard(target: Any) -> Any:
        def go() -> None:
            try:
                target()
            except BaseException as exc:  # surfaced below
                errors.append(exc)
        return go

    threads = [threading.Thread(target=_guard(coord.run), daemon=True),
               threading.Thread(target=_guard(client.run), daemon=True)]  # fmt: skip
    for t in threads:
        t.start()
    try:
        end = time.monotonic() + cfg.timeout_s
        while client.counters["steps"] < 2:  # the job starts beside a client that is training
            if errors or time.monotonic() > end:
                raise RuntimeError(f"guest bench, {name}: the client never trained ({errors or 'timeout'})")
            time.sleep(0.05)
        s0 = client.counters["steps"]
        times = [runner.run() for _ in range(cfg.jobs)]
        jobs_done, s1 = time.monotonic(), client.counters["steps"]
        busy = coord.last_round < cfg.rounds - 1  # the fleet was still training when the jobs ended
        threads[0].join(max(1.0, end - time.monotonic()))
        done_at = time.monotonic()
    finally:
        client.stop()
        coord.stop()
        for t in threads:
            t.join(30)
    if errors:
        raise RuntimeError(f"guest bench, {name}: {errors[0]!r}")
    results = list(coord.book.results)
    return {
        "policy": policy, "job_s": times, "job_median_s": statistics.median(times), "steps_during_jobs": s1 - s0,
        "fleet_busy_when_jobs_ended": busy, "rounds_done": coord.last_round + 1,
        "empty_rounds": sum(1 for r in results if r.n_clients == 0), "done_after_jobs_s": done_at - jobs_done,
        "policy_pauses": client.counters["policy_pauses"], "steps": client.counters["steps"],
        "trained_share": client.trained_share(),
    }
