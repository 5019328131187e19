"""Record the conformance transcripts: real coordinator, real Mosquitto, scripted devices, every byte.

Run by hand (NOT part of `make test`; takes ~1 minute), from the repository root:

    .venv/bin/python tests/conformance/record.py                 # every scenario -> tests/conformance/transcripts/
    .venv/bin/python tests/conformance/record.py --only baseline late_fold
    .venv/bin/python tests/conformance/record.py --out /tmp/kit  # somewhere else

Each scenario starts a PRIVATE `mosquitto` (free loopback port, no persistence: no retained leftovers),
a recorder subscribed to `meerkat/v1/<fleet>/#` at QoS 1, the real `coordinator.server.Coordinator`
in-process on a synthetic mask with pre-training gradients (so MEERKAT-VP can flag, as in
tests/coordinator/coordfakes.py), and scripted devices that speak the wire through shared.mqtt +
shared.codec (tests/coordinator/coordfakes.FakeClient) with synthetic projected gradients. It writes
`<out>/<scenario>/{meta.json, v0.f32, messages.jsonl}` (format: docs/PROTOCOL.md §12) after checking
the recording against itself (every result applied from v_0 gives its checksum).

Re-record after any change to what the coordinator sends (e.g. n_clients, late-fold arithmetic, error
codes): the transcripts are recordings of the current code, and tests/conformance/test_conformance.py
checks our decoder/apply against them.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
for p in (ROOT, HERE, ROOT / "tests" / "coordinator"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import torch  # noqa: E402
from coordfakes import FakeClient, ThreadedCoordinator, make_config, synthetic_mask, synthetic_v0  # noqa: E402
from wirejson import to_json  # noqa: E402

from bench.demo.broker import free_port, port_open  # noqa: E402
from coordinator.drift import DriftMonitor  # noqa: E402
from coordinator.server import Coordinator  # noqa: E402
from shared.apply import apply_round, values_checksum  # noqa: E402
from shared.codec import DecodeError, decode, encode  # noqa: E402
from shared.fingerprint import fp_tag  # noqa: E402
from shared.maskfile import Mask  # noqa: E402
from shared.messages import (  # noqa: E402
    CLIENT_FROM_TOPIC,
    CheckpointChunk,
    ErrorMsg,
    Heartbeat,
    Join,
    Replay,
    RoundPlan,
    RoundResult,
    RunState,
    Status,
    SyncRequest,
    Update,
)
from shared.mqtt import MqttLink  # noqa: E402
from shared.prng import derive_seed, raw_u64  # noqa: E402
from shared.sampling import plan_steps  # noqa: E402
from shared.topics import Topics  # noqa: E402

log = logging.getLogger("record")

MASTER_SEED = 20240613
NNZ = (300, 200)  # two synthetic (64, 64) layers: nnz 500, v0.f32 = 2000 bytes
T = 4
INBOUND = {"up", "join", "hb", "status", "sync"}  # kinds a client writes
EXPECTED: dict[str, type | tuple[type, ...]] = {  # topic kind -> the message type allowed on it (PROTOCOL.md §1)
    "plan": RoundPlan, "result": RoundResult, "result_latest": RoundResult, "up": Update, "join": Join,
    "hb": Heartbeat, "status": Status, "sync": SyncRequest,
    "to": (Replay, CheckpointChunk, ErrorMsg), "run": RunState,  # run: 1.3, the run's lifecycle
}  # fmt: skip


# ---- infrastructure --------------------------------------------------------------------------------------


class PrivateBroker:
    """`mosquitto` on a free loopback port, no persistence (a fresh broker has no retained messages)."""

    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.port = free_port()
        conf = workdir / "mosquitto.conf"
        conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
        self.proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        end = time.monotonic() + 10
        while not port_open("127.0.0.1", self.port):
            if time.monotonic() > end or self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto did not start on port {self.port}")
            time.sleep(0.05)
        self.url = f"mqtt://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


@dataclass
class Ctx:
    """What a scenario script gets: the fleet, its model identity, the devices it made, the coordinator."""

    url: str
    fleet: str
    mask: Mask
    fingerprint: str
    coord: Coordinator
    devices: dict[str, FakeClient] = field(default_factory=dict)

    def device(self, cid: str, n_samples: int, join: bool = True, last_round: int = -1) -> FakeClient:
        dev = FakeClient(self.url, self.fleet, cid)
        self.devices[cid] = dev
        if join:
            dev.join(self.fingerprint, self.mask.mask_id, n_samples, last_round)
        return dev

    def plan(self, dev: FakeClient, r: int, pred: Callable[[RoundPlan], bool] = lambda p: True) -> RoundPlan:
        return dev.wait_for(RoundPlan, lambda p: p.round == r and pred(p))

    def send(self, dev: FakeClient, plan: RoundPlan, n_samples: int, msg_id: int | None = None,
             grads: list[float] | None = None, loss: float = 2.5) -> None:  # fmt: skip
        g = grads if grads is not None else synthetic_grads(dev.cid, plan.round, plan_steps(plan, dev.cid))
        dev.update(plan.round, g, n_samples, self.fingerprint, msg_id=msg_id or 1000 + plan.round, loss=loss)

    def result(self, dev: FakeClient, r: int) -> RoundResult:
        return dev.wait_for(RoundResult, lambda x: x.round == r, timeout=30)


def synthetic_grads(cid: str, r: int, n: int) -> list[float]:
    """Deterministic projected gradients in [-0.5, 0.5) for (client, round), from shared.prng."""
    u = raw_u64(derive_seed(zlib.crc32(cid.encode()), r), n)
    return [float(x) for x in ((u >> 40).astype("float64") / 2**24 - 0.5)]


def play(ctx: Ctx, r: int, senders: dict[str, int], heartbeat: bool = True) -> RoundResult:
    """Round r: every device in `senders` (cid -> n_samples) reads the plan and reports; wait for the result."""
    first = ctx.devices[next(iter(senders))]
    plan = ctx.plan(first, r)
    for cid, n in senders.items():
        dev = ctx.devices[cid]
        if dev is not first:
            ctx.plan(dev, r)
        if heartbeat:
            dev.heartbeat(round=r, temp_c=None if cid.endswith("b") else 48.0)
        ctx.send(dev, plan, n)
    return ctx.result(first, r)


# ---- scenarios ---------------------------------------------------------------------------------------------


def sc_baseline(ctx: Ctx) -> None:
    ctx.device("dev-a", 10)
    ctx.device("dev-b", 30)
    for r in range(3):
        play(ctx, r, {"dev-a": 10, "dev-b": 30})


def sc_gaussian(ctx: Ctx) -> None:
    sc_baseline(ctx)


def sc_late_fold(ctx: Ctx) -> None:
    a, b, c = ctx.device("dev-a", 10), ctx.device("dev-b", 30), ctx.device("dev-c", 20)
    p0 = ctx.plan(a, 0)
    ctx.send(a, p0, 10)
    ctx.send(b, p0, 30)
    ctx.result(c, 0)  # closes at the deadline with 2 of 3 (min_updates = 2)
    ctx.send(c, ctx.plan(c, 0), 20)  # late: stored, folded into the next result
    p1 = ctx.plan(a, 1)
    for dev, n in ((a, 10), (b, 30), (c, 20)):
        ctx.send(dev, p1, n)
    ctx.result(a, 1)
    play(ctx, 2, {"dev-a": 10, "dev-b": 30, "dev-c": 20})


def _uncovered(plan: RoundPlan, prefix: str) -> str:
    """The first id prefix0, prefix1, ... whose sampling key is above the plan's sample_max (not in the round)."""
    return next(c for c in (f"{prefix}{i}" for i in range(1000)) if not plan_steps(plan, c))


