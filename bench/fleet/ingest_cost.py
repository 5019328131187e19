"""CPU per message of the coordinator process, phase by phase (docs/SCALING.md "Where the time goes").

    python -m bench.fleet.ingest_cost --clients 3000 --steps 10 [--json]

The coordinator runs in THIS process, with its real MQTT link (paho thread, manual ack), SQLite event log
(`synchronous = full`), /metrics and a synthetic model + mask (bench/fleet/fleet.py, MEERKAT-VP on). One
publisher process (bench/fleet/mqttlite.py, one connection that publishes for every client id) sends each
phase only when told to, so the CPU time (`time.process_time`: every thread of this process) between
"go" and "all of the phase's messages handled" belongs to that phase alone. Unlike a wall-clock rate it
barely depends on what else loads the machine: it is the cost, not the speed.

Phases: Join + Status(online) per client (and the plan the round book then publishes); a first
Heartbeat per client (written at once); a second one (held and written in a batch), all at once; a third
one, `hb_steady`, paced at --hb-rate (a fleet's heartbeats come one by one, not in a burst: this phase
includes the per-message wake-ups of both threads); one Update per client (the round closes when the
last one is in).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

PHASES = ("join", "hb_first", "hb", "hb_steady", "up")
HB_RATE = 10_000 / 15  # hb_steady's heartbeats per second: 10,000 devices at the client's heartbeat_s 15


# ------------------------------------------------------------------------------------ publisher process
async def _publish(spec: dict[str, Any]) -> None:
    from bench.fleet.devices import gaussian_grads
    from bench.fleet.mqttlite import open_client
    from shared.codec import decode, encode
    from shared.fingerprint import fp_tag
    from shared.messages import Heartbeat, Join, RoundPlan, Status, Update
    from shared.sampling import plan_steps
    from shared.topics import Topics

    t = Topics(spec["fleet"])
    ids = [f"d{i:05d}" for i in range(spec["clients"])]
    plans: list[RoundPlan] = []

    def on_message(topic: str, payload: bytes) -> None:
        if payload:
            m = decode(payload)
            if isinstance(m, RoundPlan):
                plans.append(m)

    c = await open_client(spec["host"], spec["port"], "ingest-cost-pub", on_message, clean=True)
    await c.subscribe([(t.plan, 1)])
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    for phase in PHASES:
        await reader.readline()  # "go"
        now = time.time()
        if phase == "join":
            for cid in ids:
                c.publish(t.status(cid), encode(Status("", True, now)), 1, True)
                c.publish(t.join(cid), encode(Join("", spec["fingerprint"], spec["mask_id"], 100, 2.0, {"compact_plan": True}, -1)), 1)
        elif phase in ("hb_first", "hb", "hb_steady"):
            t0, rate = time.monotonic(), spec["hb_rate"]
            for i, cid in enumerate(ids):
                hb = Heartbeat("", now, 3.0, 200 << 20, None, 45.0, 5.0, 0.5, 300 << 20, -1)
                c.publish(t.hb(cid), encode(hb), 0)
                if phase == "hb_steady" and (ahead := t0 + (i + 1) / rate - time.monotonic()) > 0.001:
                    await asyncio.sleep(ahead)  # one at a time, as a fleet's heartbeats come
        else:
            while not plans:
                await asyncio.sleep(0.05)
            plan, tag = plans[-1], fp_tag(spec["fingerprint"])
            for i, cid in enumerate(ids):
                grads = gaussian_grads(spec["seed"], i, plan.round, plan_steps(plan, cid), 1.0)
                c.publish(t.up(cid), encode(Update(plan.round, i + 1, grads, 100, tag, 2.0)), 1)
        await asyncio.sleep(0)
    await asyncio.sleep(0.5)
    c.disconnect()


# ------------------------------------------------------------------------------------ coordinator side
def _thread_cpu() -> dict[str, float]:
    """CPU seconds per thread of this process, by role: the paho network thread, the pump (main), other."""
    import os
    import threading

    names = {t.native_id: t.name for t in threading.enumerate()}
    tick = os.sysconf("SC_CLK_TCK")
    out = {"paho": 0.0, "pump": 0.0, "other": 0.0}
    for tid in os.listdir("/proc/self/task"):
        try:
            stat = Path(f"/proc/self/task/{tid}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        cpu = (int(fields[11]) + int(fields[12])) / tick  # utime + stime
        name = names.get(int(tid), "")
        role = "pump" if int(tid) == os.getpid() else "paho" if name.startswith("paho") else "other"
        out[role] += cpu
    return out


def _count(coord: Any, phase: str) -> float:
    m = coord.metrics
    if phase == "up":
        return float(m.updates_accepted.labels("accepted")._value.get())
    if phase == "join":
        return float(m.messages.labels("join")._value.get() + m.messages.labels("status")._value.get())
    return float(m.messages.labels("hb")._value.get())


def measure(clients: int, steps: int, seed: int = 0, work: Path | None = None,
            profile: tuple[str, Path] | None = None, hb_rate: float = HB_RATE) -> dict[str, Any]:
    """CPU per message of each phase; `profile` = (phase, path): cProfile of the pump thread in that phase."""
    import torch

    from bench.demo.broker import free_port
    from bench.fleet.fleet import FleetConfig, start_broker, synthetic_model, write_coordinator_config
    from coordinator.config import load_coordinator_config
    from coordinator.server import Coordinator
    from coordinator.server_cli import settle_heap
    from shared.fingerprint import fingerprint_model_dir
    from shared.maskfile import load_mask

    own = work is None
    work = Path(tempfile.mkdtemp(prefix="ingest-cost-")) if work is None else work
    cfg = FleetConfig(devices=clients, rounds=3, steps=steps, workdir=work, min_frac=1.0, broker_max_queued=0,
                      seed=seed, heartbeat_s=3600.0)
    model, mask_path = synthetic_model(work / "model", cfg.nnz, seed)
    broker, broker_proc = start_broker(cfg, work)
    fleet = "ingestcost"
    conf = write_coordinator_config(cfg, work, broker, fleet, model, mask_path, free_port())
    coord = Coordinator(load_coordinator_config(conf))
    torch.set_num_threads(1)  # as bench/fleet/fleet.py runs the coordinator (OMP_NUM_THREADS=1)
    settle_heap()  # as `meerkat coordinator` does before it serves
    host, port = broker.split("://", 1)[1].rsplit(":", 1)
    spec = {"host": host, "port": int(port), "fleet": fleet, "clients": clients, "seed": seed, "hb_rate": hb_rate,
            "fingerprint": fingerprint_model_dir(model), "mask_id": load_mask(mask_path).mask_id}
    pub = subprocess.Popen([sys.executable, "-m", "bench.fleet.ingest_cost", "--publisher", json.dumps(spec)],
                           stdin=subprocess.PIPE)
    out: dict[str, Any] = {"clients": clients, "steps": steps}
    try:
        coord.start()
        assert coord.link is not None
        if not coord.link.wait_connected(20):
            raise RuntimeError("coordinator did not connect to the private broker")
        for phase in PHASES:
            want = (2 if phase == "join" else 1) * clients
            base = _count(coord, phase)
            prof = cProfile.Profile() if profile is not None and profile[0] == phase else None
            t_cpu, t_wall, threads = time.process_time(), time.monotonic(), _thread_cpu()
            if prof is not None:
                prof.enable()
            assert pub.stdin is not None
            pub.stdin.write(b"go\n")
            pub.stdin.flush()
            while _count(coord, phase) - base < want:
                coord.step(0.05)
                if time.monotonic() - t_wall > 300:
                    raise RuntimeError(f"phase {phase}: {_count(coord, phase) - base:.0f} of {want} after 300 s")
            coord.step(0.0)  # the batch that closes the round
            if phase in ("hb", "hb_steady"):
                coord.flush_heartbeats()  # the held heartbeats' write belongs to this phase
            cpu = time.process_time() - t_cpu
            if prof is not None and profile is not None:
                prof.disable()
                prof.dump_stats(str(profile[1]))
            by_thread = {k: round(1e6 * (v - threads[k]) / want, 1) for k, v in _thread_cpu().items()}
            out[phase] = {"messages": want, "cpu_s": round(cpu, 3), "cpu_us_per_msg": round(1e6 * cpu / want, 1),
                          "us_per_msg_by_thread": by_thread, "wall_s": round(time.monotonic() - t_wall, 3)}
        coord.flush_heartbeats()
    finally:
        pub.wait(30)
        coord.close()
        if broker_proc is not None:
            broker_proc.terminate()
            broker_proc.wait(10)
        if own:
            shutil.rmtree(work, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=3000, help="simulated clients (default 3000)")
    p.add_argument("--steps", type=int, default=10, help="local steps T, grads per Update (default 10)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hb-rate", type=float, default=HB_RATE,
                   help=f"heartbeats per second in the hb_steady phase (default {HB_RATE:.0f}: 10,000 devices at 15 s)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON line")
    p.add_argument("--profile", nargs=2, metavar=("PHASE", "OUT"), default=None,
                   help=f"cProfile the pump thread during one phase ({', '.join(PHASES)}) into OUT")
    p.add_argument("--publisher", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.publisher is not None:
        asyncio.run(_publish(json.loads(args.publisher)))
        return 0
    if args.profile is not None and args.profile[0] not in PHASES:
        p.error(f"--profile: the phase must be one of {', '.join(PHASES)}, got {args.profile[0]!r}")
    res = measure(args.clients, args.steps, args.seed, hb_rate=args.hb_rate,
                  profile=None if args.profile is None else (args.profile[0], Path(args.profile[1])))
    for phase in PHASES:
        r = res[phase]
        th = "  ".join(f"{k} {v:.0f}" for k, v in r["us_per_msg_by_thread"].items())
        print(f"{phase:9s} {r['messages']:7d} msgs  {r['cpu_us_per_msg']:7.1f} us CPU/msg  ({th}; wall {r['wall_s']} s)")
    if args.json:
        print(json.dumps(res, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
