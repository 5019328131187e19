"""shared/codec/fastpath.py: the one-pass Heartbeat and Update decoders give exactly what the general path
(a reader per field, then the constructor's checks) gives, or leave the map to it; errors therefore stay
the same."""

from __future__ import annotations

import dataclasses
import math
import struct
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
from wire_checks import decode_without_post_init

from shared import prng
from shared.codec import DecodeError, encode, fastpath, schema
from shared.fields import U32, U64
from shared.messages import Heartbeat, Update

FLOATS = [0.0, -0.0, 0.1, 1.0, 1.0000001, 1.5, -1.0, 45.0, 1e5, 100000.01, 1e6, 1e6 + 1, 1e9, 3.4e38, 3.5e38, 1e39, -300.0,
          -300.5, 1000.0, 1000.5, math.nan, math.inf, -math.inf, 1.7e9]
INTS = [0, 1, -1, -2, 5, 200 << 20, U32, U32 + 1, U64, U64 + 1, -(1 << 63)]
OTHER = [True, False, None, "busy", "", b"\x00", [1], {"a": 1}]


PLAIN: dict[int, list[Any]] = {  # per key, values a device sends (the eval/DP/pause ones as a set, or not at all)
    0: [1.7e9, 0.0], 1: [0.0, 3.3, 1e5], 2: [0, 1 << 30], 3: [0, 1 << 33], 4: [-300.0, 45.1, 1000.0],
    5: [0.0, 7.5], 6: [0.0, 0.25], 7: [1 << 30], 8: [-1, 0, U32], 9: [3], 10: [0.5], 11: [0.9], 12: [64],
    13: [1.5], 14: [1e-5], 15: [True, False], 16: [True, False], 17: ["busy"], 18: [0.0, 0.3, 1.0],
    19: [0, U64],
}


LEFT = (9, 10, 11, 12, 13, 14, 17)  # the eval, DP and pause_reason keys: the fast path leaves them


class Draws:
    """random()/randrange()/choice() over `shared.prng` (the project's one source of random streams)."""

    def __init__(self, seed: int) -> None:
        self.seed, self.offset, self.block = seed, 0, np.zeros(0, dtype=np.uint64)

    def _u64(self) -> int:
        if not len(self.block):
            self.block = prng.raw_u64(self.seed, 4096, offset=self.offset)
            self.offset += 4096
        v, self.block = int(self.block[0]), self.block[1:]
        return v

    def random(self) -> float:
        return (self._u64() >> 11) / float(1 << 53)

    def randrange(self, n: int) -> int:
        return self._u64() % n

    def choice(self, seq: Sequence[Any]) -> Any:
        return seq[self.randrange(len(seq))]


def _value(rng: Draws) -> Any:
    pool: list[Any] = rng.choice([FLOATS, FLOATS, INTS, INTS, OTHER])
    return rng.choice(pool)


def _outcome(m: dict[int, Any], client: str, cls: type[Heartbeat] | type[Update] = Heartbeat) -> tuple[str, Any]:
    """("ok", every field with its value and type) or ("error", (code, reason)): what decoding `m` gives."""
    try:
        msg = schema.from_map(cls, m, client)
    except DecodeError as e:
        return "error", (e.code, e.reason)
    return "ok", [(f.name, getattr(msg, f.name), type(getattr(msg, f.name))) for f in dataclasses.fields(msg)]


def test_random_maps_decode_the_same_with_and_without_the_fast_path(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = Draws(20261205)
    taken = valid = 0
    for _ in range(20000):
        m: dict[int, Any] = {}
        odd = rng.random() < 0.3  # else the values are ones a device sends, but for one (edge or wrong kind)
        for key in range(20):
            if rng.random() < (0.97 if key in (0, 1, 2, 8) else 0.04 if key in LEFT else 0.4):
                m[key] = _value(rng) if odd else rng.choice(PLAIN[key])
        if not odd and rng.random() < 0.8:
            m[rng.randrange(20)] = _value(rng)
        client = rng.choice(["d00001", "", "bad id"])
        fast = _outcome(m, client)
        taken += fast[0] == "ok" and fastpath.heartbeat(m, client) is not None
        with monkeypatch.context() as mp:
            mp.setattr(schema, "_FAST", {})
            general = _outcome(m, client)
        if general != fast:  # NaN never reaches an accepted Heartbeat, so == is exact here
            raise AssertionError(f"map {m!r} client {client!r}: general {general!r}, fast {fast!r}")
        valid += general[0] == "ok"
    assert valid > 1500 and taken > valid // 2, (valid, taken)  # both outcomes are exercised


def test_a_device_heartbeat_takes_the_fast_path_and_round_trips(monkeypatch: pytest.MonkeyPatch) -> None:
    hb = Heartbeat("", 1.7e9, 3.3, 200 << 20, None, 45.1, 5.0, 0.5, 300 << 20, 4, available=True,
                   trained_share=0.25, peak_rss_bytes=301 << 20)
    got = decode_without_post_init(monkeypatch, encode(hb), Heartbeat, "dev-a")
    assert got == dataclasses.replace(hb, client="dev-a")
    assert got.cpu_pct == hb.cpu_pct != 3.3  # rounded to float32 on both paths


def test_random_update_maps_decode_the_same_with_and_without_the_fast_path(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = Draws(31)
    grads = [struct.pack("<3f", 0.5, -1.25, 3.0), struct.pack("<1f", 1e-30), b"", b"\x00\x00\x80", b"\x00" * 4 * 4097,
             struct.pack("<2f", 1.0, math.nan), struct.pack("<2f", math.inf, 1.0), "abc", 5]
    plain: dict[int, list[Any]] = {0: [0, 7, U32], 1: [0, U64], 2: grads[:2], 3: [0, 100, U32], 4: [0, U32], 5: [2.0, 0.1, 3.4028234663852886e38]}
    taken = valid = 0
    for _ in range(10000):
        m: dict[int, Any] = {k: rng.choice(v) for k, v in plain.items()}
        if rng.random() < 0.7:  # one value off: an edge, a wrong kind
            k = rng.randrange(6)
            m[k] = rng.choice(grads) if k == 2 else _value(rng)
        client = rng.choice(["d00001", ""])
        fast = _outcome(m, client, Update)
        taken += fast[0] == "ok" and fastpath.update(m, client) is not None
        with monkeypatch.context() as mp:
            mp.setattr(schema, "_FAST", {})
            general = _outcome(m, client, Update)
        if general != fast:
            raise AssertionError(f"map {m!r} client {client!r}: general {general!r}, fast {fast!r}")
        valid += general[0] == "ok"
    assert valid > 3000 and taken > valid // 2, (valid, taken)