def sc_extension(ctx: Ctx) -> None:
    a, _b = ctx.device("dev-a", 10), ctx.device("dev-b", 30)
    p0 = ctx.plan(a, 0)  # clients_per_round = 2: sample_max = the larger key of dev-a, dev-b
    cid = _uncovered(p0, "dev-c")
    c = ctx.device(cid, 20)  # joins after round 0 opened, its key above sample_max: not in the round yet
    ctx.send(a, p0, 10)  # dev-b stays silent: 1 < min_updates = 2 at the deadline -> extend
    p0x = ctx.plan(c, 0, lambda p: plan_steps(p, cid) > 0)  # the re-issued plan raises sample_max to cover it
    ctx.send(c, p0x, 20)
    ctx.result(a, 0)
    p1 = ctx.plan(a, 1)  # clients_per_round = 2 of the 3: the one above sample_max sits round 1 out
    play(ctx, 1, {k: n for k, n in {"dev-a": 10, "dev-b": 30, cid: 20}.items() if plan_steps(p1, k)})


def sc_vp_limited(ctx: Ctx) -> None:
    grad = ctx.mask.flat_grad()
    assert grad is not None
    mon = DriftMonitor(grad, ctx.coord.config.dist, ctx.coord.config.drift_thresholds())
    steady, decay = ctx.device("dev-steady", 10), ctx.device("dev-decay", 10)
    for r in range(3):
        plan = ctx.plan(steady, r)
        ctx.plan(decay, r)
        for dev, gradip in ((steady, [0.1] * T), (decay, [1.0, 1.0, 1e-3, 1e-3])):
            n = plan_steps(plan, dev.cid)  # round 0: both T; later: dev-decay limited to 1 step
            ctx.send(dev, plan, 10, grads=[gradip[t] / mon.coefficient(s) for t, s in enumerate(plan.seeds[:n])])
        ctx.result(steady, r)
    assert plan.steps == {"dev-decay": 1} and plan_steps(plan, "dev-steady") == T, plan  # the exception only


