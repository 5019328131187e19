"""The zstd frame reader: a compressed body -> at most its type's max_body bytes (PROTOCOL.md §2).

It never trusts what the frame declares: the declared size and window are checked before the
decompressor allocates anything, the output is read as a bounded stream, and the body must be exactly
one complete data frame (no skippable frame before it, nothing after it).
"""

from __future__ import annotations

import io

import zstandard

from shared.codec.base import DecodeError
from shared.codec.limits import Limits
from shared.messages import ErrorCode

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"  # a zstd DATA frame; skippable frames (0x184D2A5?) are refused


def decompress(body: bytes, name: str, lim: Limits) -> bytes:
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
