"""PROTOCOL.md 1.1 §2 strictness: exactly one zstd data frame, no repeated map key at any depth, plan seeds."""

from __future__ import annotations

import struct

import msgpack
import pytest
import zstandard

from shared.codec import DecodeError, decode, encode
from shared.messages import MAX_STEPS, ErrorCode, Join, RoundPlan, SyncRequest

BODY = msgpack.packb({0: 5})
FRAME = zstandard.ZstdCompressor(write_content_size=True).compress(BODY)
SKIP = b"\x50\x2a\x4d\x18" + struct.pack("<I", 4) + b"meta"


@pytest.mark.parametrize("body", [FRAME + FRAME, SKIP + FRAME, FRAME + SKIP, FRAME + b"\x00", FRAME[:-1]])
def test_compressed_body_is_exactly_one_data_frame(body: bytes) -> None:
    with pytest.raises(DecodeError) as e:
        decode(b"\xb1\x01\x07" + body, SyncRequest, client="a")
    assert e.value.code == ErrorCode.DECOMPRESS_FAILED
    assert decode(b"\xb1\x01\x07" + FRAME, SyncRequest, client="a").have_round == 5


@pytest.mark.parametrize("body", [b"\x82\x00\x05\x00\x06", b"\x82\x00\x05\x00\x05"])
def test_duplicate_top_level_key_is_malformed(body: bytes) -> None:
    with pytest.raises(DecodeError) as e:
        decode(b"\xb1\x00\x07" + body, SyncRequest, client="a")
    assert e.value.code == ErrorCode.MALFORMED


def test_duplicate_nested_key_is_malformed() -> None:
    good = encode(Join("", "00" * 32, "00" * 8, 1, 1.0, {"k": 1}, -1))
    raw = msgpack.unpackb(good[3:], strict_map_key=False)
    body = msgpack.packb(raw, use_bin_type=True).replace(b"\x81\xa1k\x01", b"\x82\xa1k\x01\xa1k\x02")
    assert decode(good, Join, client="a").capabilities == {"k": 1}
    with pytest.raises(DecodeError) as e:
        decode(good[:3] + body, Join, client="a")
    assert e.value.code == ErrorCode.MALFORMED


def test_plan_carries_at_most_max_steps_seeds() -> None:
    kw = dict(fleet="f", round=0, lr=0.1, eps=0.1, dist="rademacher", base_round=-1, deadline=1.0,
              fingerprint="00" * 32, mask_id="00" * 8, batch_size=1, values_checksum="00" * 32)  # fmt: skip
    RoundPlan(seeds=tuple(range(MAX_STEPS)), steps={"a": MAX_STEPS}, **kw)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="seeds"):
        RoundPlan(seeds=tuple(range(MAX_STEPS + 1)), steps={"a": 1}, **kw)  # type: ignore[arg-type]
