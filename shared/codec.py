"""Bytes on the wire <-> typed messages. Layout normative in docs/PROTOCOL.md ("Payload").

    byte 0   0xB0 | schema version (1)          byte 1  flags (bit 0: body is one zstd frame)
    byte 2   message type code                  bytes 3..  body = one msgpack map {int key: value}

Every failure to decode raises DecodeError(code, reason) and nothing else. Decoding costs O(the type's
allowed size), never O(what a payload claims): every type has a `Limits` derived from its schema (the
largest body a legal message can have, and how many containers, how long and how deep), checked before
anything is decompressed (payload), while decompressing (bounded stream, bounded zstd window) and while
parsing (msgpack's own length limits, plus container count and nesting depth counted in the hooks).
"""

from __future__ import annotations

import io
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar, overload

import msgpack
import zstandard

from shared.messages import (
    CLIENT_FROM_TOPIC,
    MAX_CAPS,
    MAX_CHUNK,
    MAX_PLAN_CLIENTS,
    MAX_REPLAY,
    MAX_SEEDS,
    MAX_STEPS,
    MAX_STR,
    CheckpointChunk,
    ErrorCode,
    ErrorMsg,
    Heartbeat,
    Join,
    Message,
    Replay,
    RoundPlan,
    RoundResult,
    RunState,
    Status,
    SyncRequest,
    Update,
)
from shared.prng import DISTS, Dist
from shared.topics import ID_RE

VERSION = 1
MAGIC = 0xB0
FLAG_ZSTD = 0x01
HEADER_LEN = 3
COMPRESS_THRESHOLD = 512  # bodies above this many bytes are zstd-compressed when that makes them smaller
ZSTD_LEVEL = 3
MAX_PAYLOAD = 8 << 20  # default limit on a whole payload, compressed or not
MAX_BODY = 16 << 20  # no decompressed body is ever larger (each type's own limit is in LIMITS)
MAX_REPLAY_BODY = 4 << 20  # a Replay this big decodes in ~0.2 s; the coordinator sends chunks instead

M = TypeVar("M")


class DecodeError(Exception):
    """A payload could not be turned into a valid message. `code` says why in one word, `reason` in words."""

    def __init__(self, code: ErrorCode, reason: str) -> None:
        self.code = code
        self.reason = reason
        super().__init__(f"{code.name}: {reason}")


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
    return [_to_map(r) for r in v]


def _r_results(obj: str, name: str, v: Any) -> tuple[RoundResult, ...]:
    if not isinstance(v, list):
        raise _bad(obj, name, "array", v)
    return tuple(_from_map(RoundResult, m, "") for m in v)


_r_int = _r_typed(int, "int")
_r_num = _r_typed((int, float), "number")  # f32/f64 fields; ints are accepted and widened
_r_bool = _r_typed(bool, "bool")
_r_str = _r_typed(str, "str")
_r_bin = _r_typed(bytes, "bin")