def _history_then_latecomer(ctx: Ctx) -> FakeClient:
    """Rounds 0..2 by dev-a/dev-b; round 3 opens without dev-late, which then joins at round -1."""
    ctx.device("dev-a", 10)
    ctx.device("dev-b", 30)
    for r in range(3):
        play(ctx, r, {"dev-a": 10, "dev-b": 30}, heartbeat=False)
    ctx.plan(ctx.devices["dev-a"], 3)
    return ctx.device("dev-late", 20)


def _finish_with_latecomer(ctx: Ctx) -> None:
    a, b, late = ctx.devices["dev-a"], ctx.devices["dev-b"], ctx.devices["dev-late"]
    p3 = ctx.plan(b, 3)
    ctx.send(a, p3, 10)
    ctx.send(b, p3, 30)
    ctx.result(late, 3)
    play(ctx, 4, {"dev-a": 10, "dev-b": 30, "dev-late": 20})


def sc_replay(ctx: Ctx) -> None:
    late = _history_then_latecomer(ctx)
    late.sync(-1)  # 3 rounds behind <= replay_max: Replay of rounds 0..2
    rep = late.wait_for(Replay)
    assert [x.round for x in rep.results] == [0, 1, 2], rep
    late.sync(2)  # up to date: an empty Replay
    assert late.wait_for(Replay).results == ()
    _finish_with_latecomer(ctx)


def sc_checkpoint(ctx: Ctx) -> None:
    late = _history_then_latecomer(ctx)
    late.sync(-1)  # 3 rounds behind > replay_max = 1: the values after round 2 in chunks
    chunks = [late.wait_for(CheckpointChunk) for _ in range(2)]
    assert {c.round for c in chunks} == {2} and chunks[0].total == 2, chunks
    late.sync(1)  # 1 behind: a Replay of round 2
    assert [x.round for x in late.wait_for(Replay).results] == [2]
    _finish_with_latecomer(ctx)


