"""100 000+ hostile payloads through decode + message validation: 0 crashes, only DecodeError (issue 14).

Bulk: a fast deterministic generator (random stream from shared.prng, no hypothesis overhead) mixes
mutated valid payloads, random msgpack structures behind every type code (plain and zstd), random bytes
and spliced headers -- 100 000 payloads in ~10 s on one core here. Structure: hypothesis replaces one
field of a valid message body with an arbitrary msgpack value (600 examples, ~3 s).

HOOK for the round core (issue 14): every successfully decoded message is handed to the callables in
SINKS. `BookSink` feeds each client -> coordinator message to a live RoundBook (coordinator/rounds.py,
joined client `dev-1`, a round open) and checks that nothing raises and that a message the book REFUSES
(a RejectRecord) changes none of its round state; a sink may raise only its own documented rejection,
anything else fails the test.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable, Iterator
from typing import Any

import msgpack
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coordinator.actions import Persist
from coordinator.records import RejectRecord
from coordinator.rounds import RoundBook
from shared.apply import values_checksum
from shared.codec import SCHEMAS, DecodeError, ErrorCode, decode, encode
from shared.messages import (
    CheckpointChunk,
    ErrorMsg,
    Heartbeat,
    Join,
    Message,
    Replay,
    RoundPlan,
    RoundResult,
    Status,
    SyncRequest,
    Update,
)
from shared.prng import raw_u64

N_BULK = 100_000
FP = "0123456789abcdef" * 4
MID = "fedcba9876543210"
TYPE_CODES = sorted(code for code, _, _ in SCHEMAS.values())
SINKS: list[Callable[[Message], None]] = []  # the round core's hook (see the module docstring)


class BookSink:
    """Feeds decoded messages to a RoundBook; a refused message must leave the round state untouched."""

    def __init__(self) -> None:
        import torch

        from coordinator.config import CoordinatorConfig

        cfg = CoordinatorConfig(fleet="f1", steps=4, min_clients=1, rate_per_s=1e9, rate_burst=10**9, metrics=False)
        self.book = RoundBook(cfg, fingerprint=FP, mask_id=MID, values=torch.zeros(64, dtype=torch.float32))
        self.now = 0.0
        self.fed = self.refused = 0
        self.book.handle(Join("dev-1", FP, MID, 100, 1.0, {}, -1), self.now)
        self.book.tick(self.now)

    def state(self) -> tuple[Any, ...]:
        b = self.book
        return (b.last_round, b.plan, sorted(b.accepted), sorted(b.late), dict(b.stored),
                {k: (c.state, c.n_samples) for k, c in b.registry.clients.items()}, values_checksum(b.values),
                b.admission.grads.counted, dict(b.admission.benched))  # fmt: skip

    def __call__(self, msg: Message) -> None:
        if not isinstance(msg, (Join, Update, Heartbeat, Status, SyncRequest)):
            return
        self.now += 0.001
        before = self.state()
        acts = self.book.handle(msg, self.now)
        self.fed += 1
        if any(isinstance(a, Persist) and isinstance(a.record, RejectRecord) for a in acts):
            self.refused += 1
            assert self.state() == before, f"a refused {type(msg).__name__} changed the book: {msg!r}"
        if self.fed % 1000 == 0:
            self.book.tick(self.now)


SINKS.append(BOOK := BookSink())


def _samples() -> list[Message]:
    r = RoundResult(7, (1, 2, 3), (0.5, -0.25, 1e-9), 1e-3, "gaussian", 2, FP)
    return [
        Join("", FP, MID, 100, 3.5, {"gpu": "orin", "cores": 6, "cuda": True, "ghz": 1.5}, 4),
        RoundPlan(
            "f1", 8, (11, 12, 13, 14), 1e-3, 1e-3, "rademacher", {"a": 4, "b": 2}, 7, 1.7e9, FP, MID, 8, FP
        ),
        Update(8, 99, tuple(0.1 * i for i in range(40)), 100, 0xDEADBEEF, 0.69),
        r,
        Heartbeat("", 1.7e9, 55.0, 1 << 30, None, 61.5, None, 0.2, 1 << 31, 8),
        Status("", True, 1.7e9),
        SyncRequest("", 6),
        Replay((r, RoundResult(8, (4,), (0.1,), 1e-3, "gaussian", 1, FP))),
        CheckpointChunk(8, 0, 2, FP, bytes(range(256)) * 4),
        ErrorMsg(37, "slow down"),
    ]


class Stream:
    """Random draws from one shared.prng stream, refilled in blocks (fast enough for 10^5 payloads)."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.block = 0
        self.buf: list[int] = []

    def u64(self) -> int:
        if not self.buf:
            self.buf = [int(x) for x in raw_u64(self.seed, 4096, offset=4096 * self.block)]
            self.block += 1
        return self.buf.pop()

    def below(self, n: int) -> int:
        return self.u64() % n

    def bytes(self, n: int) -> bytes:
        words = (n + 7) // 8
        return b"".join(self.u64().to_bytes(8, "little") for _ in range(words))[:n]