# kind -> (to_wire, from_wire, is_float32)
_KINDS: dict[str, tuple[Callable[[Any], Any], Callable[[str, str, Any], Any], bool]] = {
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
class _Field:
    key: int
    name: str
    kind: str
    optional: bool = False  # omitted from the map when None
    n: int = 0  # most items a legal value holds: str/bin bytes, array items, map entries, results
    kv: tuple[int, int] = (0, 0)  # map kinds: most UTF-8 bytes of a key, of a str value (0: scalars only)


def _f(
    key: int, name: str, kind: str, optional: bool = False, n: int = 0, kv: tuple[int, int] = (0, 0)
) -> _Field:
    return _Field(key, name, kind, optional, n, kv)


ID_BYTES = 64  # a fleet/client id: at most 64 ASCII chars (shared.topics.ID_RE)
_HDR = 5  # most bytes of a msgpack str/bin/array/map header (the 32-bit forms)
_SCALAR = 9  # most bytes of a msgpack int or float (receivers accept any width)
_CAPS_KV = (4 * 64, 4 * 256)  # Join.capabilities: key <= 64 chars, value a scalar or a str <= 256 chars
_STEPS_KV = (ID_BYTES, 0)  # RoundPlan.steps: client id -> int


# type code, schema (key order = encoding order), max payload bytes before the schema-derived bound (see
# LIMITS: the payload limit is the smaller of this and the largest legal body + header)
SCHEMAS: dict[type, tuple[int, tuple[_Field, ...], int]] = {
    Join: (1, (_f(0, "fingerprint", "hex", n=32), _f(1, "mask_id", "hex", n=8), _f(2, "n_samples", "int"),
               _f(3, "budget_gib", "f64"), _f(4, "capabilities", "map", n=MAX_CAPS, kv=_CAPS_KV),
               _f(5, "last_round", "int")), 64 << 10),
    RoundPlan: (2, (_f(0, "fleet", "str", n=ID_BYTES), _f(1, "round", "int"), _f(2, "seeds", "u64s", n=MAX_SEEDS),
                    _f(3, "lr", "f64"), _f(4, "eps", "f64"), _f(5, "dist", "dist"),
                    _f(6, "steps", "map", n=MAX_PLAN_CLIENTS, kv=_STEPS_KV), _f(7, "base_round", "int"),
                    _f(8, "deadline", "f64"), _f(9, "fingerprint", "hex", n=32), _f(10, "mask_id", "hex", n=8),
                    _f(11, "batch_size", "int"), _f(12, "values_checksum", "hex", n=32)), MAX_PAYLOAD),
    Update: (3, (_f(0, "round", "int"), _f(1, "msg_id", "int"), _f(2, "grads", "f32s", n=MAX_STEPS),
                 _f(3, "n_samples", "int"), _f(4, "fp_tag", "int"), _f(5, "loss", "f32")), 64 << 10),
    RoundResult: (4, (_f(0, "round", "int"), _f(1, "seeds", "u64s", n=MAX_SEEDS),
                      _f(2, "scalars", "f64s", n=MAX_SEEDS), _f(3, "lr", "f64"), _f(4, "dist", "dist"),
                      _f(5, "n_clients", "int"), _f(6, "values_checksum", "hex", n=32)), 2 << 20),
    Heartbeat: (5, (_f(0, "ts", "f64"), _f(1, "cpu_pct", "f32"), _f(2, "rss_bytes", "int"),
                    _f(3, "gpu_mem_bytes", "int", True), _f(4, "temp_c", "f32", True), _f(5, "power_w", "f32", True),
                    _f(6, "step_time_s", "f64", True), _f(7, "peak_mem_bytes", "int", True),
                    _f(8, "round", "int"), _f(9, "eval_round", "int", True), _f(10, "eval_loss", "f32", True),
                    _f(11, "eval_acc", "f32", True), _f(12, "eval_n", "int", True)), 4 << 10),
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


@dataclass(frozen=True)
class Limits:
    """What decoding one message type may cost. Every number follows from the type's schema (LIMITS)."""

    max_payload: int  # whole payload, header included, compressed or not
    max_body: int  # msgpack body after decompression: the largest legal body, at most MAX_BODY
    max_str: int  # bytes of any one msgpack str
    max_bin: int  # bytes of any one msgpack bin
    max_array: int  # items of any one msgpack array
    max_map: int  # entries of any one msgpack map
    max_containers: int  # maps + arrays in the whole body, the top-level map included
    max_depth: int  # nesting of containers: 1 = a top-level map of scalars only
    max_window: int  # zstd window (bytes) a frame may ask the decompressor to allocate


MIN_BODY = 1 << 10  # body floor: tiny types keep 1 KiB of slack (1024 objects at most cost nothing)
MIN_STR = 64  # str/bin floor: a short value of the wrong kind still gets INVALID_FIELD naming the field
MIN_MAP = 16  # map floor: a key this version does not know is reported as UNKNOWN_FIELD, not MALFORMED
MAX_EXT = 12  # a msgpack timestamp gets as far as validation (INVALID_FIELD); any other ext is MALFORMED
MIN_WINDOW = 8 << 20  # zstd window floor: what levels <= 19 use when streaming without a declared size


@dataclass(frozen=True)
class _FieldShape:
    wire: int  # most bytes of the value on the wire
    strs: int = 0
    bins: int = 0
    arrays: int = 0
    maps: int = 0
    containers: int = 0
    depth: int = 0


def _field_shape(f: _Field) -> _FieldShape:
    """Upper bounds for one legal value of field `f` (any legal encoding, not just the reference one)."""
    if f.kind in ("int", "f64", "f32", "dist"):
        return _FieldShape(_SCALAR)
    if f.kind == "bool":
        return _FieldShape(1)
    if f.kind == "str":
        return _FieldShape(_HDR + f.n, strs=f.n)
    if f.kind in ("bin", "hex"):
        return _FieldShape(_HDR + f.n, bins=f.n)
    if f.kind in ("f32s", "f64s", "u64s"):
        size = 4 if f.kind == "f32s" else 8
        return _FieldShape(_HDR + size * f.n, bins=size * f.n)
    if f.kind == "map":  # str keys -> scalars (or str values where kv[1] says so)
        k, v = f.kv
        entry = _HDR + k + max(_SCALAR, _HDR + v if v else 0)
        return _FieldShape(_HDR + f.n * entry, strs=max(k, v), maps=f.n, containers=1, depth=1)
    if f.kind == "results":
        inner = _derive(SCHEMAS[RoundResult][1], 1 << 62)
        return _FieldShape(
            _HDR + f.n * inner.max_body,
            strs=inner.max_str,
            bins=inner.max_bin,
            arrays=f.n,
            maps=inner.max_map,
            containers=1 + f.n * inner.max_containers,
            depth=1 + inner.max_depth,
        )
    raise AssertionError(f"no shape for field kind {f.kind!r}")


def _derive(fields: tuple[_Field, ...], ceiling: int, body_ceiling: int = MAX_BODY) -> Limits:
    """Limits of a type from its fields. `ceiling` caps the payload; `body_ceiling` the body where the
    schema allows more than is sane to decode at once (Replay: 1024 results of 65 536 pairs each)."""
    shapes = [_field_shape(f) for f in fields]
    body = max(MIN_BODY, _HDR + sum(_SCALAR + s.wire for s in shapes))  # keys counted at any int width
    body = min(body, body_ceiling)
    window = MIN_WINDOW
    while window < body:
        window <<= 1
    return Limits(
        max_payload=min(ceiling, HEADER_LEN + body),  # senders compress only when that is smaller
        max_body=body,
        max_str=max([MIN_STR] + [s.strs for s in shapes]),
        max_bin=max([MIN_STR] + [s.bins for s in shapes]),
        max_array=max([0] + [s.arrays for s in shapes]),
        max_map=max([MIN_MAP, len(fields)] + [s.maps for s in shapes]),
        max_containers=1 + sum(s.containers for s in shapes),
        max_depth=1 + max(s.depth for s in shapes),
        max_window=window,
    )


_BODY_CEILING: dict[type, int] = {Replay: MAX_REPLAY_BODY}
LIMITS: dict[type, Limits] = {
    cls: _derive(fields, ceiling, _BODY_CEILING.get(cls, MAX_BODY))
    for cls, (_, fields, ceiling) in SCHEMAS.items()
}


class _Shape:
    """msgpack object_pairs_hook/list_hook: counts containers and their nesting depth while the body is built.

    msgpack-python limits each container's length but not how many there are or how deep they nest (its
    C stack stops at 1024 levels); the hooks run once per finished container, children before parents,
    so a parent's depth is 1 + its deepest child's. Raising here stops the parse at once.
    """

    def __init__(self, name: str, lim: Limits) -> None:
        self.name = name
        self.lim = lim
        self.depth: dict[int, int] = {}  # id(container) -> depth; every container stays alive in its parent

    def on_pairs(self, pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
        """A map from its (key, value) pairs: a repeated key is MALFORMED at any depth (msgpack itself
        would keep the last one, so two receivers could disagree on what a message says)."""
        obj = dict(pairs)
        if len(obj) != len(pairs):
            raise DecodeError(ErrorCode.MALFORMED, f"{self.name}: a map repeats a key")
        self._check(obj, obj.values())
        return obj

    def on_array(self, obj: list[Any]) -> list[Any]:
        self._check(obj, obj)
        return obj

    def _check(self, obj: object, children: Any) -> None:
        if len(self.depth) >= self.lim.max_containers:
            raise DecodeError(
                ErrorCode.MALFORMED,
                f"{self.name}: more than {self.lim.max_containers} maps/arrays in the body",
            )
        d = 1
        if self.depth:  # the first container to finish holds none; skip scanning its (maybe many) values
            for v in children:
                if type(v) is dict or type(v) is list:
                    d = max(d, self.depth.get(id(v), 1) + 1)
        if d > self.lim.max_depth:
            raise DecodeError(
                ErrorCode.MALFORMED, f"{self.name}: containers nest deeper than {self.lim.max_depth}"
            )
        self.depth[id(obj)] = d


_PACK = msgpack.Packer(use_bin_type=True, use_single_float=False, autoreset=True)
_PACK32 = msgpack.Packer(use_bin_type=True, use_single_float=True, autoreset=True)


def _to_map(msg: Any) -> dict[int, Any]:
    _, fields, _ = SCHEMAS[type(msg)]
    out: dict[int, Any] = {}
    for f in fields:
        v = getattr(msg, f.name)
        if v is None and f.optional:
            continue
        out[f.key] = _KINDS[f.kind][0](v)
    return out


def _pack_body(msg: Any) -> bytes:
    """msgpack map, keys in schema order, f32 fields as msgpack float 32 (nested maps in plain msgpack)."""
    _, fields, _ = SCHEMAS[type(msg)]
    wire = _to_map(msg)
    parts = [_PACK.pack_map_header(len(wire))]
    for f in fields:
        if f.key in wire:
            parts.append(_PACK.pack(f.key))
            parts.append((_PACK32 if _KINDS[f.kind][2] else _PACK).pack(wire[f.key]))
    return b"".join(parts)


def encode(msg: Message) -> bytes:
    """Header + msgpack body (zstd-compressed when the body is over COMPRESS_THRESHOLD and that helps)."""
    if type(msg) not in SCHEMAS:
        raise TypeError(f"encode: not a message type: {type(msg).__name__}")
    code = SCHEMAS[type(msg)][0]
    lim = LIMITS[type(msg)]
    body = _pack_body(msg)
    if len(body) > lim.max_body:
        raise ValueError(
            f"encode: {type(msg).__name__} body is {len(body)} bytes, over its limit of {lim.max_body}"
        )
    flags = 0
    if len(body) > COMPRESS_THRESHOLD:
        packed = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_content_size=True).compress(body)
        if len(packed) < len(body):
            body, flags = packed, FLAG_ZSTD
    data = bytes((MAGIC | VERSION, flags, code)) + body
    if len(data) > lim.max_payload:
        raise ValueError(
            f"encode: {type(msg).__name__} is {len(data)} bytes, over its limit of {lim.max_payload}"
        )
    return data


# per message type: its known keys and (key, name, reader, optional) per field, built once (decode is hot)
_READ: dict[type, tuple[frozenset[int], tuple[tuple[int, str, Callable[[str, str, Any], Any], bool], ...]]] = {
    cls: (frozenset(f.key for f in fields), tuple((f.key, f.name, _KINDS[f.kind][1], f.optional) for f in fields))
    for cls, (_, fields, _) in SCHEMAS.items()
}


def _from_map(cls: type[M], m: Any, client: str) -> M:
    name = cls.__name__
    if not isinstance(m, dict):
        raise DecodeError(ErrorCode.MALFORMED, f"{name}: body is not a msgpack map")
    known, readers = _READ[cls]
    if not known.issuperset(m) or any(k.__class__ is not int for k in m):  # bool == int in a set: checked apart
        for k in m:
            if isinstance(k, bool) or not isinstance(k, int):
                raise DecodeError(ErrorCode.MALFORMED, f"{name}: map key {k!r} is not an int")
            if k not in known:
                raise DecodeError(ErrorCode.UNKNOWN_FIELD, f"{name}: unknown key {k}")
    kwargs: dict[str, Any] = {}
    for key, field, read, optional in readers:
        if key in m:
            kwargs[field] = read(name, field, m[key])
        elif optional:
            kwargs[field] = None
        else:
            raise DecodeError(ErrorCode.MISSING_FIELD, f"{name}.{field} (key {key}) missing")
    if cls in CLIENT_FROM_TOPIC:
        kwargs["client"] = client
    try:
        return cls(**kwargs)
    except (ValueError, TypeError, OverflowError) as exc:
        raise DecodeError(ErrorCode.INVALID_FIELD, str(exc)) from exc


def peek_type(data: bytes) -> type:
    """Message class named by a payload's header, without decoding the body (DecodeError if bad)."""
    return _header(data)[0]


def _header(data: bytes) -> tuple[type, int]:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise DecodeError(ErrorCode.MALFORMED, f"payload must be bytes, got {type(data).__name__}")
    if len(data) < HEADER_LEN:
        raise DecodeError(ErrorCode.TRUNCATED, f"payload of {len(data)} bytes is shorter than the header")
    b0, flags, code = data[0], data[1], data[2]
    if b0 & 0xF0 != MAGIC:
        raise DecodeError(ErrorCode.BAD_MAGIC, f"byte 0 is 0x{b0:02x}, not 0xB_ (not a meerkat payload)")
    if b0 & 0x0F != VERSION:
        raise DecodeError(
            ErrorCode.UNSUPPORTED_VERSION, f"schema version {b0 & 0x0F}, this build speaks {VERSION}"
        )
    if flags & ~FLAG_ZSTD:
        raise DecodeError(ErrorCode.BAD_FLAGS, f"reserved flag bits set: 0x{flags:02x}")
    if code not in BY_CODE:
        raise DecodeError(ErrorCode.UNKNOWN_TYPE, f"unknown message type code {code}")
    return BY_CODE[code], flags


@overload
def decode(data: bytes, expected: type[M], *, client: str = "", max_bytes: int | None = None) -> M: ...


@overload
def decode(
    data: bytes, expected: tuple[type, ...] | None = None, *, client: str = "", max_bytes: int | None = None
) -> Message: ...


def decode(
    data: bytes,
    expected: type[Any] | tuple[type, ...] | None = None,
    *,
    client: str = "",
    max_bytes: int | None = None,
) -> Any:
    """Decode one payload. `client` = the id from the topic (for Join/Update/Heartbeat/Status/SyncRequest).

    `expected`: a message class (or tuple of classes) allowed on this topic; anything else is
    UNEXPECTED_TYPE, found from the header before the body is touched. `max_bytes` tightens the
    per-type payload limit.
    """
    cls, flags = _header(data)
    if expected is not None:
        allowed = expected if isinstance(expected, tuple) else (expected,)
        if cls not in allowed:
            names = "/".join(c.__name__ for c in allowed)
            raise DecodeError(ErrorCode.UNEXPECTED_TYPE, f"got {cls.__name__}, expected {names}")
    lim = LIMITS[cls]
    limit = lim.max_payload if max_bytes is None else min(max_bytes, lim.max_payload)
    if len(data) > limit:
        raise DecodeError(
            ErrorCode.TOO_LARGE, f"{cls.__name__} payload of {len(data)} bytes over the limit of {limit}"
        )
    if cls in CLIENT_FROM_TOPIC and client and not (isinstance(client, str) and ID_RE.match(client)):
        raise DecodeError(ErrorCode.BAD_CLIENT, f"client id from the topic is invalid: {client!r}")
    body = bytes(data[HEADER_LEN:])
    if flags & FLAG_ZSTD:
        body = _decompress(body, cls.__name__, lim)
    elif len(body) > lim.max_body:
        raise DecodeError(
            ErrorCode.TOO_LARGE, f"{cls.__name__} body of {len(body)} bytes over {lim.max_body}"
        )
    shape = _Shape(cls.__name__, lim)
    try:
        m = msgpack.unpackb(
            body,
            raw=False,
            strict_map_key=False,
            use_list=True,
            ext_hook=_no_ext,
            timestamp=0,
            object_pairs_hook=shape.on_pairs,
            list_hook=shape.on_array,
            max_str_len=lim.max_str,
            max_bin_len=lim.max_bin,
            max_array_len=lim.max_array,
            max_map_len=lim.max_map,
            max_ext_len=MAX_EXT,
        )
    except DecodeError:
        raise
    except Exception as exc:  # msgpack raises many types (ExtraData, FormatError, StackError, ValueError...)
        raise DecodeError(ErrorCode.MALFORMED, f"{cls.__name__}: body is not valid msgpack: {exc}") from exc
    return _from_map(cls, m, client if cls in CLIENT_FROM_TOPIC else "")


def _no_ext(code: int, data: bytes) -> Any:
    raise DecodeError(ErrorCode.MALFORMED, f"msgpack ext type {code} not allowed")


def _decompress(body: bytes, name: str, lim: Limits) -> bytes:
    """One zstd frame -> at most lim.max_body bytes, never trusting the declared size or window."""
    try:
        params = zstandard.get_frame_parameters(body)
    except zstandard.ZstdError as exc:
        raise DecodeError(ErrorCode.DECOMPRESS_FAILED, f"not a zstd frame: {exc}") from exc
    if params.content_size != zstandard.CONTENTSIZE_UNKNOWN and params.content_size > lim.max_body:
        raise DecodeError(
            ErrorCode.TOO_LARGE,
            f"{name}: zstd frame declares {params.content_size} bytes, over {lim.max_body}",
        )
    if params.window_size > lim.max_window:  # the decompressor would allocate the window up front
        raise DecodeError(
            ErrorCode.TOO_LARGE,
            f"{name}: zstd frame asks for a {params.window_size}-byte window, over {lim.max_window}",
        )
    out = bytearray()
    try:
        dctx = zstandard.ZstdDecompressor(max_window_size=lim.max_window)
        with dctx.stream_reader(io.BytesIO(body), read_across_frames=False) as reader:
            while len(out) <= lim.max_body:
                chunk = reader.read(min(1 << 20, lim.max_body + 1 - len(out)))
                if not chunk:
                    break
                out += chunk
    except zstandard.ZstdError as exc:
        raise DecodeError(
            ErrorCode.DECOMPRESS_FAILED, f"{name}: zstd body is corrupt or refused: {exc}"
        ) from exc
    if len(out) > lim.max_body:
        raise DecodeError(ErrorCode.TOO_LARGE, f"{name}: decompressed body over {lim.max_body} bytes")
    _one_frame(body, name, lim)
    return bytes(out)


ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"  # a zstd DATA frame; skippable frames (0x184D2A5?) are refused


def _one_frame(body: bytes, name: str, lim: Limits) -> None:
    """The body is exactly one complete zstd data frame (PROTOCOL.md §2): no skippable frame before it,
    nothing after it. Called after the bounded stream proved the frame's output fits the limit, so this
    second pass (which reports what follows the frame) costs at most max_body bytes of output."""
    if not body.startswith(ZSTD_MAGIC):
        raise DecodeError(ErrorCode.DECOMPRESS_FAILED, f"{name}: body is not one zstd data frame")
    try:
        obj = zstandard.ZstdDecompressor(max_window_size=lim.max_window).decompressobj()
        obj.decompress(body)
    except zstandard.ZstdError as exc:
        raise DecodeError(ErrorCode.DECOMPRESS_FAILED, f"{name}: zstd body is corrupt: {exc}") from exc
    if not obj.eof:
        raise DecodeError(ErrorCode.DECOMPRESS_FAILED, f"{name}: zstd frame is incomplete")
    if obj.unused_data:
        raise DecodeError(
            ErrorCode.DECOMPRESS_FAILED, f"{name}: {len(obj.unused_data)} bytes after the zstd frame"
        )


__all__ = [
    "COMPRESS_THRESHOLD",
    "DecodeError",
    "ErrorCode",
    "LIMITS",
    "Limits",
    "MAX_BODY",
    "MAX_PAYLOAD",
    "SCHEMAS",
    "VERSION",
    "decode",
    "encode",
    "peek_type",
]
