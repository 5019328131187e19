"""Bytes on the wire <-> typed messages. Layout normative in docs/PROTOCOL.md ("Payload").

    byte 0   0xB0 | schema version (1)          byte 1  flags (bit 0: body is one zstd frame)
    byte 2   message type code                  bytes 3..  body = one msgpack map {int key: value}

Every failure to decode raises DecodeError(code, reason) and nothing else. Sizes are checked before
anything is decompressed or parsed: the payload against the type's limit, the decompressed body
against MAX_BODY.
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
    MAX_CHUNK,
    CheckpointChunk,
    ErrorCode,
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
from shared.prng import DISTS, Dist
from shared.topics import ID_RE

VERSION = 1
MAGIC = 0xB0
FLAG_ZSTD = 0x01
HEADER_LEN = 3
COMPRESS_THRESHOLD = 512  # bodies above this many bytes are zstd-compressed when that makes them smaller
ZSTD_LEVEL = 3
MAX_PAYLOAD = 8 << 20  # default limit on a whole payload, compressed or not
MAX_BODY = 16 << 20  # limit on a decompressed body

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
    def r(obj: str, name: str, v: Any) -> Any:
        if isinstance(v, bool) and bool not in (expected if isinstance(expected, tuple) else (expected,)):
            raise _bad(obj, name, label, v)
        if not isinstance(v, expected):
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


def _f(key: int, name: str, kind: str, optional: bool = False) -> _Field:
    return _Field(key, name, kind, optional)


# type code, schema (key order = encoding order), max payload bytes
SCHEMAS: dict[type, tuple[int, tuple[_Field, ...], int]] = {
    Join: (1, (_f(0, "fingerprint", "hex"), _f(1, "mask_id", "hex"), _f(2, "n_samples", "int"),
               _f(3, "budget_gib", "f64"), _f(4, "capabilities", "map"), _f(5, "last_round", "int")), 64 << 10),
    RoundPlan: (2, (_f(0, "fleet", "str"), _f(1, "round", "int"), _f(2, "seeds", "u64s"), _f(3, "lr", "f64"),
                    _f(4, "eps", "f64"), _f(5, "dist", "dist"), _f(6, "steps", "map"), _f(7, "base_round", "int"),
                    _f(8, "deadline", "f64"), _f(9, "fingerprint", "hex"), _f(10, "mask_id", "hex"),
                    _f(11, "batch_size", "int"), _f(12, "values_checksum", "hex")), MAX_PAYLOAD),
    Update: (3, (_f(0, "round", "int"), _f(1, "msg_id", "int"), _f(2, "grads", "f32s"), _f(3, "n_samples", "int"),
                 _f(4, "fp_tag", "int"), _f(5, "loss", "f32")), 64 << 10),
    RoundResult: (4, (_f(0, "round", "int"), _f(1, "seeds", "u64s"), _f(2, "scalars", "f64s"), _f(3, "lr", "f64"),
                      _f(4, "dist", "dist"), _f(5, "n_clients", "int"), _f(6, "values_checksum", "hex")), 2 << 20),
    Heartbeat: (5, (_f(0, "ts", "f64"), _f(1, "cpu_pct", "f32"), _f(2, "rss_bytes", "int"),
                    _f(3, "gpu_mem_bytes", "int", True), _f(4, "temp_c", "f32", True), _f(5, "power_w", "f32", True),
                    _f(6, "step_time_s", "f64", True), _f(7, "peak_mem_bytes", "int", True),
                    _f(8, "round", "int")), 4 << 10),
    Status: (6, (_f(0, "online", "bool"), _f(1, "ts", "f64")), 1 << 10),
    SyncRequest: (7, (_f(0, "have_round", "int"),), 1 << 10),
    Replay: (8, (_f(0, "results", "results"),), MAX_PAYLOAD),
    CheckpointChunk: (9, (_f(0, "round", "int"), _f(1, "index", "int"), _f(2, "total", "int"),
                          _f(3, "sha256", "hex"), _f(4, "data", "bin")), MAX_CHUNK + (4 << 10)),
    ErrorMsg: (10, (_f(0, "code", "int"), _f(1, "reason", "str")), 8 << 10),
}  # fmt: skip
BY_CODE: dict[int, type] = {code: cls for cls, (code, _, _) in SCHEMAS.items()}

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
    code, _, limit = SCHEMAS[type(msg)]
    body = _pack_body(msg)
    flags = 0
    if len(body) > COMPRESS_THRESHOLD:
        packed = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_content_size=True).compress(body)
        if len(packed) < len(body):
            body, flags = packed, FLAG_ZSTD
    data = bytes((MAGIC | VERSION, flags, code)) + body
    if len(data) > limit:
        raise ValueError(f"encode: {type(msg).__name__} is {len(data)} bytes, over its limit of {limit}")
    return data


def _from_map(cls: type[M], m: Any, client: str) -> M:
    name = cls.__name__
    if not isinstance(m, dict):
        raise DecodeError(ErrorCode.MALFORMED, f"{name}: body is not a msgpack map")
    _, fields, _ = SCHEMAS[cls]
    known = {f.key for f in fields}
    for k in m:
        if isinstance(k, bool) or not isinstance(k, int):
            raise DecodeError(ErrorCode.MALFORMED, f"{name}: map key {k!r} is not an int")
        if k not in known:
            raise DecodeError(ErrorCode.UNKNOWN_FIELD, f"{name}: unknown key {k}")
    kwargs: dict[str, Any] = {}
    for f in fields:
        if f.key not in m:
            if f.optional:
                kwargs[f.name] = None
                continue
            raise DecodeError(ErrorCode.MISSING_FIELD, f"{name}.{f.name} (key {f.key}) missing")
        kwargs[f.name] = _KINDS[f.kind][1](name, f.name, m[f.key])
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
    limit = SCHEMAS[cls][2] if max_bytes is None else min(max_bytes, SCHEMAS[cls][2])
    if len(data) > limit:
        raise DecodeError(
            ErrorCode.TOO_LARGE, f"{cls.__name__} payload of {len(data)} bytes over the limit of {limit}"
        )
    if cls in CLIENT_FROM_TOPIC and client and not (isinstance(client, str) and ID_RE.match(client)):
        raise DecodeError(ErrorCode.BAD_CLIENT, f"client id from the topic is invalid: {client!r}")
    body = bytes(data[HEADER_LEN:])
    if flags & FLAG_ZSTD:
        body = _decompress(body)
    try:
        m = msgpack.unpackb(
            body,
            raw=False,
            strict_map_key=False,
            use_list=True,
            ext_hook=_no_ext,
            timestamp=0,
        )
    except DecodeError:
        raise
    except Exception as exc:  # msgpack raises many types (ExtraData, FormatError, StackError, ValueError...)
        raise DecodeError(ErrorCode.MALFORMED, f"{cls.__name__}: body is not valid msgpack: {exc}") from exc
    return _from_map(cls, m, client if cls in CLIENT_FROM_TOPIC else "")


def _no_ext(code: int, data: bytes) -> Any:
    raise DecodeError(ErrorCode.MALFORMED, f"msgpack ext type {code} not allowed")


def _decompress(body: bytes) -> bytes:
    try:
        params = zstandard.get_frame_parameters(body)
    except zstandard.ZstdError as exc:
        raise DecodeError(ErrorCode.DECOMPRESS_FAILED, f"not a zstd frame: {exc}") from exc
    if params.content_size not in (zstandard.CONTENTSIZE_UNKNOWN,) and params.content_size > MAX_BODY:
        raise DecodeError(
            ErrorCode.TOO_LARGE, f"zstd frame declares {params.content_size} bytes, over {MAX_BODY}"
        )
    out = bytearray()
    try:
        with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(body), read_across_frames=False) as reader:
            while len(out) <= MAX_BODY:
                chunk = reader.read(1 << 20)
                if not chunk:
                    break
                out += chunk
    except zstandard.ZstdError as exc:
        raise DecodeError(ErrorCode.DECOMPRESS_FAILED, f"zstd body is corrupt: {exc}") from exc
    if len(out) > MAX_BODY:
        raise DecodeError(ErrorCode.TOO_LARGE, f"decompressed body over {MAX_BODY} bytes")
    return bytes(out)


__all__ = [
    "COMPRESS_THRESHOLD",
    "DecodeError",
    "ErrorCode",
    "MAX_BODY",
    "MAX_PAYLOAD",
    "SCHEMAS",
    "VERSION",
    "decode",
    "encode",
    "peek_type",
]
