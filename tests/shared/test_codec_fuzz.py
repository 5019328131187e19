"""Fuzz the decoder: random bytes, mutated and truncated valid payloads, hostile msgpack bodies.

The only exception decode may ever raise is DecodeError (with an ErrorCode).
"""

from __future__ import annotations

from typing import Any

import msgpack
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from wire_strategies import any_message

from shared.codec import SCHEMAS, DecodeError, ErrorCode, decode, encode

TYPE_CODES = sorted(c for c, _, _ in SCHEMAS.values())
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _decode_or_error(data: bytes, **kw: Any) -> None:
    try:
        decode(data, **kw)
    except DecodeError as exc:
        assert isinstance(exc.code, ErrorCode) and exc.reason


@FUZZ
@given(st.binary(max_size=300))
def test_random_bytes(data: bytes) -> None:
    _decode_or_error(data)


@FUZZ
@given(st.sampled_from(TYPE_CODES), st.integers(0, 1), st.binary(max_size=300))
def test_random_body_behind_valid_header(code: int, flags: int, body: bytes) -> None:
    _decode_or_error(bytes((0xB1, flags, code)) + body)


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(1 << 63), (1 << 64) - 1)
    | st.floats()
    | st.text(max_size=20)
    | st.binary(max_size=40),
    lambda inner: (
        st.lists(inner, max_size=5)
        | st.dictionaries(st.integers(-2, 15) | st.text(max_size=3), inner, max_size=6)
    ),
    max_leaves=12,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(TYPE_CODES), st.dictionaries(st.integers(0, 13), msgpack_values, max_size=14))
def test_hostile_msgpack_maps(code: int, body: dict[int, Any]) -> None:
    _decode_or_error(bytes((0xB1, 0, code)) + msgpack.packb(body, use_bin_type=True), client="c1")


@FUZZ
@given(any_message, st.data())
def test_mutated_valid_payloads(msg: Any, data: st.DataObject) -> None:
    raw = bytearray(encode(msg))
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]))
        pos = data.draw(st.integers(0, max(len(raw) - 1, 0)))
        if op == "flip" and raw:
            raw[pos] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "set" and raw:
            raw[pos] = data.draw(st.integers(0, 255))
        elif op == "insert":
            raw[pos:pos] = data.draw(st.binary(min_size=1, max_size=8))
        elif op == "delete" and raw:
            del raw[pos]
        elif op == "truncate":
            del raw[pos:]
    _decode_or_error(bytes(raw), client="c1")


@FUZZ
@given(any_message)
def test_every_truncation(msg: Any) -> None:
    raw = encode(msg)
    for n in range(len(raw)) if len(raw) < 200 else range(0, len(raw), max(1, len(raw) // 200)):
        _decode_or_error(raw[:n])


@FUZZ
@given(any_message, st.integers(0, 4))
def test_compressed_mutations(msg: Any, seed: int) -> None:
    body = encode(msg)[3:]
    flags = encode(msg)[1]
    if not flags:
        body = msgpack.packb(msgpack.unpackb(body, strict_map_key=False), use_bin_type=True)
    frame = bytearray(zstandard.ZstdCompressor(write_content_size=bool(seed % 2)).compress(body))
    if frame:
        frame[(seed * 7919) % len(frame)] ^= 0x5A
    _decode_or_error(bytes((0xB1, 1, encode(msg)[2])) + bytes(frame))


def test_deeply_nested_and_bomb_bodies() -> None:
    nested = b"\x81\x00" + b"\x91" * 5000 + b"\x01"  # {0: [[[...1...]]]} 5000 deep
    for body in (
        nested,
        b"\x91" * 100_000,
        b"\xdd\xff\xff\xff\xff",
        b"\xdf\xff\xff\xff\xff",
    ):
        _decode_or_error(bytes((0xB1, 0, 2)) + body)
    bomb = zstandard.ZstdCompressor(write_content_size=False).compress(b"\x91" * (20 << 20))
    _decode_or_error(bytes((0xB1, 1, 2)) + bomb)
