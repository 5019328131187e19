"""The wire's limits and the field checks every message runs when it is built (shared/messages.py): each
check raises ValueError naming the message, the field and what was expected.
"""

from __future__ import annotations

import math
import struct
from array import array
from collections.abc import Sequence
from typing import Any

from shared.prng import DISTS
from shared.topics import ID_RE

U32 = (1 << 32) - 1
U64 = (1 << 64) - 1
I64_MIN, I64_MAX = -(1 << 63), (1 << 63) - 1
MAX_STEPS = 4096  # grads in one Update (local steps T_k)
MAX_SEEDS = 65536  # (seed, scalar) pairs in a RoundResult (a RoundPlan has at most MAX_STEPS seeds)
MAX_PLAN_CLIENTS = 100_000  # entries of RoundPlan.steps
MAX_REPLAY = 1024  # RoundResults in one Replay
MAX_CHUNK = 1 << 20  # bytes of CheckpointChunk.data
MAX_STR = 1024  # any free-text string (reasons, descriptions)
MAX_REASON = 32  # Heartbeat.pause_reason
PAUSE_REASONS = ("on battery", "busy", "hot", "outside window", "low memory")  # what a 1.3 device sends
MAX_CAPS = 64  # entries of Join.capabilities


def _int(obj: str, name: str, v: Any, lo: int, hi: int) -> int:
    if v.__class__ is int and lo <= v <= hi:  # the common case first (decode is hot)
        return v
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"{obj}.{name}: expected int in [{lo}, {hi}], got {type(v).__name__}")
    if not lo <= v <= hi:
        raise ValueError(f"{obj}.{name}: expected int in [{lo}, {hi}], got {v}")
    return v


def _opt_int(obj: str, name: str, v: Any, lo: int, hi: int) -> int | None:
    return None if v is None else _int(obj, name, v, lo, hi)


def _float(obj: str, name: str, v: Any, lo: float = -math.inf, hi: float = math.inf) -> float:
    if v.__class__ is float and lo <= v <= hi and math.isfinite(v):  # the common case first (decode is hot)
        return v
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"{obj}.{name}: expected finite float, got {type(v).__name__}")
    f = float(v)
    if not math.isfinite(f) or not lo <= f <= hi:
        raise ValueError(f"{obj}.{name}: expected finite float in [{lo}, {hi}], got {v!r}")
    return f


def _opt_float(obj: str, name: str, v: Any, lo: float = -math.inf, hi: float = math.inf) -> float | None:
    return None if v is None else _float(obj, name, v, lo, hi)


_F32 = struct.Struct("<f")
F32_MAX = 3.4028234663852886e38  # the largest finite float32: a float64 within +-F32_MAX never rounds to inf


def _to_f32(f: float) -> float:
    return float(_F32.unpack(_F32.pack(f))[0])


def _f32(obj: str, name: str, v: Any, lo: float = -math.inf, hi: float = math.inf) -> float:
    """A finite float rounded to the nearest float32 (what the wire carries), so decode(encode(m)) == m."""
    f = _float(obj, name, v, lo, hi)
    try:
        r = _to_f32(f)
    except OverflowError as exc:
        raise ValueError(f"{obj}.{name}: {v!r} does not fit float32") from exc
    return r


def _f32s(obj: str, name: str, items: Sequence[Any]) -> tuple[float, ...]:
    """`_f32` of each item. Fast path (the coordinator decodes thousands of Updates a second): plain
    floats, finite before and after one C float32 rounding (array "f" rounds like struct "<f"), give the
    same tuple; anything else takes the checked path and its error names the item."""
    if all(type(g) is float for g in items):
        out = tuple(array("f", items))
        if all(map(math.isfinite, items)) and all(map(math.isfinite, out)):
            return out
    return tuple(_f32(obj, f"{name}[{i}]", g) for i, g in enumerate(items))


def _opt_f32(obj: str, name: str, v: Any, lo: float = -math.inf, hi: float = math.inf) -> float | None:
    return None if v is None else _f32(obj, name, v, lo, hi)


def _str(obj: str, name: str, v: Any, max_len: int = MAX_STR) -> str:
    if not isinstance(v, str):
        raise ValueError(f"{obj}.{name}: expected str, got {type(v).__name__}")
    if len(v) > max_len:
        raise ValueError(f"{obj}.{name}: longer than {max_len} chars ({len(v)})")
    return v


def _hex(obj: str, name: str, v: Any, n: int) -> str:
    if not isinstance(v, str) or len(v) != n or any(c not in "0123456789abcdef" for c in v):
        raise ValueError(f"{obj}.{name}: expected {n} lowercase hex chars, got {v!r}")
    return v


def _client(obj: str, name: str, v: Any, allow_empty: bool) -> str:
    if allow_empty and v == "":
        return ""
    if not isinstance(v, str) or not ID_RE.match(v):
        raise ValueError(f"{obj}.{name}: expected a client id ([A-Za-z0-9][A-Za-z0-9_.-]{{0,63}}), got {v!r}")
    return v


def _seq(obj: str, name: str, v: Any, lo_len: int, hi_len: int) -> tuple[Any, ...]:
    if isinstance(v, (str, bytes, dict)) or not hasattr(v, "__len__") or not hasattr(v, "__iter__"):
        raise ValueError(f"{obj}.{name}: expected a sequence, got {type(v).__name__}")
    if not lo_len <= len(v) <= hi_len:
        raise ValueError(f"{obj}.{name}: expected {lo_len}..{hi_len} items, got {len(v)}")
    return tuple(v)


def _seeds(obj: str, name: str, v: Any, lo_len: int = 0, hi_len: int = MAX_SEEDS) -> tuple[int, ...]:
    items = _seq(obj, name, v, lo_len, hi_len)
    return tuple(_int(obj, f"{name}[{i}]", s, 0, U64) for i, s in enumerate(items))


def _dist(obj: str, v: Any) -> None:
    if v not in DISTS:
        raise ValueError(f"{obj}.dist: expected one of {DISTS}, got {v!r}")


def _set(self: object, name: str, value: Any) -> None:
    object.__setattr__(self, name, value)
