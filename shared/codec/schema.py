"""The message schemas: per type its code, its fields (key, name, kind, size) and each kind's
(to_wire, from_wire) pair. Layout normative in docs/PROTOCOL.md ("Payload"). `to_map` / `from_map` turn a
message into its {int key: value} map and back; every reader raises DecodeError naming the field."""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from operator import countOf
from typing import Any, TypeVar, cast

from shared.codec import fastpath
from shared.codec.base import MAX_PAYLOAD, MAX_REPLAY_BODY, DecodeError
from shared.messages import (
    CLIENT_FROM_TOPIC,
    MAX_CAPS,
    MAX_CHUNK,
    MAX_PLAN_CLIENTS,
    MAX_REASON,
    MAX_REPLAY,
    MAX_SEEDS,
    MAX_STEPS,
    MAX_STR,
    CheckpointChunk,
    ErrorCode,
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
from shared.prng import DISTS, Dist

M = TypeVar("M")


# ---- field kinds: (to_wire, from_wire) pairs ------------------------------------------------------------


def _bad(obj: str, name: str, expected: str, v: Any) -> DecodeError:
    return DecodeError(
        ErrorCode.INVALID_FIELD, f"{obj}.{name}: expected {expected} on the wire, got {type(v).__name__}"
    )


def _w_hex(v: str) -> bytes:
    return bytes.fromhex(v)


def _r_hex(obj: str, name: str, v: Any) -> str:
    if not isinstance(v, bytes):
        raise _bad(obj, name, "bin", v)
    return v.hex()


def _w_arr(fmt: str) -> Callable[[Any], bytes]:
    def w(v: Any) -> bytes:
        return struct.pack(f"<{len(v)}{fmt}", *v)

    return w


def _r_arr(fmt: str) -> Callable[[str, str, Any], tuple[Any, ...]]:
    size = struct.calcsize(fmt)

    def r(obj: str, name: str, v: Any) -> tuple[Any, ...]:
        if not isinstance(v, bytes) or len(v) % size:
            raise _bad(obj, name, f"bin of a multiple of {size} bytes", v)
        return struct.unpack(f"<{len(v) // size}{fmt}", v)

    return r


def _r_typed(expected: type | tuple[type, ...], label: str) -> Callable[[str, str, Any], Any]:
    bool_ok = bool in (expected if isinstance(expected, tuple) else (expected,))

    def r(obj: str, name: str, v: Any) -> Any:
        if not isinstance(v, expected) or (not bool_ok and v.__class__ is bool):
            raise _bad(obj, name, label, v)
        return v

    return r


def _ident(v: Any) -> Any:
    return v


def _w_dist(v: Dist) -> int:
    return DISTS.index(v)


def _r_dist(obj: str, name: str, v: Any) -> Dist:
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < len(DISTS):
        raise DecodeError(ErrorCode.INVALID_FIELD, f"{obj}.{name}: expected 0..{len(DISTS) - 1}, got {v!r}")
    return DISTS[v]


def _r_map(obj: str, name: str, v: Any) -> dict[Any, Any]:
    if not isinstance(v, dict):
        raise _bad(obj, name, "map", v)
    for k in v:
        if not isinstance(k, str):
            raise _bad(obj, f"{name} key", "str", k)
    return dict(v)


def _w_results(v: tuple[RoundResult, ...]) -> list[dict[int, Any]]:
    return [to_map(r) for r in v]


def _r_results(obj: str, name: str, v: Any) -> tuple[RoundResult, ...]:
    if not isinstance(v, list):
        raise _bad(obj, name, "array", v)
    return tuple(from_map(RoundResult, m, "") for m in v)


_r_int = _r_typed(int, "int")
_r_num = _r_typed((int, float), "number")  # f32/f64 fields; ints are accepted and widened
_r_bool = _r_typed(bool, "bool")
_r_str = _r_typed(str, "str")
_r_bin = _r_typed(bytes, "bin")

# kind -> (to_wire, from_wire, is_float32)
KINDS: dict[str, tuple[Callable[[Any], Any], Callable[[str, str, Any], Any], bool]] = {
    "int": (_ident, _r_int, False),
    "f64": (float, _r_num, False),
    "f32": (float, _r_num, True),
    "bool": (_ident, _r_bool, False),
    "str": (_ident, _r_str, False),
    "bin": (_ident, _r_bin, False),
    "hex": (_w_hex, _r_hex, False),
    "f32s": (_w_arr("f"), _r_arr("f"), False),
    "f64s": (_w_arr("d"), _r_arr("d"), False),
    "u64s": (_w_arr("Q"), _r_arr("Q"), False),
    "dist": (_w_dist, _r_dist, False),
    "map": (dict, _r_map, False),
    "results": (_w_results, _r_results, False),
}


@dataclass(frozen=True)
class Field:
    key: int
    name: str
    kind: str
    optional: bool = False  # omitted from the map when None
    n: int = 0  # most items a legal value holds: str/bin bytes, array items, map entries, results
    kv: tuple[int, int] = (0, 0)  # map kinds: most UTF-8 bytes of a key, of a str value (0: scalars only)


def _f(
    key: int, name: str, kind: str, optional: bool = False, n: int = 0, kv: tuple[int, int] = (0, 0)
) -> Field:
    return Field(key, name, kind, optional, n, kv)


ID_BYTES = 64  # a fleet/client id: at most 64 ASCII chars (shared.topics.ID_RE)
_CAPS_KV = (4 * 64, 4 * 256)  # Join.capabilities: key <= 64 chars, value a scalar or a str <= 256 chars
_STEPS_KV = (ID_BYTES, 0)  # RoundPlan.steps: client id -> int


# type code, schema (key order = encoding order), max payload bytes before the schema-derived bound (see
# LIMITS: the payload limit is the smaller of this and the largest legal body + header)
SCHEMAS: dict[type, tuple[int, tuple[Field, ...], int]] = {
    Join: (1, (_f(0, "fingerprint", "hex", n=32), _f(1, "mask_id", "hex", n=8), _f(2, "n_samples", "int"),
               _f(3, "budget_gib", "f64"), _f(4, "capabilities", "map", n=MAX_CAPS, kv=_CAPS_KV),
               _f(5, "last_round", "int")), 64 << 10),
    RoundPlan: (2, (_f(0, "fleet", "str", n=ID_BYTES), _f(1, "round", "int"), _f(2, "seeds", "u64s", n=MAX_SEEDS),
                    _f(3, "lr", "f64"), _f(4, "eps", "f64"), _f(5, "dist", "dist"),
                    _f(6, "steps", "map", n=MAX_PLAN_CLIENTS, kv=_STEPS_KV), _f(7, "base_round", "int"),
                    _f(8, "deadline", "f64"), _f(9, "fingerprint", "hex", n=32), _f(10, "mask_id", "hex", n=8),
                    _f(11, "batch_size", "int"), _f(12, "values_checksum", "hex", n=32),
                    _f(13, "dp_clip", "f64", True), _f(14, "dp_noise", "f64", True), _f(15, "dp_epsilon", "f64", True),
                    _f(16, "dp_delta", "f64", True), _f(17, "dp_steps", "int", True),
                    _f(18, "sample_max", "int", True)), MAX_PAYLOAD),
    Update: (3, (_f(0, "round", "int"), _f(1, "msg_id", "int"), _f(2, "grads", "f32s", n=MAX_STEPS),
                 _f(3, "n_samples", "int"), _f(4, "fp_tag", "int"), _f(5, "loss", "f32")), 64 << 10),
    RoundResult: (4, (_f(0, "round", "int"), _f(1, "seeds", "u64s", n=MAX_SEEDS),
                      _f(2, "scalars", "f64s", n=MAX_SEEDS), _f(3, "lr", "f64"), _f(4, "dist", "dist"),
                      _f(5, "n_clients", "int"), _f(6, "values_checksum", "hex", n=32)), 2 << 20),
    Heartbeat: (5, (_f(0, "ts", "f64"), _f(1, "cpu_pct", "f32"), _f(2, "rss_bytes", "int"),
                    _f(3, "gpu_mem_bytes", "int", True), _f(4, "temp_c", "f32", True), _f(5, "power_w", "f32", True),
                    _f(6, "step_time_s", "f64", True), _f(7, "peak_mem_bytes", "int", True),
                    _f(8, "round", "int"), _f(9, "eval_round", "int", True), _f(10, "eval_loss", "f32", True),
                    _f(11, "eval_acc", "f32", True), _f(12, "eval_n", "int", True),
                    _f(13, "dp_epsilon", "f64", True), _f(14, "dp_delta", "f64", True),
                    _f(15, "dp_exhausted", "bool", True),
                    _f(16, "available", "bool", True), _f(17, "pause_reason", "str", True, n=MAX_REASON),
                    _f(18, "trained_share", "f32", True), _f(19, "peak_rss_bytes", "int", True)), 4 << 10),
    Status: (6, (_f(0, "online", "bool"), _f(1, "ts", "f64")), 1 << 10),
    SyncRequest: (7, (_f(0, "have_round", "int"),), 1 << 10),
    Replay: (8, (_f(0, "results", "results", n=MAX_REPLAY),), MAX_REPLAY_BODY),
    CheckpointChunk: (9, (_f(0, "round", "int"), _f(1, "index", "int"), _f(2, "total", "int"),
                          _f(3, "sha256", "hex", n=32), _f(4, "data", "bin", n=MAX_CHUNK)), MAX_CHUNK + (4 << 10)),
    ErrorMsg: (10, (_f(0, "code", "int"), _f(1, "reason", "str", n=4 * MAX_STR)), 8 << 10),
    RunState: (11, (_f(0, "state", "str", n=16), _f(1, "last_round", "int"), _f(2, "ts", "f64"),
                    _f(3, "reason", "str", n=4 * MAX_STR)), 8 << 10),  # 1.3
}  # fmt: skip
BY_CODE: dict[int, type] = {code: cls for cls, (code, _, _) in SCHEMAS.items()}


def to_map(msg: Any) -> dict[int, Any]:
    """{key: wire value} of a message, optional fields left out when None (the encoder's view)."""
    _, fields, _ = SCHEMAS[type(msg)]
    out: dict[int, Any] = {}
    for f in fields:
        v = getattr(msg, f.name)
        if v is None and f.optional:
            continue
        out[f.key] = KINDS[f.kind][0](v)
    return out


_Reader = tuple[int, str, Callable[[str, str, Any], Any], bool]
# per message type: its known keys, its required keys, and (key, name, reader, optional) per field, built
# once (decode is hot)
_READ: dict[type, tuple[frozenset[int], frozenset[int], tuple[_Reader, ...]]] = {
    cls: (
        frozenset(f.key for f in fields),
        frozenset(f.key for f in fields if not f.optional),
        tuple((f.key, f.name, KINDS[f.kind][1], f.optional) for f in fields),
    )
    for cls, (_, fields, _) in SCHEMAS.items()
}


_BUILD: dict[type, Callable[..., Any]] = {Update: Update.from_wire}  # decoders that skip what the readers checked
# one-pass decoders of a whole map (shared/codec/fastpath.py); None from one: the general path decides
_FAST: dict[type, Callable[[dict[Any, Any], str], Any]] = {Heartbeat: fastpath.heartbeat, Update: fastpath.update}


def from_map(cls: type[M], m: Any, client: str) -> M:
    """The message of type `cls` from a decoded body map; `client` fills the id that travels in the topic."""
    name = cls.__name__
    if not isinstance(m, dict):
        raise DecodeError(ErrorCode.MALFORMED, f"{name}: body is not a msgpack map")
    known, required, readers = _READ[cls]
    # PROTOCOL.md §2 "Check order" 11-14: every key is an int (MALFORMED), every key is known
    # (UNKNOWN_FIELD), every required key is there (MISSING_FIELD), then the values (INVALID_FIELD).
    # Each step looks at the whole map, so the wire order of the keys never changes the code.
    if not known.issuperset(m) or any(k.__class__ is not int for k in m):  # bool == int in a set: checked apart
        if countOf(map(type, m), int) != len(m):  # one C-speed pass: a bomb of 100 000 keys costs ~4 ms
            bad = next(k for k in m if k.__class__ is not int)
            raise DecodeError(ErrorCode.MALFORMED, f"{name}: map key {bad!r} is not an int")
        raise DecodeError(ErrorCode.UNKNOWN_FIELD, f"{name}: unknown key {next(k for k in m if k not in known)}")
    if not required.issubset(m):
        key = min(required.difference(m))
        field = next(f for k, f, _, _ in readers if k == key)
        raise DecodeError(ErrorCode.MISSING_FIELD, f"{name}.{field} (key {key}) missing")
    fast = _FAST.get(cls)
    if fast is not None:
        msg = fast(m, client)
        if msg is not None:
            return cast(M, msg)
    kwargs: dict[str, Any] = {}
    for key, field, read, _ in readers:
        if key in m:
            kwargs[field] = read(name, field, m[key])
        else:
            kwargs[field] = None
    if cls in CLIENT_FROM_TOPIC:
        kwargs["client"] = client
    try:
        return cast(M, _BUILD.get(cls, cls)(**kwargs))
    except (ValueError, TypeError, OverflowError) as exc:
        raise DecodeError(ErrorCode.INVALID_FIELD, str(exc)) from exc