def sc_lr_auto(ctx: Ctx) -> None:
    """lr = "auto": the loss falls (the lr grows), then round 2's local paths diverge (g_1.. ~4.5 x g_0):
    its result is applied at a quarter of its plan's lr, and round 3's plan has half of it. Round 4's loss
    jumps on the values round 3 made (3.0 >> smoothed ~2.0, both devices spiked): its result undoes round 3
    (round 4's seeds with scalar 0, then round 3's pairs negated)."""
    ctx.device("dev-a", 10)
    ctx.device("dev-b", 30)
    steep = [1.0, -4.0, 5.0, -4.5]
    for r, loss in enumerate((2.5, 2.0, 1.8, 1.7, 3.0)):
        plan = ctx.plan(ctx.devices["dev-a"], r)
        ctx.plan(ctx.devices["dev-b"], r)
        for cid, n in (("dev-a", 10), ("dev-b", 30)):
            g = steep if r == 2 else synthetic_grads(cid, r, T)
            ctx.send(ctx.devices[cid], plan, n, grads=[x * (1.0 if cid == "dev-a" else 0.5) for x in g], loss=loss)
        ctx.result(ctx.devices["dev-a"], r)


def sc_errors(ctx: Ctx) -> None:
    t = Topics(ctx.fleet)
    ghost = ctx.device("dev-ghost", 5, join=False)
    ghost.heartbeat(round=-1)  # live without a Join: asked to join (UNKNOWN_CLIENT) after 2 s
    a, b = ctx.device("dev-a", 10), ctx.device("dev-b", 30)
    wrong_mask, wrong_fp = ctx.device("dev-x", 5, join=False), ctx.device("dev-y", 5, join=False)
    wrong_mask.join(ctx.fingerprint, "0" * 16, 5)  # MASK_MISMATCH
    wrong_fp.join("f" * 64, ctx.mask.mask_id, 5)  # FINGERPRINT_MISMATCH
    wrong_quant = ctx.device("dev-q", 5, join=False)  # the fleet runs nf4 (quant_policy "same"): QUANT_MISMATCH
    wrong_quant.publish(t.join("dev-q"), encode(Join("", ctx.fingerprint, ctx.mask.mask_id, 5, 1.0, {"quant": "int8"}, -1)))
    old = ctx.device("dev-old", 5, join=False)  # a 1.2 device: no compact_plan capability -> PLAN_FORM
    old.publish(t.join("dev-old"), encode(Join("", ctx.fingerprint, ctx.mask.mask_id, 5, 1.0, {"device": "cpu"}, -1)))
    plan = ctx.plan(a, 0)
    out = ctx.device(_uncovered(plan, "dev-out"), 5, join=False)  # key above sample_max: NOT_IN_ROUND
    out.update(0, [0.1] * T, 5, ctx.fingerprint)
    wrong_mask.update(0, [0.1] * T, 5, ctx.fingerprint)  # its key is covered (or not), but it never joined
    a.update(0, [0.1] * (T - 1), 10, ctx.fingerprint, msg_id=7)  # wrong step count: BAD_UPDATE
    a.update(99, [0.1] * T, 10, ctx.fingerprint, msg_id=7)  # a round that was never planned
    b.update(0, [0.1] * T, 30, "f" * 64, msg_id=7)  # another model's fp_tag: FINGERPRINT_MISMATCH
    b.update(0, [0.1] * T, 0, ctx.fingerprint, msg_id=7)  # n_samples 0: BAD_UPDATE
    b.publish(t.up("dev-b"), b"\x00\x01\x03garbage")  # not a meerkat payload: BAD_MAGIC
    ctx.send(a, plan, 10, msg_id=1)
    ctx.send(a, plan, 10, msg_id=1)  # QoS1 retransmission: a duplicate, silently deduped
    ctx.send(a, plan, 10, msg_id=2, grads=[0.2] * T)  # a different update for the same round: first wins
    ghost.wait_for(ErrorMsg, timeout=10)
    for dev in (wrong_mask, wrong_fp, wrong_quant, old, out):
        dev.wait_for(ErrorMsg)
    ctx.send(b, plan, 30, msg_id=1)
    ctx.result(a, 0)
    time.sleep(0.3)


@dataclass(frozen=True)
class Scenario:
    name: str
    about: str
    run: Callable[[Ctx], None]
    config: dict[str, Any] = field(default_factory=dict)
    stop_after: int | None = None


