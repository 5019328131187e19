"""`meerkat bench fleet`: N simulated devices against a real coordinator process and a real Mosquitto.

    meerkat bench fleet --devices 1000 --rounds 5 --steps 10 --json

What runs: a private Mosquitto on a free loopback port (or --broker), `meerkat coordinator` as its own
process with a generated config (a synthetic model dir + mask, so no real model is needed), and
ceil(N / --per-worker) device processes (bench/fleet/devices.py), each a single asyncio loop holding
thousands of real MQTT connections. The simulator only speaks MQTT + the wire codec, like a device.

What it reports (human lines, then one JSON line with --json):
  ingest_msgs_per_s   updates committed per second by the coordinator while a round's updates arrive
                      (median over rounds; from its Prometheus counter meerkat_updates_accepted, scraped
                      every 0.2 s; `offered_msgs_per_s` is the devices' send rate, for comparison)
  close_latency_*_s   first receipt of result/{r} by any device - send time of the round's last Update
  lost                Updates the broker PUBACKed whose client the coordinator logged fewer updates for
                      (`meerkat status --json`, per client); double_counted: the reverse, plus RoundResult
                      n_clients summed over rounds beyond the updates sent
  coordinator_*       max RSS and CPU of the coordinator process (psutil), broker_* the same for Mosquitto;
                      *_cpu_us_per_msg = that CPU up to the first receipt of the last result (start-up
                      included, the post-run report not) / the messages the coordinator received (same run);
                      *_cpu_us_per_msg_serving = the same less each process's CPU at the first sample, taken
                      once the coordinator's /metrics is up and before any device connected (its start-up:
                      imports, model load, the recovered book = *_cpu_s_ready): both over the same window
  plan_bytes          the largest RoundPlan payload; fanout_bytes_per_round: plan + result bytes the
                      broker delivered to all devices, per closed round
  vp_time_per_round_s apply_round on the nnz values per result (replayed here from the broadcast
                      RoundResults, which also checks every values_checksum)

File descriptors: each device holds one socket here and one in the broker. The bench raises its own
RLIMIT_NOFILE soft limit to the hard limit; the device processes and the private Mosquitto inherit it
(`ulimit -Hn` bounds N; the output says what limit was used).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from bench.cli import add_defaults, add_json_flag, print_json_last
from bench.demo.broker import free_port, port_open
from bench.fleet.devices import DeviceSpec, spec_json


@dataclass(frozen=True)
class FleetConfig:
    devices: int = 1000
    rounds: int = 5
    steps: int = 10
    broker: str | None = None  # None: a private mosquitto on a free loopback port
    workdir: Path = Path("fleet-out")
    per_worker: int = 2500  # devices per simulator process
    nnz: int = 100_000  # masked values (a 1B model at 0.1% has ~1.2M)
    compute_s: float = 1.0  # mean simulated compute time before a sampled device sends its Update
    dropout: float = 0.0  # per sampled device and round: drop the connection when the plan arrives
    outage_s: float = 3.0  # mean time a dropped device stays away
    heartbeat_s: float = 15.0  # edge_client default
    deadline_s: float = 60.0  # coordinator round_deadline_s
    min_frac: float = 0.95  # coordinator min_clients = ceil(min_frac * devices)
    sqlite_synchronous: str = "full"
    broker_max_queued: int = 1000  # deploy/mosquitto/meerkat.conf
    broker_max_inflight: int = 20  # deploy/mosquitto/meerkat.conf
    seed: int = 0
    timeout_s: float = 600.0
    profile: Path | None = None  # cProfile output of the coordinator process
    workers: int = 1  # coordinator processes; > 1: `cluster = true` workers (needs event_log on PostgreSQL)
    event_log: str = "sqlite"  # or a postgresql:// URL: the run gets a fresh schema in it


def add_parser(sub: Any) -> None:
    d = FleetConfig()
    p = sub.add_parser("fleet", help="N simulated MQTT devices vs a real coordinator + mosquitto: ingest, latency, loss",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_defaults(
        p, d,
        ("--devices", "devices", "simulated devices"), ("--rounds", "rounds", "rounds the coordinator runs"),
        ("--steps", "steps", "local steps T per round"),
    )  # fmt: skip
    p.add_argument("--broker", default=None, help="mqtt://host:port (default: a private mosquitto on loopback)")
    add_defaults(
        p, d,
        ("--workdir", "workdir", "configs, state, logs"), ("--per-worker", "per_worker", "devices per process"),
        ("--nnz", "nnz", "masked values of the synthetic model"),
        ("--compute-s", "compute_s", "mean simulated compute before an Update, jittered x0.5..1.5"),
        ("--dropout", "dropout", "probability a sampled device drops its connection per round and comes back"),
        ("--outage-s", "outage_s", "mean outage of a dropout"), ("--heartbeat-s", "heartbeat_s", "heartbeat period"),
        ("--deadline-s", "deadline_s", "round deadline"),
    )  # fmt: skip
    p.add_argument("--sqlite-synchronous", choices=("full", "normal"), default=d.sqlite_synchronous,
                   help="coordinator event-log fsync level (default full, the coordinator's default)")
    add_defaults(
        p, d,
        ("--broker-max-queued", "broker_max_queued", "private mosquitto max_queued_messages, as deploy/ (0 = no limit)"),
        ("--broker-max-inflight", "broker_max_inflight", "private mosquitto max_inflight_messages, as deploy/"),
        ("--seed", "seed", "seed of every simulated draw (shared.prng)"),
        ("--timeout", "timeout_s", "give up after this many seconds"),
    )  # fmt: skip
    p.add_argument("--profile", type=Path, default=None, help="run the coordinator under cProfile, write stats here")
    p.add_argument("--workers", type=int, default=1,
                   help="coordinator worker processes (default 1; > 1 runs them as `cluster = true` workers: "
                        "MQTT 5 shared subscriptions, one leader; needs --event-log postgresql://...)")
    p.add_argument("--event-log", default="sqlite",
                   help="the coordinator's event_log: sqlite (default) or a postgresql:// URL (a fresh schema per run)")
    p.add_argument("--sweep", default=None, metavar="N1,N2,..",
                   help="run once per device count (workdir/N each) and plot latency + memory vs devices")
    p.add_argument("--plot", type=Path, default=Path("fleet-scaling.png"), help="PNG of --sweep (default fleet-scaling.png)")
    add_json_flag(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.devices < 1 or args.rounds < 1 or not 1 <= args.steps <= 100 or not 0 <= args.dropout < 1:
        raise SystemExit("bench fleet: need --devices >= 1, --rounds >= 1, --steps in 1..100, --dropout in [0, 1)")
    cfg = FleetConfig(
        devices=args.devices, rounds=args.rounds, steps=args.steps, broker=args.broker, workdir=args.workdir,
        per_worker=args.per_worker, nnz=args.nnz, compute_s=args.compute_s, dropout=args.dropout,
        outage_s=args.outage_s, heartbeat_s=args.heartbeat_s, deadline_s=args.deadline_s,
        sqlite_synchronous=args.sqlite_synchronous, broker_max_queued=args.broker_max_queued,
        broker_max_inflight=args.broker_max_inflight, seed=args.seed, timeout_s=args.timeout, profile=args.profile,
        workers=args.workers, event_log=args.event_log,
    )
    if args.workers < 1 or (args.workers > 1 and not args.event_log.startswith(("postgresql://", "postgres://"))):
        raise SystemExit("bench fleet: --workers must be >= 1; more than 1 needs --event-log postgresql://...")
    if args.sweep:
        return run_sweep(cfg, [int(n) for n in args.sweep.split(",")], args.plot, args.json)
    try:
        result = run_fleet(cfg)
    except FleetError as exc:
        print(f"bench fleet failed: {exc}", file=sys.stderr)
        return 1
    print_summary(result)
    if args.json:
        print_json_last(result)
    ok = result["all_rounds_closed"] and result["lost"] == 0 and result["double_counted"] == 0
    return 0 if ok else 1


class FleetError(RuntimeError):
    pass


# ------------------------------------------------------------------------------------ synthetic model
def synthetic_model(root: Path, nnz: int, seed: int) -> tuple[Path, Path]:
    """A model dir (config.json + model.safetensors, 4 fp16 square layers) and a gradsq-style mask over it.

    The coordinator needs only the fingerprint, v_0 at the mask and the mask (with grad.* so MEERKAT-VP
    GradIP runs as with a real mask); cached under `root` per (nnz, seed).
    """
    import torch
    from safetensors.torch import save_file

    from shared.fingerprint import fingerprint_model_dir
    from shared.maskfile import Mask, MaskMeta, save_mask
    from shared.prng import derive_seed, raw_u64

    n_layers = 4
    per = [nnz // n_layers + (1 if i < nnz % n_layers else 0) for i in range(n_layers)]
    side = max(64, 2 ** math.ceil(math.log2(math.sqrt(max(per) * 4))))
    model = root / f"model-{nnz}-{seed}"
    mask_path = root / f"model-{nnz}-{seed}.mask.safetensors"
    if (model / "model.safetensors").exists() and mask_path.exists():
        return model, mask_path
    model.mkdir(parents=True, exist_ok=True)

    def floats(s: int, n: int, scale: float) -> torch.Tensor:
        u = (raw_u64(s, n) >> 40).astype("float64") / 2**24 - 0.5
        return torch.from_numpy((u * scale).astype("float32"))

    names = [f"model.layers.{i}.mlp.down_proj" for i in range(n_layers)]
    weights = {f"{n}.weight": floats(derive_seed(seed, 1, i), side * side, 0.1).reshape(side, side).half()
               for i, n in enumerate(names)}
    save_file(weights, str(model / "model.safetensors"))
    (model / "config.json").write_text(json.dumps({"model_type": "meerkat-fleet-synthetic", "layers": n_layers,
                                                   "side": side, "seed": seed}))
    layers, shapes, grad = {}, {}, {}
    for i, n in enumerate(names):
        keys = torch.from_numpy(raw_u64(derive_seed(seed, 2, i), side * side).astype("int64") & 0x7FFFFFFFFFFFFFFF)
        layers[n] = torch.sort(torch.argsort(keys)[: per[i]]).values.to(torch.int64)
        shapes[n] = (side, side)
        grad[n] = floats(derive_seed(seed, 3, i), per[i], 1e-3)
    meta = MaskMeta(1, "synthetic", nnz / (n_layers * side * side), "bench fleet", fingerprint_model_dir(model))
    save_mask(Mask(layers=layers, shapes=shapes, grad=grad, meta=meta), mask_path)
    return model, mask_path


# ------------------------------------------------------------------------------------ processes
def raise_nofile(need: int) -> int:
    """Soft RLIMIT_NOFILE -> hard limit (children inherit it); FleetError when even the hard limit is short."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard < need:
        raise FleetError(f"RLIMIT_NOFILE hard limit {hard} < {need} needed (one socket per device in the broker); "
                         "raise it (ulimit -Hn / limits.conf / systemd LimitNOFILE) or use fewer --devices")
    return hard


