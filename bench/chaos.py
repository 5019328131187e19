"""`meerkat bench chaos`: fault injection on a real fleet (docs/RELIABILITY.md).

A private Mosquitto (the persistence settings of deploy/mosquitto/meerkat.conf, or none at all), the real
coordinator (`meerkat coordinator`) and 3 real `meerkat client` processes on a tiny model, all SIGKILLable.
A scenario injects its faults while the fleet runs `rounds` rounds; then the run is checked:

- every round closed (the coordinator's `results`),
- 0 lost: every Update a client published (its log line "update for round r ... published" comes after the
  outbox commit) is in the coordinator's `updates` as `accepted` or `folded` (not missing, not `dropped`),
- 0 counted twice: one row per (client, round) (the primary key) and each result's `n_clients` equals the
  distinct clients of the rows it used,
- equal checksums: every client ends at the last round with the coordinator's values checksum.

Recovery time of a fault = from the restart of what was killed to the next round closed.
The tiny model comes from bench/demo/toy.py (built in a second, never downloaded).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.cli import add_defaults, add_json_flag
from bench.demo.broker import free_port, port_open
from bench.demo.toy import build_toy, toml_text
from coordinator.eventlog import DB_NAME, EventLog

REPO = Path(__file__).resolve().parents[1]
DEPLOY_CONF = REPO / "deploy" / "mosquitto" / "meerkat.conf"
BROKER_MODES = ("deploy", "amnesic")
SCENARIOS = ("baseline", "client_kill", "coordinator_kill", "broker_kill", "host_crash", "device_down", "storm")


def deploy_persistence() -> str:
    """The persistence lines of the shipped broker config (so the run uses exactly what deploy/ ships)."""
    keep = ("persistence ", "autosave_interval", "autosave_on_changes", "persistent_client_expiration")
    lines = [ln.strip() for ln in DEPLOY_CONF.read_text().splitlines() if ln.strip().startswith(keep)]
    return "\n".join(ln for ln in lines if not ln.startswith("persistence_location"))


class Broker:
    """A private mosquitto. mode "deploy": deploy/'s persistence settings; "amnesic": nothing survives."""

    def __init__(self, workdir: Path, mode: str) -> None:
        self.binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.workdir, self.mode, self.port = workdir, mode, free_port()
        self.store = workdir / "store"
        self.store.mkdir(parents=True, exist_ok=True)
        persist = deploy_persistence() if mode == "deploy" else "persistence false"
        self.conf = workdir / "mosquitto.conf"
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\n{persist}\n"
            f"persistence_location {self.store}/\nmax_queued_messages 1000\nmax_inflight_messages 20\n"
        )
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> None:
        log = (self.workdir / "mosquitto.log").open("ab")
        self.proc = subprocess.Popen([self.binary, "-c", str(self.conf)], stdout=log, stderr=subprocess.STDOUT)
        end = time.monotonic() + 10
        while not port_open("127.0.0.1", self.port):
            if self.proc.poll() is not None or time.monotonic() > end:
                raise RuntimeError(f"mosquitto did not start: {self.workdir / 'mosquitto.log'}")
            time.sleep(0.05)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        if self.mode == "amnesic":  # belt and braces: nothing of the old broker may come back
            for p in self.store.glob("*"):
                p.unlink()