SCENARIOS = [
    Scenario("baseline", "two devices, three rounds, rademacher, heartbeats", sc_baseline, stop_after=2),
    Scenario("gaussian", "as baseline with dist = gaussian", sc_gaussian, {"dist": "gaussian"}, stop_after=2),
    Scenario("late_fold", "round 0 closes at its deadline without dev-c; dev-c's late update is folded into "
             "result 1 (straggler = next)", sc_late_fold,
             {"min_clients": 3, "min_updates": 2, "round_deadline_s": 1.5}, stop_after=2),
    Scenario("extension", "round 0 has 1 < min_updates update at its deadline: the plan is re-issued with a "
             "later deadline and a higher sample_max that covers dev-c", sc_extension,
             {"min_updates": 2, "round_deadline_s": 1.5, "clients_per_round": 2}, stop_after=1),
    Scenario("vp_limited", "MEERKAT-VP: dev-decay's GradIP decays in round 0, so later plans give it steps = 1",
             sc_vp_limited, {"drift_window": 2, "drift_min_steps": 4, "drift_decay_rule": "absolute"}, stop_after=2),
    Scenario("replay", "dev-late joins at round -1 while round 3 is open and catches up by Replay (and an "
             "empty Replay when up to date), then trains round 4", sc_replay, stop_after=4),
    Scenario("checkpoint", "dev-late is more than replay_max behind: CheckpointChunks of round 2, then a "
             "1-round Replay", sc_checkpoint, {"replay_max": 1, "chunk_bytes": 1024}, stop_after=4),
    Scenario("lr_auto", "lr = \"auto\" (issue 32): the lr grows while the loss falls; round 2's local paths "
             "diverge, so its RoundResult carries a quarter of its plan's lr (receivers apply the result's lr) and "
             "round 3's plan half; round 4's loss jumps, so its RoundResult undoes round 3 (its pairs negated)",
             sc_lr_auto, {"lr": "auto", "lr_start": 0.01}, stop_after=4),
    Scenario("errors", "every ErrorMsg the coordinator sends: mask / fingerprint / quant mismatch, a 1.2 Join "
             "(plan form), not in round, wrong step count, unplanned round, n_samples 0, undecodable payload, "
             "unknown client; a duplicate and a conflicting update", sc_errors, {"clients_per_round": 2},
             stop_after=0),
]  # fmt: skip


# ---- recording ---------------------------------------------------------------------------------------------


def direction(kind: str) -> str:
    return "client->coordinator" if kind in INBOUND else "coordinator->client"


def record_line(seq: int, topics: Topics, topic: str, payload: bytes, qos: int) -> dict[str, Any]:
    kind, arg = topics.parse(topic)
    line: dict[str, Any] = {"seq": seq, "topic": topic, "direction": direction(kind), "qos": qos,
                            "payload": payload.hex()}  # fmt: skip
    try:
        m = decode(payload, EXPECTED[kind], client=str(arg) if kind in INBOUND else "")
    except DecodeError as exc:
        line["error"] = exc.code.name
        return line
    line["type"] = type(m).__name__
    line["decoded"] = to_json(m)
    if type(m) in CLIENT_FROM_TOPIC:
        line["client"] = str(arg)
    return line


