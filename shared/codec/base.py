"""What every part of the codec shares: the header's layout, the size ceilings and DecodeError."""

from __future__ import annotations

from shared.messages import ErrorCode

VERSION = 1
MAGIC = 0xB0
FLAG_ZSTD = 0x01
HEADER_LEN = 3
MAX_PAYLOAD = 8 << 20  # default limit on a whole payload, compressed or not
MAX_BODY = 16 << 20  # no decompressed body is ever larger (each type's own limit is in LIMITS)
MAX_REPLAY_BODY = 4 << 20  # a Replay this big decodes in ~0.2 s; the coordinator sends chunks instead


class DecodeError(Exception):
    """A payload could not be turned into a valid message. `code` says why in one word, `reason` in words."""

    def __init__(self, code: ErrorCode, reason: str) -> None:
        self.code = code
        self.reason = reason
        super().__init__(f"{code.name}: {reason}")
