"""Bytes on the wire <-> typed messages. Layout normative in docs/PROTOCOL.md ("Payload").

    byte 0   0xB0 | schema version (1)          byte 1  flags (bit 0: body is one zstd frame)
    byte 2   message type code                  bytes 3..  body = one msgpack map {int key: value}

Every failure to decode raises DecodeError(code, reason) and nothing else. Decoding costs O(the type's
allowed size), never O(what a payload claims). One concept a module:

    base.py        header constants, size ceilings, DecodeError
    schema.py      per type: code + fields; each field kind's (to_wire, from_wire) pair
    limits.py      Limits derived from each schema (LIMITS) + the msgpack hooks that enforce them
    zstd_frame.py  the bounded zstd frame reader
    wire.py        encode / decode / peek_type: header + body, checked in that order

Callers import from here (`from shared.codec import encode, decode, DecodeError, ...`).
"""

from shared.codec.base import (
    FLAG_ZSTD,
    HEADER_LEN,
    MAGIC,
    MAX_BODY,
    MAX_PAYLOAD,
    MAX_REPLAY_BODY,
    VERSION,
    DecodeError,
)
from shared.codec.limits import LIMITS, MIN_BODY, MIN_MAP, MIN_STR, MIN_WINDOW, BodyShape, Limits
from shared.codec.schema import BY_CODE, ID_BYTES, SCHEMAS, Field
from shared.codec.wire import COMPRESS_THRESHOLD, MAX_EXT, ZSTD_LEVEL, decode, encode, peek_type
from shared.codec.zstd_frame import ZSTD_MAGIC
from shared.messages import ErrorCode

__all__ = [
    "BY_CODE",
    "COMPRESS_THRESHOLD",
    "FLAG_ZSTD",
    "HEADER_LEN",
    "ID_BYTES",
    "LIMITS",
    "MAGIC",
    "MAX_BODY",
    "MAX_EXT",
    "MAX_PAYLOAD",
    "MAX_REPLAY_BODY",
    "MIN_BODY",
    "MIN_MAP",
    "MIN_STR",
    "MIN_WINDOW",
    "VERSION",
    "ZSTD_LEVEL",
    "ZSTD_MAGIC",
    "BodyShape",
    "DecodeError",
    "ErrorCode",
    "Field",
    "Limits",
    "SCHEMAS",
    "decode",
    "encode",
    "peek_type",
]