def start_broker(cfg: FleetConfig, work: Path) -> tuple[str, subprocess.Popen[bytes] | None]:
    if cfg.broker:
        return cfg.broker, None
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not Path(binary).exists():
        raise FleetError("the `mosquitto` binary is not installed (apt-get install mosquitto) and no --broker given")
    port = free_port()
    conf = work / "mosquitto.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nmax_connections -1\n"
        f"max_queued_messages {cfg.broker_max_queued}\nmax_inflight_messages {cfg.broker_max_inflight}\n"
        "log_type error\nlog_type warning\n"
    )
    proc = subprocess.Popen([binary, "-c", str(conf)], stdout=(work / "mosquitto.log").open("ab"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    _wait_port(port, proc, "mosquitto", work / "mosquitto.log")
    return f"mqtt://127.0.0.1:{port}", proc


def _wait_port(port: int, proc: subprocess.Popen[bytes], what: str, logf: Path, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while not port_open("127.0.0.1", port):
        if proc.poll() is not None or time.monotonic() > end:
            raise FleetError(f"{what} did not start listening on {port}: see {logf}")
        time.sleep(0.05)


def write_coordinator_config(cfg: FleetConfig, work: Path, broker: str, fleet: str, model: Path, mask: Path,
                             metrics_port: int) -> Path:
    from bench.demo.toy import toml_text

    path = work / "coordinator.toml"
    path.write_text("[coordinator]\n" + toml_text({
        "broker": broker, "fleet": fleet, "client_id": f"coord-{fleet}", "state_dir": work / "state",
        "model_dir": model, "mask": mask, "quant": "none", "master_seed": cfg.seed, "rounds": cfg.rounds,
        "steps": cfg.steps, "lr": 1e-4, "eps": 1e-3, "min_clients": max(1, math.ceil(cfg.min_frac * cfg.devices)),
        "round_deadline_s": cfg.deadline_s, "sqlite_synchronous": cfg.sqlite_synchronous, "metrics": True,
        "metrics_port": metrics_port, "checkpoint_every": 10,
        **({"event_log": cfg.event_log} if cfg.event_log != "sqlite" else {}),
        **({"cluster": True, "worker_session_s": 10} if cfg.workers > 1 else {}),
    }))
    return path


def fresh_schema(url: str, name: str) -> str:
    """A new schema `name` in the PostgreSQL database of `url`; the URL that selects it (search_path)."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as db:
        db.execute(f"DROP SCHEMA IF EXISTS {name} CASCADE".encode())
        db.execute(f"CREATE SCHEMA {name}".encode())
    return f"{url}{'&' if '?' in url else '?'}options=-csearch_path%3D{name}"


def _spawn(argv: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, *argv], stdout=log_path.open("ab"), stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)


def _stop(proc: subprocess.Popen[bytes] | None, timeout: float = 10.0) -> int | None:
    if proc is None:
        return None
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    return proc.returncode


# ------------------------------------------------------------------------------------ sampling
class Sampler:
    """psutil RSS/CPU of the coordinator and broker, and the coordinator's update counter, every 0.2 s."""

    def __init__(self, coord_pid: int, broker_pid: int | None, metrics_port: int, more_coords: tuple[int, ...] = ()) -> None:
        import psutil

        self.procs = {"coordinator": psutil.Process(coord_pid)}
        if broker_pid is not None:
            self.procs["broker"] = psutil.Process(broker_pid)
        # --workers K: the other coordinator workers, summed into "coordinator" (RSS and CPU of all K)
        self.more = [psutil.Process(pid) for pid in more_coords]
        self._more_cpu = [0.0] * len(self.more)
        # only the two counters read here: a full scrape also builds the fleet snapshot from the event log
        # (~0.3 s of the coordinator's CPU at 3,000 devices), which 5 scrapes a second would make the bottleneck
        self.url = (f"http://127.0.0.1:{metrics_port}/metrics"
                    "?name[]=meerkat_updates_accepted_total&name[]=meerkat_messages_received_total")
        self.rss: dict[str, list[tuple[float, float]]] = {k: [] for k in self.procs}
        self.cpu: dict[str, float] = {k: 0.0 for k in self.procs}
        self.own_cpu: dict[str, float] = dict(self.cpu)
        self.start = time.time()
        self.ends: dict[str, float] = {}
        self.accepted: list[tuple[float, float]] = []  # (t, meerkat_updates_accepted_total summed)
        self.received = 0.0
        self.cpu_series: list[tuple[float, dict[str, float]]] = []  # (t, cpu) per sample: the CPU at a moment

    def cpu_until(self, t: float) -> dict[str, float]:
        """Each process's CPU seconds at the last sample taken at or before `t` (the run window's end: the
        coordinator's report after the last round, an idle broker afterwards are not the run's messages)."""
        before = [cpu for ts, cpu in self.cpu_series if ts <= t]
        return before[-1] if before else dict(self.cpu)

    def sample(self) -> None:
        now = time.time()
        for name, p in self.procs.items():
            if name in self.ends:
                continue
            try:
                with p.oneshot():
                    self.rss[name].append((now, p.memory_info().rss / 2**20))
                    t = p.cpu_times()
                    self.own_cpu[name] = t.user + t.system
            except Exception:  # exited (psutil.NoSuchProcess / ZombieProcess): keep the last reading
                self.ends[name] = now
        if self.more and "coordinator" not in self.ends:
            rss = self.rss["coordinator"][-1][1] if self.rss["coordinator"] else 0.0
            for i, p in enumerate(self.more):
                try:
                    with p.oneshot():
                        rss += p.memory_info().rss / 2**20
                        t = p.cpu_times()
                        self._more_cpu[i] = t.user + t.system
                except Exception:  # exited: keep its last CPU reading
                    pass
            if self.rss["coordinator"]:
                self.rss["coordinator"][-1] = (now, rss)
        self.cpu = {k: v + (sum(self._more_cpu) if k == "coordinator" else 0.0) for k, v in self.own_cpu.items()}
        self.cpu_series.append((now, dict(self.cpu)))
        try:
            with urllib.request.urlopen(self.url, timeout=1.0) as r:
                text = r.read().decode()
        except OSError:
            return
        acc = sum(_metric(text, "meerkat_updates_accepted_total"))
        self.received = sum(_metric(text, "meerkat_messages_received_total")) or self.received
        self.accepted.append((now, acc))


def _metric(text: str, name: str) -> list[float]:
    return [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name)]


# ------------------------------------------------------------------------------------ the run
def run_fleet(cfg: FleetConfig) -> dict[str, Any]:
    t0 = time.time()
    work = cfg.workdir.resolve()
    for sub in ("state", "logs", "workers"):
        shutil.rmtree(work / sub, ignore_errors=True)
        (work / sub).mkdir(parents=True)
    nofile = raise_nofile(cfg.devices + 256)
    model, mask_path = synthetic_model(work / "model", cfg.nnz, cfg.seed)
    from shared.fingerprint import fingerprint_model_dir
    from shared.maskfile import load_mask

    mask = load_mask(mask_path)
    fingerprint = fingerprint_model_dir(model)
    broker, broker_proc = start_broker(cfg, work)
    fleet = f"fleet-{int(t0)}-{os.getpid()}"
    metrics_port = free_port()
    if cfg.event_log != "sqlite":
        cfg = replace(cfg, event_log=fresh_schema(cfg.event_log, f"bench_{fleet.replace('-', '_')}"))
    coord_cfg = write_coordinator_config(cfg, work, broker, fleet, model, mask_path, metrics_port)
    print(f"fleet {fleet}: {cfg.devices} devices x {cfg.rounds} rounds x {cfg.steps} steps on {broker} "
          f"(RLIMIT_NOFILE raised to {nofile}, inherited by the broker and device processes)", flush=True)
    prof = ["-m", "cProfile", "-o", str(cfg.profile.resolve())] if cfg.profile else []
    coord = _spawn([*prof, "-m", "shared.cli", "coordinator", "--config", str(coord_cfg),
                    *(["--set", "worker_id=w1"] if cfg.workers > 1 else [])], work / "logs" / "coordinator.log")
    more = [_spawn(["-m", "shared.cli", "coordinator", "--config", str(coord_cfg), "--set", f"worker_id=w{k}"],
                   work / "logs" / f"coordinator-w{k}.log") for k in range(2, cfg.workers + 1)]
    workers: list[tuple[subprocess.Popen[bytes], Path]] = []
    host_port = broker.split("://", 1)[1]
    host, port = host_port.rsplit(":", 1)
    stop_at = t0 + cfg.timeout_s
    try:
        _wait_port(metrics_port, coord, "the coordinator's /metrics", work / "logs" / "coordinator.log", 60.0)
        sampler = Sampler(coord.pid, None if broker_proc is None else broker_proc.pid, metrics_port,
                          tuple(m.pid for m in more))
        for k, first in enumerate(range(0, cfg.devices, cfg.per_worker)):
            spec = DeviceSpec(
                host=host, port=int(port), fleet=fleet, first=first, count=min(cfg.per_worker, cfg.devices - first),
                prefix="d", fingerprint=fingerprint, mask_id=mask.mask_id, seed=cfg.seed, rounds=cfg.rounds,
                compute_s=cfg.compute_s, dropout=cfg.dropout, outage_s=cfg.outage_s, heartbeat_s=cfg.heartbeat_s,
                stop_at=stop_at - 15.0, cleanup=cfg.broker is not None,
            )  # fmt: skip
            spec_path = work / "workers" / f"spec-{k}.json"
            spec_path.write_text(spec_json(spec))
            out = work / "workers" / f"out-{k}.json"
            workers.append((_spawn(["-m", "bench.fleet.devices", str(spec_path), str(out)],
                                   work / "logs" / f"worker-{k}.log"), out))
        while time.time() < stop_at:
            sampler.sample()
            if coord.poll() is not None and all(w.poll() is not None for w, _ in workers) and all(
                    m.poll() is not None for m in more):
                break
            if coord.poll() is not None and coord.returncode != 0:
                raise FleetError(f"coordinator exited with {coord.returncode}; see {work / 'logs' / 'coordinator.log'}")
            time.sleep(0.2)
        timed_out = time.time() >= stop_at
        coord_rc = _stop(coord, 30.0)
        for m in more:
            coord_rc = coord_rc or _stop(m, 30.0)
        for w, _ in workers:
            _stop(w)
        sampler.sample()
    finally:
        _stop(coord, 30.0)
        for m in more:
            _stop(m, 30.0)
        for w, _ in workers:
            _stop(w)
        broker_cpu_s = sampler.cpu.get("broker") if "sampler" in locals() else None
        _stop(broker_proc)
    outs = [json.loads(p.read_text()) for _, p in workers if p.exists()]
    if len(outs) != len(workers):
        raise FleetError(f"{len(workers) - len(outs)} device processes wrote no report; see {work / 'logs'}")
    status = (_status("--state-dir", str(work / "state")) if cfg.event_log == "sqlite"
              else _status("--config", str(coord_cfg)))
    return build_result(cfg, outs, status, sampler, mask, coord_rc, timed_out, nofile, time.time() - t0,
                        broker_cpu_s)


def _status(*where: str) -> dict[str, Any]:
    """The coordinator's own account of what it logged, through the public `meerkat status --json`:
    `where` is `--state-dir DIR` (SQLite) or `--config FILE` (the log the config names: PostgreSQL)."""
    r = subprocess.run([sys.executable, "-m", "shared.cli", "status", *where, "--json"],
                       capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        raise FleetError(f"meerkat status failed: {r.stderr.strip()}")
    return dict(json.loads(r.stdout))


# ------------------------------------------------------------------------------------ the numbers
def _pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


def ingest_rates(accepted: list[tuple[float, float]], windows: dict[int, tuple[float, float]]) -> dict[int, float]:
    """Per round: updates committed / time from the first to the last increase of the counter in its window."""
    rates = {}
    for r, (lo, hi) in windows.items():
        pts = [(t, v) for t, v in accepted if lo - 0.2 <= t <= hi + 0.2]
        if len(pts) < 2 or pts[-1][1] <= pts[0][1]:
            continue
        base, top = pts[0][1], pts[-1][1]
        lo_v, hi_v = base + 0.05 * (top - base), base + 0.95 * (top - base)  # the bulk: dropouts' late
        t_first = next(t for t, v in pts if v > lo_v)  # updates after an outage would stretch the window
        t_last = next(t for t, v in pts if v >= hi_v)
        prev = max((t for t, v in pts if t < t_first), default=t_first - 0.2)
        v_prev = max((v for t, v in pts if t <= prev), default=base)
        v_last = next(v for t, v in pts if t >= t_last)
        rates[r] = (v_last - v_prev) / max(t_last - prev, 0.2)  # the first increase started after `prev`
    return rates


def vp_replay(mask: Any, payloads: dict[int, str], model: Path) -> tuple[list[float], bool]:
    """apply_round per broadcast result from v_0, timed; True when every values_checksum matches."""
    from shared.apply import apply_round, values_checksum
    from shared.codec import decode
    from shared.messages import RoundResult
    from shared.sidecar import initial_values_from_dir

    values = initial_values_from_dir(model, mask.layers)
    times, ok = [], True
    for r in sorted(payloads):
        res = decode(bytes.fromhex(payloads[r]), RoundResult)
        t = time.perf_counter()
        values = apply_round(values, res.seeds, res.scalars, res.lr, res.dist)
        times.append(time.perf_counter() - t)
        ok = ok and values_checksum(values) == res.values_checksum
    return times, ok


def lost_and_double(sent: dict[str, int], acked: dict[str, int], logged: dict[str, int],
                    n_results: int) -> tuple[int, int]:
    """Ground truth vs the coordinator's log, per client.

    lost: updates the broker PUBACKed (so the device may forget them) beyond what the coordinator logged
    for that client. double counted: logged beyond what the client ever sent (a re-send of the same msg_id
    counted twice), updates logged for ids no device used, and RoundResult n_clients summed over all
    rounds beyond the updates sent.
    """
    lost = sum(max(0, acked[c] - logged.get(c, 0)) for c in acked)
    over = sum(max(0, logged.get(c, 0) - sent.get(c, 0)) for c in set(logged) | set(sent))
    return lost, over + max(0, n_results - sum(sent.values()))


def build_result(cfg: FleetConfig, outs: list[dict[str, Any]], status: dict[str, Any], sampler: Sampler, mask: Any,
                 coord_rc: int | None, timed_out: bool, nofile: int, wall_s: float,
                 broker_cpu_s: float | None) -> dict[str, Any]:
    devices: dict[str, Any] = {}
    for o in outs:
        devices.update(o["devices"])
    logged = {c["client"]: int(c["updates"]) for c in status["clients"]}
    sent = {cid: len(d["sent"]) for cid, d in devices.items()}
    acked = {cid: sum(1 for e in d["sent"] if e[3] is not None) for cid, d in devices.items()}

    def merged(key: str) -> dict[int, list[float]]:
        out: dict[int, list[float]] = {}
        for o in outs:
            for r, (first, last, val) in o[key].items():
                cur = out.setdefault(int(r), [first, last, 0.0])
                cur[0], cur[1] = min(cur[0], first), max(cur[1], last)
                cur[2] = cur[2] + val if key == "plans" else val
        return out

    plans, results = merged("plans"), merged("results")
    payloads: dict[int, str] = {}
    for o in outs:
        payloads.update({int(r): p for r, p in o["result_payloads"].items()})
    sends: dict[int, list[float]] = {}
    for d in devices.values():
        for r, _mid, t_send, _t_ack in d["sent"]:
            sends.setdefault(r, []).append(t_send)
    n_results = sum(int(v[2]) for v in results.values())
    lost, over = lost_and_double(sent, acked, logged, n_results)
    latency = {r: results[r][0] - max(sends[r]) for r in results if r in sends}
    windows = {r: (plans[r][0], results[r][0]) for r in results if r in plans}
    rates = ingest_rates(sampler.accepted, windows)
    offered = {r: _bulk_rate(ts) for r, ts in sends.items() if len(ts) > 1}
    vp_times, vp_ok = vp_replay(mask, payloads, cfg.workdir.resolve() / "model" / f"model-{cfg.nnz}-{cfg.seed}")
    coord_wall = sampler.ends.get("coordinator", time.time()) - sampler.start
    broker_wall = time.time() - sampler.start
    rss = {k: max((v for _, v in xs), default=None) for k, xs in sampler.rss.items()}
    # the run's CPU: up to the first receipt of the last result + one sample period (start-up included; the
    # coordinator's run report after the last round and the broker idling afterwards are not per message)
    run_cpu = sampler.cpu_until(max(v[0] for v in results.values()) + 0.4) if results else dict(sampler.cpu)
    # the serving window of both processes: from the first sample (the coordinator's /metrics is up, so its
    # imports, model load and recovered book are done; the devices are only being started) to the same end
    ready_cpu = sampler.cpu_series[0][1] if sampler.cpu_series else {}
    serving = {k: v - ready_cpu.get(k, 0.0) for k, v in run_cpu.items()}
    per_round = [{
        "round": r, "n_clients": int(results[r][2]), "updates_sent": len(sends.get(r, [])),
        "close_latency_s": _round(latency.get(r)), "ingest_msgs_per_s": _round(rates.get(r), 0),
        "offered_msgs_per_s": _round(offered.get(r), 0), "plan_fanout_s": _round(plans[r][1] - plans[r][0]) if r in plans else None,
        "round_s": _round(results[r][0] - plans[r][0]) if r in plans else None,
    } for r in sorted(results)]  # fmt: skip
    return {
        "devices": cfg.devices, "rounds": cfg.rounds, "steps": cfg.steps, "nnz": mask.nnz,
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
        "rounds_closed": len(results), "all_rounds_closed": len(results) == cfg.rounds and coord_rc == 0,
        "coordinator_exit": coord_rc, "timed_out": timed_out,
        "ingest_msgs_per_s": _round(statistics.median(rates.values()), 0) if rates else None,
        "ingest_msgs_per_s_max": _round(max(rates.values()), 0) if rates else None,
        "offered_msgs_per_s": _round(statistics.median(offered.values()), 0) if offered else None,
        "close_latency_p50_s": _round(_pct(list(latency.values()), 0.5)),
        "close_latency_p99_s": _round(_pct(list(latency.values()), 0.99)),
        "lost": lost, "double_counted": over,
        "updates_sent": sum(sent.values()), "updates_acked": sum(acked.values()),
        "updates_logged": sum(logged.get(c, 0) for c in devices), "n_clients_in_results": n_results,
        "coordinator_rss_mib": _round(rss.get("coordinator"), 1),
        "coordinator_cpu_s": _round(sampler.cpu["coordinator"], 1),
        "coordinator_cpu_pct": _round(100 * sampler.cpu["coordinator"] / max(coord_wall, 1e-3), 1),
        "broker_rss_mib": _round(rss.get("broker"), 1),
        "broker_cpu_s": _round(broker_cpu_s, 1),
        "broker_cpu_pct": None if broker_cpu_s is None else _round(100 * broker_cpu_s / max(broker_wall, 1e-3), 1),
        "sim_cpu_s": _round(sum(o["cpu_s"] for o in outs), 1),
        "sim_max_rss_mib": _round(max(o["max_rss_mib"] for o in outs), 1),
        "messages_received": int(sampler.received),
        "vp_time_per_round_s": _round(statistics.mean(vp_times), 4) if vp_times else None,
        "vp_checksums_ok": vp_ok and len(vp_times) == len(results),
        "plan_bytes": max(o["plan_bytes"] for o in outs),
        "fanout_bytes_per_round": _round(sum(o["fanout_bytes"] for o in outs) / max(1, len(results)), 0),
        "coordinator_cpu_s_run": _round(run_cpu.get("coordinator"), 1),
        "broker_cpu_s_run": _round(run_cpu.get("broker"), 1),
        "coordinator_cpu_us_per_msg": _per_msg(run_cpu.get("coordinator"), sampler.received),
        "broker_cpu_us_per_msg": _per_msg(run_cpu.get("broker"), sampler.received),
        "coordinator_cpu_s_ready": _round(ready_cpu.get("coordinator"), 2),
        "broker_cpu_s_ready": _round(ready_cpu.get("broker"), 2),
        "coordinator_cpu_us_per_msg_serving": _per_msg(serving.get("coordinator"), sampler.received),
        "broker_cpu_us_per_msg_serving": _per_msg(serving.get("broker"), sampler.received),
        "rejected": status.get("rejected", {}), "device_errors": _sum_dicts([o["errors"] for o in outs]),
        "connect_failures": sum(o["connect_failures"] for o in outs),
        "reconnects": sum(d["reconnects"] for d in devices.values()),
        "nofile_limit": nofile, "load_avg": [round(x, 2) for x in os.getloadavg()], "cpus": os.cpu_count(),
        "wall_s": round(wall_s, 1), "per_round": per_round,
        **soak_slopes(latency, {r: results[r][0] for r in results}, sampler.rss.get("coordinator", [])),
    }  # fmt: skip


def _per_msg(cpu_s: float | None, messages: float) -> float | None:
    """CPU microseconds per message the coordinator received: the same denominator for the coordinator and
    the broker (which also fans plans and results out), so the two compare as in issue 31's goal."""
    return None if cpu_s is None or messages <= 0 else _round(1e6 * cpu_s / messages, 1)


def soak_slopes(latency: dict[int, float], closed_at: dict[int, float],
                rss: list[tuple[float, float]]) -> dict[str, Any]:
    """Least-squares slopes per 100 rounds of the close latency and of the coordinator's RSS at each
    round's close, over the rounds after the first 10 % (start-up: imports, caches, the fleet joining).
    Flat = a run of any length costs the same per round (the soak: 1,000 devices x 500 rounds)."""
    rounds = sorted(closed_at)
    if len(rounds) < 10:
        return {"close_latency_slope_s_per_100_rounds": None, "coordinator_rss_slope_mib_per_100_rounds": None}
    keep = rounds[len(rounds) // 10 :]
    lat = [(r, latency[r]) for r in keep if r in latency]
    mem = []
    for r in keep:  # the last RSS sample at or before the round's result
        before = [v for t, v in rss if t <= closed_at[r]]
        if before:
            mem.append((r, before[-1]))

    def slope(pts: list[tuple[int, float]]) -> float | None:
        if len(pts) < 3:
            return None
        return _round(100 * statistics.linear_regression([float(x) for x, _ in pts], [y for _, y in pts]).slope, 4)

    return {"close_latency_slope_s_per_100_rounds": slope(lat), "coordinator_rss_slope_mib_per_100_rounds": slope(mem),
            "coordinator_rss_first_last_mib": [_round(mem[0][1], 1), _round(mem[-1][1], 1)] if mem else None}  # fmt: skip


def _bulk_rate(ts: list[float]) -> float:
    """Sends per second over the central 90% of a round's send times (dropouts' late re-sends excluded)."""
    s = sorted(ts)
    lo, hi = s[int(0.05 * (len(s) - 1))], s[int(0.95 * (len(s) - 1))]
    return 0.9 * len(s) / max(hi - lo, 1e-3)


def _round(x: float | None, nd: int = 3) -> float | None:
    return None if x is None else round(float(x), nd)


def _sum_dicts(ds: list[dict[str, int]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for d in ds:
        for k, v in d.items():
            out[k] = out.get(k, 0) + v
    return out


def print_summary(r: dict[str, Any]) -> None:
    print(f"{'round':>5} {'clients':>7} {'sent':>6} {'close s':>8} {'ingest/s':>9} {'offered/s':>9} {'plan fan-out s':>14}")
    for row in r["per_round"]:
        print(f"{row['round']:>5} {row['n_clients']:>7} {row['updates_sent']:>6} {_f(row['close_latency_s']):>8} "
              f"{_f(row['ingest_msgs_per_s']):>9} {_f(row['offered_msgs_per_s']):>9} {_f(row['plan_fanout_s']):>14}")
    print(f"rounds closed {r['rounds_closed']}/{r['rounds']}; updates sent {r['updates_sent']}, acked "
          f"{r['updates_acked']}, logged {r['updates_logged']}; lost {r['lost']}, double counted {r['double_counted']}")
    print(f"ingest {_f(r['ingest_msgs_per_s'])} msg/s (median over rounds; offered {_f(r['offered_msgs_per_s'])}); "
          f"close latency p50 {_f(r['close_latency_p50_s'])} s, p99 {_f(r['close_latency_p99_s'])} s")
    print(f"coordinator: max RSS {_f(r['coordinator_rss_mib'])} MiB, CPU {_f(r['coordinator_cpu_pct'])}% "
          f"({_f(r['coordinator_cpu_s'])} s); broker: max RSS {_f(r['broker_rss_mib'])} MiB, CPU "
          f"{_f(r['broker_cpu_pct'])}%; simulator CPU {_f(r['sim_cpu_s'])} s")
    print(f"CPU per message received: coordinator {_f(r['coordinator_cpu_us_per_msg'])} us, broker "
          f"{_f(r['broker_cpu_us_per_msg'])} us; fan-out {_f(r['fanout_bytes_per_round'])} bytes per round")
    print(f"  serving window (start-up out: coordinator {_f(r['coordinator_cpu_s_ready'])} s, broker "
          f"{_f(r['broker_cpu_s_ready'])} s): coordinator {_f(r['coordinator_cpu_us_per_msg_serving'])} us, broker "
          f"{_f(r['broker_cpu_us_per_msg_serving'])} us")
    print(f"VP apply_round {_f(r['vp_time_per_round_s'])} s/round on {r['nnz']} values, checksums ok: "
          f"{r['vp_checksums_ok']}; plan payload {r['plan_bytes']} bytes; load avg {r['load_avg']} on {r['cpus']} CPUs; "
          f"RLIMIT_NOFILE {r['nofile_limit']}; wall {r['wall_s']} s")
    if r.get("close_latency_slope_s_per_100_rounds") is not None:
        print(f"soak slopes per 100 rounds (after the first 10 %): close latency "
              f"{_f(r['close_latency_slope_s_per_100_rounds'])} s, coordinator RSS "
              f"{_f(r['coordinator_rss_slope_mib_per_100_rounds'])} MiB (first/last {r['coordinator_rss_first_last_mib']})")


def _f(x: Any) -> str:
    return "-" if x is None else f"{x:g}"


def run_sweep(cfg: FleetConfig, counts: list[int], plot: Path, as_json: bool) -> int:
    """One run per device count (in workdir/N), then latency and memory vs devices in one PNG."""
    from dataclasses import replace

    results = []
    for n in counts:
        try:
            res = run_fleet(replace(cfg, devices=n, workdir=cfg.workdir / str(n)))
        except FleetError as exc:
            print(f"bench fleet ({n} devices) failed: {exc}", file=sys.stderr)
            return 1
        print_summary(res)
        results.append(res)
    plot_scaling(results, plot)
    if as_json:
        print_json_last({"sweep": results, "plot": str(plot)})
    return 0 if all(r["all_rounds_closed"] and r["lost"] == 0 and r["double_counted"] == 0 for r in results) else 1


def plot_scaling(results: list[dict[str, Any]], path: Path) -> None:
    """Close latency (p50/p99), ingest rate and coordinator/broker RSS vs devices."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = [r["devices"] for r in results]
    fig, ax = plt.subplots(1, 3, figsize=(12, 3.4))
    ax[0].plot(n, [r["close_latency_p50_s"] for r in results], marker="o", label="p50")
    ax[0].plot(n, [r["close_latency_p99_s"] for r in results], marker="o", label="p99")
    ax[0].axhline(2.0, color="grey", ls="--", lw=0.8, label="target p99 2 s")
    ax[0].set_ylabel("close latency after last update (s)")
    ax[1].plot(n, [r["ingest_msgs_per_s"] for r in results], marker="o", label="ingest (coordinator)")
    ax[1].plot(n, [r["offered_msgs_per_s"] for r in results], marker="o", label="offered (devices)")
    ax[1].axhline(10_000, color="grey", ls="--", lw=0.8, label="target 10k msg/s")
    ax[1].set_ylabel("updates / s")
    ax[2].plot(n, [r["coordinator_rss_mib"] for r in results], marker="o", label="coordinator")
    ax[2].plot(n, [r["broker_rss_mib"] for r in results], marker="o", label="mosquitto")
    ax[2].set_ylabel("max RSS (MiB)")
    for a in ax:
        a.set_xscale("log")
        a.set_xlabel("devices")
        a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
