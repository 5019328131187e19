"""Header + body <-> message: `encode`, `decode`, `peek_type`. Layout normative in docs/PROTOCOL.md ("Payload").

    byte 0   0xB0 | schema version (1)          byte 1  flags (bit 0: body is one zstd frame)
    byte 2   message type code                  bytes 3..  body = one msgpack map {int key: value}

Every failure to decode raises DecodeError(code, reason) and nothing else. The type's Limits
(shared.codec.limits) are checked before anything is decompressed, while decompressing
(shared.codec.zstd_frame) and while parsing.
"""

from __future__ import annotations

from typing import Any, TypeVar, overload

import msgpack
import zstandard

from shared.codec.base import FLAG_ZSTD, HEADER_LEN, MAGIC, VERSION, DecodeError
from shared.codec.limits import LIMITS, BodyShape
from shared.codec.schema import BY_CODE, KINDS, SCHEMAS, from_map, to_map
from shared.codec.zstd_frame import decompress
from shared.messages import CLIENT_FROM_TOPIC, ErrorCode, Message, RoundPlan
from shared.topics import ID_RE

COMPRESS_THRESHOLD = 512  # bodies above this many bytes are zstd-compressed when that makes them smaller
ZSTD_LEVEL = 3
MAX_EXT = 12  # a msgpack timestamp (ext -1, 4/8/12 bytes) is a value of the wrong kind; any other ext is MALFORMED

M = TypeVar("M")

_PACK = msgpack.Packer(use_bin_type=True, use_single_float=False, autoreset=True)
_PACK32 = msgpack.Packer(use_bin_type=True, use_single_float=True, autoreset=True)


def _pack_body(msg: Any) -> bytes:
    """msgpack map, keys in schema order, f32 fields as msgpack float 32 (nested maps in plain msgpack)."""
    _, fields, _ = SCHEMAS[type(msg)]
    wire = to_map(msg)
    parts = [_PACK.pack_map_header(len(wire))]
    for f in fields:
        if f.key in wire:
            parts.append(_PACK.pack(f.key))
            parts.append((_PACK32 if KINDS[f.kind][2] else _PACK).pack(wire[f.key]))
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
def decode(
    data: bytes, expected: type[M], *, client: str = "", fleet: str = "", max_bytes: int | None = None
) -> M: ...


@overload
def decode(
    data: bytes,
    expected: tuple[type, ...] | None = None,
    *,
    client: str = "",
    fleet: str = "",
    max_bytes: int | None = None,
) -> Message: ...


def decode(
    data: bytes,
    expected: type[Any] | tuple[type, ...] | None = None,
    *,
    client: str = "",
    fleet: str = "",
    max_bytes: int | None = None,
) -> Any:
    """Decode one payload, checks in the order of docs/PROTOCOL.md §2 "Check order".

    `client` = the id from the topic (for Join/Update/Heartbeat/Status/SyncRequest): an invalid one is
    BAD_CLIENT before a byte of the payload is read (the topic is checked first). `fleet` = the `{fleet}`
    of the topic: a RoundPlan naming another fleet is INVALID_FIELD. `expected`: a message class (or
    tuple of classes) allowed on this topic; anything else is UNEXPECTED_TYPE, found from the header
    before the body is touched. `max_bytes` tightens the per-type payload limit.
    """
    if client and not (isinstance(client, str) and ID_RE.match(client)):
        raise DecodeError(ErrorCode.BAD_CLIENT, f"client id from the topic is invalid: {client!r}")
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
    body = bytes(data[HEADER_LEN:])
    if flags & FLAG_ZSTD:
        body = decompress(body, cls.__name__, lim)
    elif len(body) > lim.max_body:
        raise DecodeError(
            ErrorCode.TOO_LARGE, f"{cls.__name__} body of {len(body)} bytes over {lim.max_body}"
        )
    shape = BodyShape(cls.__name__, lim)
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
    msg: Any = from_map(cls, m, client if cls in CLIENT_FROM_TOPIC else "")
    if fleet and cls is RoundPlan and msg.fleet != fleet:
        raise DecodeError(ErrorCode.INVALID_FIELD, f"RoundPlan.fleet {msg.fleet!r} is not the topic's fleet {fleet!r}")
    return msg


def _no_ext(code: int, data: bytes) -> Any:
    raise DecodeError(ErrorCode.MALFORMED, f"msgpack ext type {code} not allowed")
    # the timestamp type (-1) never reaches this hook: msgpack builds a Timestamp, a value of the wrong kind
