"""Simulated devices for `meerkat bench fleet`: one process runs a few thousand of them in one event loop.

Run by bench/fleet/fleet.py as `python -m bench.fleet.devices SPEC.json OUT.json`. Each device is a real MQTT
connection (bench/fleet/mqttlite.py) that behaves like edge_client on the wire: clean_session=False with a
unique id, a will that publishes Status(offline), retained Status(online), Join, subscriptions to plan,
result/+ and to/{id}; for every plan that samples it, an encoded Update (QoS 1) after a jittered compute
delay; QoS 0 heartbeats. Dropouts: with probability `dropout` a sampled device loses its connection the
moment the plan arrives (no DISCONNECT: the broker publishes its will), stays away, reconnects, gets the
plan again and then sends; an Update whose PUBACK never came is re-sent with the same msg_id.

Every random draw comes from shared.prng with the spec's seed (device index and round in the path).
What each device sent (round, msg_id, send time, PUBACK time) is the ground truth bench/fleet/fleet.py checks
against the coordinator's log. The plan payload is identical for every device of a process, so it is
decoded once per process (a real device decodes its own copy on its own CPU).
"""

from __future__ import annotations

import asyncio
import functools
import json
import math
import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench.fleet.mqttlite import LiteClient, LiteWill, open_client
from shared.codec import decode, encode
from shared.fingerprint import fp_tag
from shared.messages import ErrorCode, ErrorMsg, Heartbeat, Join, RoundPlan, RoundResult, Status, Update
from shared.prng import GOLDEN, MASK64, derive_seed, mix64, raw_u64
from shared.sampling import plan_steps
from shared.topics import Topics

DRAW_TAG = 0x464C454554  # "FLEET": timing/dropout draws
GRAD_TAG = 0x47524144  # "GRAD": the scalars of an Update
MSG_TAG = 0x4D534744  # "MSGD": msg_id
CONNECT_CONCURRENCY = 64
SMALL_DRAW = 4  # uniforms() of at most this many values skip numpy


@dataclass(frozen=True)
class DeviceSpec:
    host: str
    port: int
    fleet: str
    first: int  # device indices first .. first+count-1; id = f"{prefix}{index:05d}"
    count: int
    prefix: str
    fingerprint: str
    mask_id: str
    seed: int
    rounds: int  # the worker stops after the result of round rounds-1
    compute_s: float  # mean simulated local compute time per round
    dropout: float  # probability a sampled device drops its connection when the plan arrives
    outage_s: float  # mean time a dropped device stays away
    heartbeat_s: float
    stop_at: float  # unix time: give up (the bench's timeout)
    grad_scale: float = 1.0
    cleanup: bool = False  # wipe the persistent sessions at the end (a shared broker)


def device_id(prefix: str, index: int) -> str:
    return f"{prefix}{index:05d}"


def uniforms(seed: int, tag: int, index: int, round: int, n: int) -> np.ndarray:
    """n floats in [0, 1) from shared.prng, fixed by (seed, tag, device index, round).

    A few values (every draw but the grads) are computed on Python ints: numpy's per-call overhead is
    most of the cost at n = 3. Same bits: u_i = mix64(key + (i + 1) * GOLDEN), and u >> 11 < 2**53 is
    exact in float64, as is the division by 2**53."""
    s = derive_seed(seed, tag, index, round + 1)
    if n > SMALL_DRAW:
        return (raw_u64(s, n) >> np.uint64(11)).astype(np.float64) / 2.0**53
    key = mix64(s)
    return np.array([(mix64((key + (i + 1) * GOLDEN) & MASK64) >> 11) / 2.0**53 for i in range(n)], np.float64)


def gaussian_grads(seed: int, index: int, round: int, steps: int, scale: float) -> tuple[float, ...]:
    """Plausible projected gradients: N(0, scale^2) by Box-Muller on shared.prng uniforms."""
    u = uniforms(seed, GRAD_TAG, index, round, 2 * steps)
    u1 = np.maximum(u[:steps], 2.0**-53)
    return tuple(float(x) for x in scale * np.sqrt(-2.0 * np.log(u1)) * np.cos(2 * math.pi * u[steps:]))