def _value(s: Stream, depth: int) -> Any:
    k = s.below(12 if depth < 3 else 8)
    if k == 0:
        return None
    if k == 1:
        return bool(s.below(2))
    if k == 2:
        return s.below(300) - 40
    if k == 3:
        return s.u64() - (s.below(2) << 63)
    if k == 4:
        return struct.unpack("<d", s.bytes(8))[0]  # NaN, inf, subnormals included
    if k == 5:
        return s.bytes(s.below(80)).decode("latin-1")
    if k in (6, 7):
        return s.bytes((0, 8, 31, 32, 64, 100)[s.below(6)])  # hash/array-sized bins and near misses
    if k in (8, 9):
        return [_value(s, depth + 1) for _ in range(s.below(5))]
    return {_key(s): _value(s, depth + 1) for _ in range(s.below(7))}


def _key(s: Stream) -> Any:
    k = s.below(10)
    return s.below(16) if k < 8 else ("k" if k == 8 else -1)


def _mutate(s: Stream, raw: bytes) -> bytes:
    b = bytearray(raw)
    for _ in range(1 + s.below(4)):
        op, pos = s.below(6), s.below(max(len(b), 1))
        if op == 0 and b:
            b[pos] ^= 1 << s.below(8)
        elif op == 1 and b:
            b[pos] = s.below(256)
        elif op == 2:
            b[pos:pos] = s.bytes(1 + s.below(8))
        elif op == 3 and b:
            del b[pos]
        elif op == 4:
            del b[pos:]
        else:  # a msgpack length header with a huge count at a random spot
            b[pos:pos] = bytes((0xDC + s.below(4),)) + s.bytes(4)
    return bytes(b)


def payloads(seed: int, n: int) -> Iterator[bytes]:
    s = Stream(seed)
    valid = [encode(m) for m in _samples()]
    zc = zstandard.ZstdCompressor(level=1)
    for _ in range(n):
        kind = s.below(10)
        if kind < 4:
            yield _mutate(s, valid[s.below(len(valid))])
        elif kind < 7:
            body = msgpack.packb({_key(s): _value(s, 1) for _ in range(s.below(14))}, use_bin_type=True)
            code = TYPE_CODES[s.below(len(TYPE_CODES))]
            if s.below(3) == 0:
                frame = zc.compress(body)
                yield bytes((0xB1, 1, code)) + (_mutate(s, frame) if s.below(2) else frame)
            else:
                yield bytes((0xB1, 0, code)) + body
        elif kind < 8:
            yield bytes((0xB1, s.below(2), TYPE_CODES[s.below(len(TYPE_CODES))])) + s.bytes(s.below(200))
        elif kind < 9:  # a valid body behind another type's header
            raw = valid[s.below(len(valid))]
            yield raw[:2] + bytes((TYPE_CODES[s.below(len(TYPE_CODES))],)) + raw[3:]
        else:
            yield s.bytes(s.below(64))


def _feed(data: bytes) -> bool:
    """True when the payload decoded to a valid message (then every sink saw it)."""
    try:
        msg = decode(data, client="dev-1")
    except DecodeError as exc:
        assert isinstance(exc.code, ErrorCode) and exc.reason
        return False
    for sink in SINKS:
        sink(msg)
    return True


def test_100k_hostile_payloads_only_raise_decode_error() -> None:
    t0 = time.perf_counter()
    n = ok = 0
    for data in payloads(0x14_0BAD, N_BULK):
        ok += _feed(data)
        n += 1
    assert n == N_BULK
    assert 0 < ok < n // 2  # the generator reaches the validators, and most payloads are refused
    assert BOOK.fed > 1000 and BOOK.refused > 100, (BOOK.fed, BOOK.refused)  # the round book saw the stream
    assert time.perf_counter() - t0 < 120  # ~10 s here; a hang or a 10x slowdown is a bug


def _field_values() -> st.SearchStrategy[Any]:
    scalars = (
        st.none()
        | st.booleans()
        | st.integers(-(1 << 63), (1 << 64) - 1)
        | st.floats()
        | st.text(max_size=80)
        | st.binary(max_size=300)
    )
    return st.recursive(
        scalars,
        lambda inner: (
            st.lists(inner, max_size=4)
            | st.dictionaries(st.integers(0, 15) | st.text(max_size=3), inner, max_size=4)
        ),
        max_leaves=10,
    )


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(_samples()), st.integers(0, 15), _field_values(), st.booleans())
def test_one_field_replaced_by_anything(msg: Message, key: int, value: Any, zstd: bool) -> None:
    raw = encode(msg)
    body = msgpack.unpackb(raw[3:] if not raw[1] else zstandard.decompress(raw[3:]), strict_map_key=False)
    body[key] = value
    packed = msgpack.packb(body, use_bin_type=True)
    if zstd:
        packed = zstandard.ZstdCompressor().compress(packed)
    _feed(bytes((0xB1, int(zstd), raw[2])) + packed)
