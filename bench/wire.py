"""`meerkat bench wire`: bytes on the wire per message kind, and codec speed.

Fields take worst-case widths (random u64 msg_id, u32 fingerprint tag, round > 65535) so the numbers
are upper bounds for real traffic. Targets (issue 4): Update at T=10 <= 80 bytes (<= 8 B/step),
RoundResult for 10 clients at T=10 < 1 KB.
"""

from __future__ import annotations

import argparse
import logging
import time
from typing import Any

from bench.cli import print_json_last
from shared.apply import fedavg_scalars
from shared.codec import decode, encode
from shared.fingerprint import fp_tag
from shared.messages import Heartbeat, RoundPlan, RoundResult, Update
from shared.prng import derive_seed, directions, mix64

log = logging.getLogger(__name__)
FP = "5e" * 32
CHECKSUM = "c4" * 32
MASK_ID = "0123456789abcdef"
ROUND = 123_456


def _grads(client: int, T: int) -> tuple[float, ...]:
    return tuple(float(g) * 0.37 for g in directions(derive_seed(17, client), T, "gaussian"))


def update(T: int, client: int = 0) -> Update:
    return Update(round=ROUND, msg_id=mix64(client * 1000 + T), grads=_grads(client, T), n_samples=5000,
                  fp_tag=fp_tag(FP), loss=2.3456)  # fmt: skip


def round_result(n_clients: int, T: int) -> RoundResult:
    seeds = tuple(derive_seed(99, ROUND, t) for t in range(T))
    per_client = {f"client-{k:03d}": list(_grads(k, T - k % 3)) for k in range(n_clients)}
    weights = {c: 100.0 + 10 * k for k, c in enumerate(per_client)}
    scalars = fedavg_scalars(per_client, weights, T)
    return RoundResult(round=ROUND, seeds=seeds, scalars=tuple(scalars), lr=1e-6, dist="gaussian",
                       n_clients=n_clients, values_checksum=CHECKSUM)  # fmt: skip


def round_plan(n_clients: int, T: int) -> RoundPlan:
    return RoundPlan(fleet="fleet-1", round=ROUND, seeds=tuple(derive_seed(99, ROUND, t) for t in range(T)),
                     lr=1e-6, eps=1e-3, dist="gaussian", steps={f"client-{k:03d}": T for k in range(n_clients)},
                     base_round=ROUND - 1, deadline=1.75e9, fingerprint=FP, mask_id=MASK_ID, batch_size=16,
                     values_checksum=CHECKSUM)  # fmt: skip


def _time_us(fn: Any, reps: int) -> float:
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) / reps * 1e6


def run(args: argparse.Namespace) -> int:
    sizes = {T: len(encode(update(T))) for T in (1, 10, 100)}
    rr = len(encode(round_result(10, 10)))
    plan = len(encode(round_plan(10, 10)))
    plan_big = encode(round_plan(args.big_fleet, 10))
    hb = len(encode(Heartbeat("c", 1.75e9, 37.5, 1 << 30, 2 << 30, 61.0, 12.5, 0.42, 3 << 30, ROUND)))
    u10 = update(10)
    data10 = encode(u10)
    enc_us = _time_us(lambda: encode(u10), args.reps)
    dec_us = _time_us(lambda: decode(data10, Update, client="client-000"), args.reps)
    result = {
        "update_bytes": {str(T): n for T, n in sizes.items()},
        "update_bytes_per_step_T10": sizes[10] / 10,
        "update_bytes_per_step_T100": sizes[100] / 100,
        "round_result_bytes_10clients_T10": rr,
        "round_plan_bytes_10clients_T10": plan,
        f"round_plan_bytes_{args.big_fleet}clients_T10": len(plan_big),
        "round_plan_big_compressed": bool(plan_big[1] & 1),
        "heartbeat_bytes": hb,
        "update_encode_us": round(enc_us, 2),
        "update_decode_us": round(dec_us, 2),
        "targets_met": sizes[10] <= 80 and rr < 1024,
    }
    for T, n in sizes.items():
        print(f"Update T={T:<3d} {n:5d} B  ({n / T:.1f} B/step)")
    print(f"RoundResult 10 clients T=10: {rr} B; RoundPlan 10 clients: {plan} B; "
          f"{args.big_fleet} clients: {len(plan_big)} B; Heartbeat: {hb} B")  # fmt: skip
    print(f"Update T=10 encode {enc_us:.1f} us, decode {dec_us:.1f} us")
    if args.json:
        print_json_last(result)
    return 0 if result["targets_met"] else 1


def add_parser(sub: Any) -> None:
    p = sub.add_parser("wire", help="bytes per message kind on the wire (Update T=1/10/100, RoundResult)")
    p.add_argument("--big-fleet", type=int, default=1000, help="clients in the large RoundPlan sample")
    p.add_argument("--reps", type=int, default=2000, help="repetitions for encode/decode timing")
    p.add_argument("--json", action="store_true", help="print the JSON result as the last line")
    p.set_defaults(func=run)


__all__ = ["add_parser", "round_plan", "round_result", "run", "update"]