class Proc:
    """A `meerkat ...` subprocess with its log in a file (appended across restarts)."""

    def __init__(self, args: list[str], log: Path) -> None:
        self.args, self.log = args, log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Proc:
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
        self.proc = subprocess.Popen([sys.executable, "-m", "shared.cli", *self.args], cwd=REPO, env=env,
                                     stdout=self.log.open("ab"), stderr=subprocess.STDOUT)  # fmt: skip
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _signal(self, sig: signal.Signals) -> bool:
        """Send `sig` if the process is alive; whether it was."""
        if not self.alive():
            return False
        assert self.proc is not None
        self.proc.send_signal(sig)
        return True

    def kill(self) -> None:
        if self._signal(signal.SIGKILL):
            assert self.proc is not None
            self.proc.wait(10)

    def pause(self) -> None:
        """SIGSTOP: the process holds still (its broker link stays up for keepalive x 1.5 = 45 s)."""
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)

    def terminate(self, timeout: float = 30.0) -> int | None:
        if not self.alive():
            return None if self.proc is None else self.proc.returncode
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@dataclass
class Fleet:
    """Broker + coordinator + clients of one run, and read-only views of their state."""

    workdir: Path
    broker_mode: str
    rounds: int
    n_clients: int = 3
    steps: int = 24  # local SPSA steps per round: a round lasts long enough (~2 s) to kill it mid-way
    deadline_s: float = 20.0
    toy: Any = None
    broker: Broker = field(init=False)
    coord: Proc = field(init=False)
    clients: list[Proc] = field(default_factory=list)
    client_ids: list[str] = field(default_factory=list)
    faults: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        w = self.workdir
        w.mkdir(parents=True, exist_ok=True)
        if self.toy is None:
            self.toy = build_toy(w / "toy")
        self.broker = Broker(w / "broker", self.broker_mode)
        fleet = f"chaos{os.getpid()}"
        coord_conf = w / "coordinator.toml"
        coord_conf.write_text(toml_text(dict(
            broker=self.broker.url, fleet=fleet, client_id="coordinator", state_dir=str(w / "coord"),
            model_dir=str(self.toy.model_dir), mask=str(self.toy.mask_path), steps=self.steps, lr=1e-3, eps=1e-2,
            batch_size=4, min_clients=2, min_updates=2, round_deadline_s=self.deadline_s, metrics=False,
            offline_after_s=6.0, rounds=self.rounds, checkpoint_every=5,
        )))  # fmt: skip
        self.coord = Proc(["coordinator", "--config", str(coord_conf)], w / "coordinator.log")
        for i in range(self.n_clients):
            cid = f"dev{i}"
            conf = w / f"{cid}.toml"
            conf.write_text(toml_text(dict(
                broker=self.broker.url, fleet=fleet, client_id=cid, model_dir=str(self.toy.model_dir),
                mask=str(self.toy.mask_path), data=str(self.toy.data_path), quant="nf4", device="cpu",
                seq_len=32, memory_budget_gib=2.0, state_dir=str(w / cid), heartbeat_s=1.0, sync_retry_s=2.0,
                resend_after_s=5.0, log_level="INFO",
                policy={"enabled": False},  # one machine for the whole fleet: the others' steps are no owner's load
            )))  # fmt: skip
            self.client_ids.append(cid)
            self.clients.append(Proc(["client", "--config", str(conf)], w / f"{cid}.log"))

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        self.broker.start()
        self.coord.start()
        for c in self.clients:
            c.start()

    def stop(self) -> None:
        for c in self.clients:
            c.terminate()
        self.coord.kill()
        self.broker.kill()

    # -- views -----------------------------------------------------------------------------------
    def _coord_log(self) -> EventLog | None:
        """The coordinator's event log, read-only (None while it does not exist or is being created)."""
        if not (self.workdir / "coord" / DB_NAME).exists():
            return None
        try:
            return EventLog(self.workdir / "coord", readonly=True)
        except sqlite3.OperationalError:
            return None

    def closed(self) -> int:
        """Rounds closed so far (the coordinator's results)."""
        log = self._coord_log()
        if log is None:
            return 0
        try:
            return log.views.last_result_round() + 1
        except sqlite3.OperationalError:
            return 0
        finally:
            log.close()

    def open_round(self) -> int | None:
        log = self._coord_log()
        if log is None:
            return None
        try:
            row = log.views.open_round()
        except sqlite3.OperationalError:
            return None
        finally:
            log.close()
        return None if row is None else int(row.round)

    def client_state(self, cid: str) -> tuple[int, str]:
        """(round, checksum) a client persisted; (-2, "") while it has none (or its db is busy)."""
        from bench.demo.demo import client_checksum_and_round

        got = client_checksum_and_round(self.workdir / cid)
        return (-2, "") if got is None else got

    def wait(self, what: str, pred: Callable[[], bool], timeout: float, poll: float = 0.1) -> float:
        t0 = time.monotonic()
        while not pred():
            if time.monotonic() - t0 > timeout:
                raise TimeoutError(f"chaos: {what} not within {timeout:.0f} s (closed {self.closed()} rounds); "
                                   f"logs in {self.workdir}")  # fmt: skip
            time.sleep(poll)
        return time.monotonic() - t0

    def wait_closed(self, n: int, timeout: float = 180.0) -> float:
        return self.wait(f"{n} rounds closed", lambda: self.closed() >= n, timeout)

    def wait_training(self, timeout: float = 120.0) -> None:
        """Until a client published its update of the round still open (mid-round, updates in flight)."""

        def in_flight() -> bool:
            r = self.closed()
            return self.open_round() == r and any(f"update for round {r} (" in c.text() for c in self.clients)

        self.wait("a round in flight", in_flight, timeout, poll=0.02)

    def recovered(self, kind: str, t_restart: float, closed_before: int) -> None:
        """Record a fault's recovery time: restart -> the next round closed."""
        self.wait_closed(closed_before + 1)
        self.faults.append({"fault": kind, "at_round": closed_before,
                            "recovery_s": round(time.monotonic() - t_restart, 2)})  # fmt: skip

    # -- the verdict -----------------------------------------------------------------------------
    def verdict(self) -> dict[str, Any]:
        log = self._coord_log()
        if log is None:
            raise RuntimeError(f"chaos: no coordinator event log in {self.workdir / 'coord'}")
        try:
            stored = {(u.client, u.round): (u.status, u.used_in) for u in log.updates()}
            results = [(r.round, r.n_clients, r.values_checksum) for r in log.results()]
            dup = sum(c.get("duplicate", 0) for c in log.views.round_counts().values())
        finally:
            log.close()
        published: set[tuple[str, int]] = set()
        pat = re.compile(r"update for round (\d+) \(msg_id [0-9a-f]+\) published")
        for cid, c in zip(self.client_ids, self.clients, strict=True):
            published |= {(cid, int(m)) for m in pat.findall(c.text())}
        lost = sorted(k for k in published if k not in stored or stored[k][0] == "dropped")
        pending = sorted(k for k in published if k in stored and stored[k][0] == "late")
        used: dict[int, set[str]] = {}
        for (client, _r), (st, u) in stored.items():
            if st in ("accepted", "folded") and u is not None:
                used.setdefault(int(u), set()).add(client)
        double = [r for r, n, _ in results if n != len(used.get(int(r), set()))]
        final = results[-1][2] if results else ""
        states = {cid: self.client_state(cid) for cid in self.client_ids}
        return {
            "rounds_closed": len(results), "rounds_wanted": self.rounds,
            "updates_published": len(published), "updates_counted": sum(len(v) for v in used.values()),
            "lost": [f"{c}/r{r}" for c, r in lost], "pending_late": [f"{c}/r{r}" for c, r in pending],
            "double_counted_rounds": double,
            "checksums_equal": bool(final) and all(s == (self.rounds - 1, final) for s in states.values()),
            "final_checksum": final[:16], "clients": {k: [v[0], v[1][:16]] for k, v in states.items()},
            "duplicates_ignored": dup,
            "faults": self.faults,
        }  # fmt: skip