@dataclass
class SimDevice:
    """One simulated device: its MQTT connection and what it sent (the ground truth fleet.py checks)."""

    index: int
    cid: str
    client: LiteClient | None = None
    sent: dict[int, list[Any]] = field(default_factory=dict)  # round -> [msg_id, t_send, t_ack | None, payload]
    scheduled: set[int] = field(default_factory=set)
    dropped: set[int] = field(default_factory=set)
    planned: set[int] = field(default_factory=set)
    reconnects: int = 0
    next_hb: float = 0.0
    n_samples: int = 0  # its Join's n_samples, also the n_samples of every Update (drawn once)


class DeviceProcess:
    """The devices of one `python -m bench.fleet.devices` process, all on one asyncio loop."""

    def __init__(self, spec: DeviceSpec) -> None:
        self.spec = spec
        self.t = Topics(spec.fleet)
        self.fp_tag = fp_tag(spec.fingerprint)
        self.devices = [SimDevice(i, device_id(spec.prefix, i), n_samples=50 + int(uniforms(spec.seed, MSG_TAG, i, 0, 1)[0] * 450))
                        for i in range(spec.first, spec.first + spec.count)]  # fmt: skip
        self.decoded: dict[bytes, Any] = {}
        self.plans: dict[int, list[float]] = {}  # round -> [first receipt, last receipt, receipts]
        self.results: dict[int, list[float]] = {}  # round -> [first receipt, last receipt, n_clients]
        self.closed: set[int] = set()
        self.result_payloads: dict[int, str] = {}  # round -> hex payload (for the VP replay in bench/fleet/fleet.py)
        self.plan_bytes = 0
        self.fanout_bytes = 0  # bytes of every plan and result payload delivered to these devices (broker fan-out)
        self.errors: dict[str, int] = {}
        self.connect_failures = 0
        self.connected_at: float | None = None
        self.final = asyncio.Event()

    # -- messages in ----------------------------------------------------------------------------------
    def _decode(self, payload: bytes) -> Any:
        m = self.decoded.get(payload)
        if m is None:
            m = self.decoded[payload] = decode(payload)
        return m

    def on_message(self, dev: SimDevice, topic: str, payload: bytes) -> None:
        now = time.time()
        if not payload:
            return
        m = self._decode(payload)
        if isinstance(m, (RoundPlan, RoundResult)):
            self.fanout_bytes += len(payload)
        if isinstance(m, RoundPlan):
            self.plan_bytes = max(self.plan_bytes, len(payload))
            if m.round not in dev.planned:  # first receipt per device: a reconnect's re-delivery is not fan-out
                dev.planned.add(m.round)
                _seen(self.plans, m.round, now, 1.0)
            self._on_plan(dev, m)
        elif isinstance(m, RoundResult):
            if topic == self.t.result_latest:
                return
            _seen(self.results, m.round, now, float(m.n_clients), add=False)
            self.result_payloads.setdefault(m.round, payload.hex())
            self.closed.add(m.round)
            if m.round >= self.spec.rounds - 1:
                self.final.set()
        elif isinstance(m, ErrorMsg):
            key = ErrorCode(m.code).name if m.code in ErrorCode._value2member_map_ else str(m.code)
            self.errors[key] = self.errors.get(key, 0) + 1
            if m.code == ErrorCode.UNKNOWN_CLIENT and dev.client is not None:
                self._join(dev)

    def _on_plan(self, dev: SimDevice, plan: RoundPlan) -> None:
        r = plan.round
        if not plan_steps(plan, dev.cid) or r in dev.sent or r in dev.scheduled or r in self.closed:
            return
        u = uniforms(self.spec.seed, DRAW_TAG, dev.index, r, 3)
        loop = asyncio.get_running_loop()
        if u[0] < self.spec.dropout and r not in dev.dropped and dev.client is not None:
            dev.dropped.add(r)
            dev.client.abort()  # like losing power: no DISCONNECT, the broker publishes the will
            dev.client = None
            loop.create_task(self._reconnect(dev, self.spec.outage_s * (0.5 + u[1])))
            return
        dev.scheduled.add(r)
        loop.call_later(self.spec.compute_s * (0.5 + u[2]), self._send_update, dev, plan)

    # -- messages out ---------------------------------------------------------------------------------
    def _send_update(self, dev: SimDevice, plan: RoundPlan) -> None:
        dev.scheduled.discard(plan.round)
        if dev.client is None or not dev.client.connected:
            return  # it will see the plan again after reconnecting
        s, r = self.spec, plan.round
        steps = plan_steps(plan, dev.cid)  # compact plans (1.3): shared/sampling.py
        msg_id = derive_seed(s.seed, MSG_TAG, dev.index, r)
        loss = 2.0 + 0.1 * float(uniforms(s.seed, MSG_TAG, dev.index, r + 1, 1)[0])
        upd = Update(r, msg_id, gaussian_grads(s.seed, dev.index, r, steps, s.grad_scale), dev.n_samples, self.fp_tag,
                     loss)  # fmt: skip
        entry = [msg_id, time.time(), None, encode(upd)]
        dev.sent[r] = entry
        self._publish_update(dev, entry)

    def _publish_update(self, dev: SimDevice, entry: list[Any]) -> None:
        assert dev.client is not None
        fut = dev.client.publish(self.t.up(dev.cid), entry[3], 1)
        assert fut is not None

        def acked(f: asyncio.Future[int]) -> None:
            if not f.cancelled() and f.exception() is None:
                entry[2] = time.time()

        fut.add_done_callback(acked)

    def _join(self, dev: SimDevice) -> None:
        assert dev.client is not None
        join = Join("", self.spec.fingerprint, self.spec.mask_id, dev.n_samples, 2.0, {"sim": True, "compact_plan": True}, -1)
        dev.client.publish(self.t.join(dev.cid), encode(join), 1)

    async def _connect(self, dev: SimDevice, first: bool) -> bool:
        will = LiteWill(self.t.status(dev.cid), encode(Status("", False, time.time())), 1, True)
        subs = [(self.t.plan, 1), (self.t.filter("result"), 1), (self.t.to(dev.cid), 1)]
        for attempt in range(6):
            if time.time() > self.spec.stop_at:
                return False
            try:
                c = await open_client(self.spec.host, self.spec.port, dev.cid,
                                      functools.partial(self.on_message, dev), clean=False, will=will)
                dev.client = c
                c.publish(self.t.status(dev.cid), encode(Status("", True, time.time())), 1, True)
                if first:
                    self._join(dev)
                await asyncio.wait_for(c.subscribe(subs), 30)
                for entry in dev.sent.values():
                    if entry[2] is None:  # never PUBACKed: same msg_id again (the coordinator dedupes)
                        self._publish_update(dev, entry)
                return True
            except (OSError, asyncio.TimeoutError, RuntimeError):
                self.connect_failures += 1
                dev.client = None
                await asyncio.sleep(0.2 * 2**attempt)
        return False

    async def _reconnect(self, dev: SimDevice, after: float) -> None:
        await asyncio.sleep(after)
        dev.reconnects += 1
        await self._connect(dev, first=False)

    async def _heartbeats(self) -> None:
        phase = {d.cid: float(uniforms(self.spec.seed, DRAW_TAG, d.index, 0, 1)[0]) for d in self.devices}
        start = time.time()
        for d in self.devices:
            d.next_hb = start + phase[d.cid] * self.spec.heartbeat_s
        while True:
            await asyncio.sleep(0.5)
            now = time.time()
            payloads: dict[int, bytes] = {}  # round -> this tick's heartbeat (the devices differ only in round)
            for d in self.devices:
                if d.client is not None and d.client.connected and now >= d.next_hb:
                    r = max(d.sent, default=-1)
                    hb = payloads.get(r)
                    if hb is None:
                        hb = payloads[r] = encode(Heartbeat("", now, 3.0, 200 << 20, None, 45.0, 5.0, 0.5, 300 << 20, r))
                    d.client.publish(self.t.hb(d.cid), hb, 0)
                    d.next_hb = now + self.spec.heartbeat_s

    # -- run --------------------------------------------------------------------------------------------
    async def run(self) -> None:
        sem = asyncio.Semaphore(CONNECT_CONCURRENCY)

        async def one(dev: SimDevice) -> None:
            async with sem:
                await self._connect(dev, first=True)

        await asyncio.gather(*(one(d) for d in self.devices))
        self.connected_at = time.time()
        hb = asyncio.get_running_loop().create_task(self._heartbeats())
        try:
            await asyncio.wait_for(self.final.wait(), max(1.0, self.spec.stop_at - time.time()))
            await self._drain_acks(5.0)
        except asyncio.TimeoutError:
            pass
        hb.cancel()
        for d in self.devices:
            if d.client is not None:
                d.client.disconnect()
        if self.spec.cleanup:
            await self._wipe_sessions(sem)
        await asyncio.sleep(0.2)

    async def _drain_acks(self, timeout: float) -> None:
        end = time.time() + timeout
        while time.time() < end and any(e[2] is None for d in self.devices for e in d.sent.values()):
            await asyncio.sleep(0.1)

    async def _wipe_sessions(self, sem: asyncio.Semaphore) -> None:
        """On a shared broker: a clean_session connect drops each device's persistent session."""
        async def wipe(dev: SimDevice) -> None:
            async with sem:
                try:
                    c = await open_client(self.spec.host, self.spec.port, dev.cid, _ignore, clean=True)
                    c.publish(self.t.status(dev.cid), b"", 1, True)  # clear the retained status
                    c.disconnect()
                except (OSError, asyncio.TimeoutError, RuntimeError):
                    pass

        await asyncio.gather(*(wipe(d) for d in self.devices))

    def report(self) -> dict[str, Any]:
        ru = resource.getrusage(resource.RUSAGE_SELF)
        return {
            "devices": {d.cid: {"sent": [[r, f"{e[0]:016x}", e[1], e[2]] for r, e in sorted(d.sent.items())],
                                "reconnects": d.reconnects, "dropouts": len(d.dropped)} for d in self.devices},
            "plans": self.plans, "results": self.results, "errors": self.errors, "plan_bytes": self.plan_bytes,
            "fanout_bytes": self.fanout_bytes,
            "result_payloads": self.result_payloads,
            "connect_failures": self.connect_failures, "connected_at": self.connected_at,
            "cpu_s": ru.ru_utime + ru.ru_stime, "max_rss_mib": _peak_rss_kib(ru.ru_maxrss) / 1024,
        }


def _peak_rss_kib(fallback: int) -> int:
    """This process's peak RSS (VmHWM). ru_maxrss is no good here: Linux carries it across exec, so a worker
    would report the peak of the bench process that forked it."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return fallback


def _ignore(topic: str, payload: bytes) -> None:
    pass


def _seen(table: dict[int, list[float]], key: int, now: float, value: float, add: bool = True) -> None:
    row = table.get(key)
    if row is None:
        table[key] = [now, now, value]
    else:
        row[1] = now
        row[2] = row[2] + value if add else value


def main(argv: list[str]) -> int:
    spec = DeviceSpec(**json.loads(Path(argv[0]).read_text()))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < spec.count + 64:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, spec.count + 1024), hard))
    worker = DeviceProcess(spec)
    asyncio.run(worker.run())
    Path(argv[1]).write_text(json.dumps(worker.report()))
    return 0


def spec_json(spec: DeviceSpec) -> str:
    return json.dumps(asdict(spec))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