def run_scenario(sc: Scenario, out: Path, work: Path) -> dict[str, Any]:
    broker = PrivateBroker(work)
    fleet = f"conf-{sc.name.replace('_', '-')}"
    topics = Topics(fleet)
    mask = synthetic_mask(NNZ, seed=7, with_grad=True)
    v0 = synthetic_v0(mask.nnz, seed=3)
    keys: dict[str, Any] = dict(steps=T, lr=0.01, eps=1e-3, min_clients=2, round_deadline_s=20.0,
                                master_seed=MASTER_SEED)  # fmt: skip
    cfg = make_config(work, broker.url, fleet=fleet, client_id=f"coordinator-{sc.name.replace('_', '-')}",
                      **{**keys, **sc.config})  # fmt: skip
    recorder = MqttLink(broker.url, f"recorder-{fleet}", subscriptions=[(f"meerkat/v1/{fleet}/#", 1)])
    recorder.start()
    assert recorder.wait_connected(10)
    coord = Coordinator(cfg, mask=mask, initial_values=v0, stop_after_round=sc.stop_after)
    runner = ThreadedCoordinator(coord).start()
    ctx = Ctx(broker.url, fleet, mask, mask.meta.fingerprint, coord)
    try:
        sc.run(ctx)
        runner.join(60)
        time.sleep(0.5)  # let the recorder receive the last result
    finally:
        for dev in ctx.devices.values():
            dev.close()
        if runner.thread.is_alive():
            runner.stop()
        recorder.stop()
        broker.stop()
    lines: list[dict[str, Any]] = []
    while not recorder.inbox.empty():
        msg = recorder.inbox.get()
        if msg.payload:  # an empty payload only clears a retained message (PROTOCOL.md §8)
            lines.append(record_line(len(lines), topics, msg.topic, msg.payload, msg.qos))
    return write(sc, out / sc.name, fleet, mask, v0, cfg, lines)


def write(sc: Scenario, d: Path, fleet: str, mask: Mask, v0: torch.Tensor, cfg: Any,
          lines: list[dict[str, Any]]) -> dict[str, Any]:  # fmt: skip
    results = {ln["decoded"]["round"]: ln["decoded"] for ln in lines
               if ln.get("type") == "RoundResult" and "/result/latest" not in ln["topic"]}  # fmt: skip
    values, checksums = v0, {}
    for r in sorted(results):  # the recording must agree with itself before it is written
        res = results[r]
        values = apply_round(values, res["seeds"], res["scalars"], res["lr"], res["dist"])
        got = values_checksum(values)
        if got != res["values_checksum"]:
            raise AssertionError(f"{sc.name}: round {r} applied gives {got}, the result says {res['values_checksum']}")
        checksums[str(r)] = got
    if sorted(results) != list(range(len(results))):
        raise AssertionError(f"{sc.name}: results recorded for rounds {sorted(results)}")
    d.mkdir(parents=True, exist_ok=True)
    (d / "v0.f32").write_bytes(v0.numpy().astype("<f4").tobytes())
    meta = {
        "kit_version": 1, "protocol": "meerkat/v1 (docs/PROTOCOL.md 1.3)", "scenario": sc.name, "about": sc.about,
        "fleet": fleet, "fingerprint": mask.meta.fingerprint, "fp_tag": fp_tag(mask.meta.fingerprint),
        "mask_id": mask.mask_id, "nnz": mask.nnz, "dist": cfg.dist, "v0_file": "v0.f32",
        "v0_checksum": values_checksum(v0), "checksums": checksums, "messages": len(lines),
        "coordinator": {k: getattr(cfg, k) for k in (
            "master_seed", "steps", "lr", "lr_start", "eps", "batch_size", "min_clients", "min_updates", "round_deadline_s",
            "max_extensions", "straggler", "aggregation", "replay_max", "chunk_bytes", "drift_control",
            "drift_window", "drift_min_steps", "drift_decay_rule", "clients_per_round", "plan_form")},
    }  # fmt: skip
    (d / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    with (d / "messages.jsonl").open("w") as f:
        for ln in lines:
            f.write(json.dumps(ln, separators=(",", ":")) + "\n")
    return meta


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=HERE / "transcripts", help="where the scenario folders go")
    ap.add_argument("--only", nargs="*", choices=[s.name for s in SCENARIOS], help="record only these")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    chosen = [s for s in SCENARIOS if not args.only or s.name in args.only]
    for sc in chosen:
        t0 = time.monotonic()
        with tempfile.TemporaryDirectory(prefix=f"record-{sc.name}-") as tmp:
            meta = run_scenario(sc, args.out, Path(tmp))
        print(f"{sc.name}: {meta['messages']} messages, rounds {list(meta['checksums'])}, "
              f"{time.monotonic() - t0:.1f} s")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
