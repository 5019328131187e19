"""Decoding costs O(a type's allowed size), never O(what a payload claims) (issue 14, item 1).

For every message type, the worst payloads that fit its payload limit -- zstd bombs (the measured 538-byte
Update that expanded into ~16.7 million empty maps, max-size frames of zeros, frames with no declared
size), nested maps/arrays, huge declared lengths, the widest legal shape -- decode or are refused in
< 50 ms (minimum of 3 runs) and < 64 MiB peak Python memory (tracemalloc); a coordinator-sent type's bomb
may take as long as its largest legal message takes on the same machine, when that is more than 50 ms (the
widest RoundPlan map is legal: what it costs follows from the type's limits, and a slow box pays it). The
largest LEGAL messages are measured too: device-sent types within the same bounds;
coordinator-sent types (RoundPlan, RoundResult, Replay, CheckpointChunk) may take longer, linearly in
their size, and stay under 64 MiB. Whole file: ~10 s.
"""

from __future__ import annotations

import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zstandard

from shared.codec import HEADER_LEN, LIMITS, SCHEMAS, DecodeError, ErrorCode, decode, encode
from shared.messages import (
    MAX_CAPS,
    MAX_CHUNK,
    MAX_PLAN_CLIENTS,
    MAX_SEEDS,
    MAX_STEPS,
    MAX_STR,
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
from shared.prng import raw_u64

FAST_S = 0.050
PEAK_BYTES = 64 << 20
FP = "ab" * 32
MID = "0123456789abcdef"
DEVICE_SENT = (Join, Update, Heartbeat, Status, SyncRequest)


def _zstd(body: bytes, *, size: bool = True) -> bytes:
    return zstandard.ZstdCompressor(level=3, write_content_size=size).compress(body)


def _payload(cls: type, body: bytes, zstd: bool) -> bytes:
    code = SCHEMAS[cls][0]
    return bytes((0xB1, 1 if zstd else 0, code)) + body


def bomb_538() -> bytes:
    """The measured bomb: an Update whose zstd frame expands to one array32 of ~16.7M empty fixmaps."""
    n = (16 << 20) - 5
    return _payload(Update, _zstd(b"\xdd" + n.to_bytes(4, "big") + b"\x80" * n), True)


def _fit(cls: type, body: bytes) -> bytes:
    """`body` cut to what the type allows (plain, or zstd when the plain body is over the payload limit)."""
    lim = LIMITS[cls]
    body = body[: lim.max_body]
    if HEADER_LEN + len(body) <= lim.max_payload:
        return _payload(cls, body, False)
    return _payload(cls, _zstd(body), True)


def bombs(cls: type) -> Iterator[tuple[str, bytes]]:
    """Hostile payloads within (or right at) the type's payload limit."""
    lim = LIMITS[cls]
    big = lim.max_body
    yield "538-byte array of 16.7M fixmaps", _payload(cls, bomb_538()[HEADER_LEN:], True)
    fixmaps = b"\xdd" + (big - 5).to_bytes(4, "big") + b"\x80" * (big - 5)
    yield "array of fixmaps filling the body", _fit(cls, fixmaps)
    yield "zeros, declared size = limit", _payload(cls, _zstd(b"\x00" * big), True)
    yield "zeros, size not declared, limit + 1", _payload(cls, _zstd(b"\x00" * (big + 1), size=False), True)
    yield "zeros, 64 MiB declared", _payload(cls, _zstd(b"\x00" * (64 << 20)), True)
    yield "nested maps {0: {0: ...}}", _fit(cls, b"\x81\x00" * (big // 2))
    yield "nested arrays [[[...]]]", _fit(cls, b"\x91" * big)
    yield "map of nested arrays", _fit(cls, b"\x81\x00" + b"\x91" * big)
    for hdr in (b"\xdd", b"\xdf", b"\xdb", b"\xc6", b"\xc9"):  # array32/map32/str32/bin32/ext32
        yield (
            f"declared length 2^32-1 ({hdr.hex()})",
            _payload(cls, b"\x81\x00" + hdr + b"\xff\xff\xff\xff", False),
        )
    wide = lim.max_map
    flat = msgpack.packb({i: {} for i in range(wide)}, use_bin_type=True)
    yield "widest map of empty maps", _fit(cls, flat)
    flat = b"\xdf" + wide.to_bytes(4, "big") + b"".join(msgpack.packb(i) + b"\x00" for i in range(wide))
    yield "widest map of ints", _fit(cls, flat)
    many = b"\x81\x00\xdd" + lim.max_array.to_bytes(4, "big") + b"\x80" * lim.max_array
    yield "longest array of empty maps", _fit(cls, many)
    small_window = zstandard.ZstdCompressionParameters.from_level(3, window_log=10, write_content_size=False)
    stream = zstandard.ZstdCompressor(compression_params=small_window)
    yield (
        "zeros, 1 KiB window, size not declared, 64 MiB",
        _payload(cls, stream.compress(b"\x00" * (64 << 20)), True),
    )
    window = bytearray(_zstd(b"\x81\x00\x00" + b"\x00" * 2000, size=False))
    yield "zstd frame asking for a 2 GiB window", _payload(cls, _window(bytes(window), 31), True)


def _window(frame: bytes, log: int) -> bytes:
    """Rewrite a single-segment-less frame header to declare window 2**log (Window_Descriptor byte)."""
    fhd = frame[4]
    assert not fhd & 0x20, "frame must not be single-segment"
    return frame[:5] + bytes(((log - 10) << 3,)) + frame[6:]


def _legal_max(cls: type) -> Any:
    """The largest legal message of each type (what an honest sender may send at most)."""
    seeds = tuple(int(s) for s in raw_u64(1, MAX_SEEDS))
    if cls is Join:
        caps: dict[str, str | int | float | bool] = {f"{i:02d}" + "😀" * 62: "😀" * 256 for i in range(MAX_CAPS)}  # 4-byte UTF-8 chars
        return Join("", FP, MID, 1 << 31, 1e6, caps, 1 << 31)
    if cls is RoundPlan:
        steps = {f"c{i:063d}": 1 + i % MAX_STEPS for i in range(MAX_PLAN_CLIENTS)}
        return RoundPlan(
            "f" * 64, 1 << 31, seeds[:MAX_STEPS], 0.1, 0.1, "gaussian", steps, 1 << 30, 1.7e9, FP, MID, 8, FP
        )
    if cls is Update:
        grads = tuple(float(i) * 1.1 for i in range(MAX_STEPS))
        return Update(1 << 31, (1 << 64) - 1, grads, 1 << 31, 1 << 31, 0.5)
    if cls is RoundResult:
        return RoundResult(1 << 31, seeds, tuple(s / 2**64 for s in seeds), 0.1, "gaussian", 1 << 31, FP)
    if cls is Heartbeat:
        return Heartbeat("", 1.7e9, 99.5, 1 << 40, 1 << 40, 55.5, 9.5, 0.25, 1 << 40, 1 << 31)
    if cls is Status:
        return Status("", True, 1.7e9)
    if cls is SyncRequest:
        return SyncRequest("", 1 << 31)
    if cls is Replay:  # as many 512-pair results as fit the body limit (~16 KiB of msgpack each)
        scalars = tuple(s / 2**64 for s in seeds[:512])
        n = LIMITS[Replay].max_body // (16 * 512 + 100)
        return Replay(tuple(RoundResult(r, seeds[:512], scalars, 0.1, "gaussian", 3, FP) for r in range(n)))
    if cls is CheckpointChunk:
        data = b"".join(int(u).to_bytes(8, "little") for u in raw_u64(2, MAX_CHUNK // 8))
        return CheckpointChunk(1 << 31, 0, 1, FP, data)
    if cls is ErrorMsg:
        return ErrorMsg(0xFFFF, "€" * MAX_STR)
    if cls is RunState:
        return RunState("finishing", 1 << 31, 1.7e9, "€" * MAX_STR)
    raise AssertionError(cls)


def _cost(data: bytes) -> tuple[str, float, int]:
    """(outcome, best seconds of 3, peak traced bytes)."""
    best = float("inf")
    outcome = ""
    for _ in range(3):
        t0 = time.perf_counter()
        try:
            decode(data, client="c1")
            outcome = "ok"
        except DecodeError as exc:
            outcome = exc.code.name
        best = min(best, time.perf_counter() - t0)
    tracemalloc.start()
    try:
        try:
            decode(data, client="c1")
        except DecodeError:
            pass
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return outcome, best, peak


def _time_limit(cls: type) -> float:
    """What a bomb of type `cls` may cost: FAST_S for a device-sent type; for a coordinator-sent one, FAST_S or,
    when more, what its largest LEGAL message costs on this machine in this run (a RoundPlan may legally hold
    100,000 plan entries, so its widest bomb costs what unpacking 100,000 ints costs: 19 ms on a quiet box,
    52 ms measured on a slow loaded one, while its legal maximum took ~8x that)."""
    if cls in DEVICE_SENT:
        return FAST_S
    return max(FAST_S, _cost(encode(_legal_max(cls)))[1])


@pytest.mark.parametrize("cls", list(SCHEMAS), ids=lambda c: c.__name__)
def test_bombs_are_cheap_for_every_type(cls: type) -> None:
    limit = _time_limit(cls)
    for name, data in bombs(cls):
        outcome, secs, peak = _cost(data)
        assert outcome != "ok", f"{cls.__name__} {name}: a bomb decoded"
        assert secs < limit, f"{cls.__name__} {name}: {secs * 1e3:.1f} ms ({outcome}), limit {limit * 1e3:.1f} ms"
        assert peak < PEAK_BYTES, f"{cls.__name__} {name}: peak {peak >> 20} MiB ({outcome})"


def test_the_538_byte_update_is_refused_before_decompression() -> None:
    data = bomb_538()
    assert len(data) == 538
    with pytest.raises(DecodeError) as ei:
        decode(data, Update, client="c1")
    assert ei.value.code == ErrorCode.TOO_LARGE and "declares" in ei.value.reason
    # the same bomb with its size hidden stops after the Update's body limit, not 16 MiB later
    hidden = bytes(data[:HEADER_LEN]) + _zstd(bomb_538_body(), size=False)
    outcome, secs, peak = _cost(hidden)
    assert outcome == "TOO_LARGE" and secs < FAST_S and peak < 4 * LIMITS[Update].max_body + (2 << 20)


def bomb_538_body() -> bytes:
    n = (16 << 20) - 5
    return b"\xdd" + n.to_bytes(4, "big") + b"\x80" * n


@pytest.mark.parametrize("cls", list(SCHEMAS), ids=lambda c: c.__name__)
def test_largest_legal_message_decodes_within_bounds(cls: type) -> None:
    msg = _legal_max(cls)
    data = encode(msg)
    outcome, secs, peak = _cost(data)
    assert outcome == "ok"
    assert peak < PEAK_BYTES, f"{cls.__name__}: peak {peak >> 20} MiB"
    if cls in DEVICE_SENT:
        assert secs < FAST_S, f"{cls.__name__}: {secs * 1e3:.1f} ms"
    else:  # coordinator-sent, trusted through the broker ACL: linear in size (~0.1 s per 8 MB plan here)
        assert secs < 2.0, f"{cls.__name__}: {secs * 1e3:.1f} ms"


def test_limits_hold_every_largest_legal_message() -> None:
    """The derived limits are tight enough to matter and loose enough for every legal message."""
    for cls in SCHEMAS:
        if cls in (Replay,):
            continue  # capped below the schema's maximum on purpose (4 MiB; the coordinator sends chunks)
        body = len(encode(_legal_max(cls))) - HEADER_LEN
        lim = LIMITS[cls]
        assert body <= lim.max_body
    assert LIMITS[Update].max_payload < 17 << 10  # 4096 f32 + fixed fields, not the old 64 KiB
    with pytest.raises(ValueError, match="over its limit"):
        encode(Replay(_legal_max(Replay).results * 2))


def test_protocol_doc_lists_the_limits() -> None:
    """docs/PROTOCOL.md §2 is what people read: its limits table must be LIMITS, number for number."""
    doc = (Path(__file__).resolve().parents[2] / "docs" / "PROTOCOL.md").read_text()
    rows = {}
    for line in doc.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 10 and cells[0].isdigit():
            rows[cells[1]] = [int(c.replace(" ", "")) for c in cells[2:]]
    for cls, lim in LIMITS.items():
        want = [lim.max_payload, lim.max_body, lim.max_str, lim.max_bin, lim.max_array, lim.max_map]
        assert rows[cls.__name__] == [*want, lim.max_containers, lim.max_depth], cls.__name__