# -- scenarios -----------------------------------------------------------------------------------
def _kill_points(rounds: int, kills: int) -> list[int]:
    """Rounds (spread over the run, not the first or last) in which to inject the faults."""
    return [max(1, (i + 1) * rounds // (kills + 1)) for i in range(kills)]


def scenario(fleet: Fleet, name: str, kills: int, down_rounds: int = 3) -> None:
    """Run `name`'s faults while the fleet works through its rounds (returns when all closed)."""
    for at in _kill_points(fleet.rounds, kills) if name != "baseline" else []:
        fleet.wait_closed(at)
        fleet.wait_training()
        closed = fleet.closed()
        if name == "client_kill":
            victim = fleet.clients[at % len(fleet.clients)]
            victim.kill()
            time.sleep(1.0)
            t = time.monotonic()
            victim.start()
        elif name == "coordinator_kill":
            fleet.coord.kill()
            time.sleep(1.0)
            t = time.monotonic()
            fleet.coord.start()
        elif name == "broker_kill":
            fleet.broker.kill()
            time.sleep(1.0)
            t = time.monotonic()
            fleet.broker.start()
        elif name == "host_crash":  # broker and coordinator die together; devices come back first
            fleet.broker.kill()
            fleet.coord.kill()
            time.sleep(1.0)
            t = time.monotonic()
            fleet.broker.start()
            time.sleep(3.0)  # the clients reconnect and re-send to a broker holding no coordinator session
            fleet.coord.start()
        elif name == "device_down":
            victim = fleet.clients[-1]
            joins = victim.text().count("joined fleet")
            victim.kill()
            # the fleet closes rounds without the dead device (a round in ~0.4 s on a fast box), and a device
            # needs seconds to boot: the coordinator holds still (SIGSTOP) from 3 rounds before the end until
            # the device has joined again and re-sent its update, so that a round is left to fold it into
            fleet.wait_closed(min(closed + down_rounds, fleet.rounds - 3), timeout=300)
            fleet.coord.pause()
            try:
                if fleet.closed() > fleet.rounds - 2:
                    raise RuntimeError(f"chaos: device_down needs a round left after the device is back; "
                                       f"{fleet.closed()} of {fleet.rounds} closed: run more rounds")  # fmt: skip
                t = time.monotonic()
                victim.start()

                def rejoined(v: Proc = victim, n: int = joins) -> bool:
                    return v.text().count("joined fleet") > n

                fleet.wait("the device joined again", rejoined, 30)
                time.sleep(0.5)  # its re-sent update reaches the broker (it goes out right after the join)
            finally:
                fleet.coord.resume()
            closed = fleet.closed()
        elif name == "storm":
            t = time.monotonic()
            _storm(fleet, seconds=8.0)
        else:
            raise ValueError(f"unknown scenario {name!r}: one of {', '.join(SCENARIOS)}")
        fleet.recovered(name, t, closed)
    fleet.wait_closed(fleet.rounds, timeout=600)
    fleet.wait("clients at the last round",
               lambda: all(fleet.client_state(c)[0] == fleet.rounds - 1 for c in fleet.client_ids), 120)


def _storm(fleet: Fleet, seconds: float) -> None:
    """Capture every Update on up/+ for `seconds` and publish each again 3 times, in reverse order, with
    the older ones mixed in: duplicates and reordering the coordinator must dedupe."""
    from shared.mqtt import MqttLink
    from shared.topics import Topics

    t = Topics(_fleet_name(fleet))
    link = MqttLink(fleet.broker.url, f"storm{os.getpid()}", subscriptions=[(t.filter("up"), 1)])
    link.start()
    seen: list[tuple[str, bytes]] = []
    known: set[tuple[str, bytes]] = set()
    end = time.monotonic() + seconds
    try:
        while time.monotonic() < end:
            try:
                m = link.inbox.get(timeout=0.2)
            except Exception:
                continue
            if (m.topic, m.payload) in known:
                # our own copy coming back (MQTT 3.1.1 has no no-local): storming it again would grow the
                # storm exponentially until our link's queue overflows, which tests the harness, not us
                continue
            known.add((m.topic, m.payload))
            seen.append((m.topic, m.payload))
            for topic, payload in reversed(seen):
                for _ in range(3):
                    link.publish(topic, payload, qos=1)
        fleet.faults.append({"fault": "storm_copies", "copies": 3 * len(seen) * (len(seen) + 1) // 2})
    finally:
        link.stop()


def _fleet_name(fleet: Fleet) -> str:
    m = re.search(r'^fleet = "(.*)"$', (fleet.workdir / "coordinator.toml").read_text(), re.M)
    assert m is not None
    return m.group(1)


def run_chaos(workdir: Path, name: str, broker_mode: str, rounds: int, kills: int, toy: Any = None,
              deadline_s: float = 20.0) -> dict[str, Any]:
    fleet = Fleet(workdir, broker_mode, rounds, toy=toy, deadline_s=deadline_s)
    t0 = time.monotonic()
    fleet.start()
    try:
        scenario(fleet, name, kills)
    finally:
        fleet.stop()
    out = fleet.verdict()
    out.update(scenario=name, broker=broker_mode, wall_s=round(time.monotonic() - t0, 1))
    out["ok"] = (out["rounds_closed"] == rounds and not out["lost"] and not out["double_counted_rounds"]
                 and out["checksums_equal"] and not out["pending_late"])  # fmt: skip
    return out


@dataclass(frozen=True)
class ChaosDefaults:
    rounds: int = 20
    kills: int = 3
    workdir: Path = Path("chaos-runs")


def add_parser(sub: Any) -> None:
    p = sub.add_parser("chaos", help="fault injection on a real fleet: kills, host crash, device down, storm")
    p.add_argument("--scenario", choices=SCENARIOS + ("all",), default="host_crash")
    p.add_argument("--broker-mode", choices=BROKER_MODES + ("both",), default="both",
                   help="deploy: deploy/mosquitto persistence settings; amnesic: the broker keeps nothing")
    add_defaults(
        p, ChaosDefaults(),
        ("--rounds", "rounds", "rounds per run"), ("--kills", "kills", "faults per run"),
        ("--workdir", "workdir", "one directory per scenario and broker mode"),
    )  # fmt: skip
    add_json_flag(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from bench.cli import print_json_last

    names = SCENARIOS if args.scenario == "all" else (args.scenario,)
    modes = BROKER_MODES if args.broker_mode == "both" else (args.broker_mode,)
    toy = build_toy(args.workdir / "toy")
    results = []
    for name in names:
        for mode in modes:
            r = run_chaos(args.workdir / f"{name}-{mode}", name, mode, args.rounds, args.kills, toy=toy)
            print(f"{name:17s} broker={mode:8s} rounds {r['rounds_closed']}/{args.rounds} lost {len(r['lost'])} "
                  f"double {len(r['double_counted_rounds'])} checksums_equal {r['checksums_equal']} "
                  f"recovery_s {[f['recovery_s'] for f in r['faults'] if 'recovery_s' in f]} "
                  f"{'OK' if r['ok'] else 'FAIL'} ({r['wall_s']} s)")  # fmt: skip
            results.append(r)
    ok = all(r["ok"] for r in results)
    if args.json:
        print_json_last({"ok": ok, "runs": results})
    return 0 if ok else 1


__all__ = ["Broker", "Fleet", "add_parser", "run", "run_chaos", "scenario"]
