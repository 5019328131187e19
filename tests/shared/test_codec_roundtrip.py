"""Wire codec: round trips for every type, header and limits, client id from the topic, validation."""

from __future__ import annotations

import dataclasses
from typing import Any

import msgpack
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from wire_strategies import ALL

from shared import codec
from shared.codec import MAX_BODY, DecodeError, ErrorCode, decode, encode, peek_type
from shared.messages import (
    CLIENT_FROM_TOPIC,
    CheckpointChunk,
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
from shared.prng import raw_u64

FP = "0123456789abcdef" * 4
MID = "fedcba9876543210"


def _plan(**kw: Any) -> RoundPlan:
    base: dict[str, Any] = dict(
        fleet="f1", round=3, seeds=(1, 2, 3), lr=1e-3, eps=1e-3, dist="rademacher", steps={"a": 3, "b": 1},
        base_round=2, deadline=1.7e9, fingerprint=FP, mask_id=MID, batch_size=8, values_checksum=FP,
    )  # fmt: skip
    base.update(kw)
    return RoundPlan(**base)


def _update(T: int = 10, **kw: Any) -> Update:
    base: dict[str, Any] = dict(
        round=70000, msg_id=(1 << 64) - 1, grads=tuple(0.1 * i - 0.3 for i in range(T)), n_samples=5000,
        fp_tag=0xFFFFFFFF, loss=0.693,
    )  # fmt: skip
    base.update(kw)
    return Update(**base)


def _result(T: int = 10) -> RoundResult:
    seeds = tuple((1 << 64) - 1 - i for i in range(T))
    return RoundResult(round=70000, seeds=seeds, scalars=tuple(1 / (i + 3) for i in range(T)), lr=1e-3,
                       dist="gaussian", n_clients=10, values_checksum=FP)  # fmt: skip


@pytest.mark.parametrize("name", sorted(ALL))
def test_roundtrip_every_type(name: str) -> None:
    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(ALL[name])
    def check(msg: Message) -> None:
        data = encode(msg)
        assert peek_type(data) is type(msg)
        client = getattr(msg, "client", "")
        got = decode(data, type(msg), client=client)
        assert got == msg
        assert encode(got) == data  # canonical: re-encoding gives the same bytes
        if type(msg) in CLIENT_FROM_TOPIC:
            assert decode(data).client == ""  # type: ignore[union-attr]

    check()


def test_client_id_comes_from_the_topic_never_the_body() -> None:
    sent = _update(client="mallory")
    data = encode(sent)
    assert b"mallory" not in data
    assert decode(data, Update, client="alice").client == "alice"
    for msg in (Status("mallory", True, 1.0), SyncRequest("mallory", 3), Heartbeat("mallory", 1.0, 5.0, 100)):
        assert b"mallory" not in encode(msg)
        assert decode(encode(msg), client="bob").client == "bob"  # type: ignore[union-attr]
    with pytest.raises(DecodeError) as ei:
        decode(data, Update, client="a/b")
    assert ei.value.code == ErrorCode.BAD_CLIENT


def test_sizes_meet_targets() -> None:
    assert len(encode(_update(T=10))) <= 80  # worst-case round, msg_id, n_samples widths
    assert len(encode(_update(T=100))) <= 8 * 100 // 2 + 40
    assert len(encode(_result(T=10))) < 1024


def test_large_bodies_are_compressed_small_ones_not() -> None:
    small = encode(_plan())
    assert small[1] == 0
    big_plan = _plan(steps={f"client-{i:05d}": 1 + i % 3 for i in range(2000)})
    big = encode(big_plan)
    assert big[1] & codec.FLAG_ZSTD
    assert decode(big, RoundPlan) == big_plan
    # incompressible but large: flag stays clear because zstd would not help
    noise = b"".join(int(u).to_bytes(8, "little") for u in raw_u64(9, 512))
    chunk = CheckpointChunk(0, 0, 1, FP, noise)
    assert encode(chunk)[1] == 0 and decode(encode(chunk)) == chunk


def test_header_layout() -> None:
    data = encode(SyncRequest("c", 7))
    assert data[:3] == bytes((0xB1, 0x00, 7))
    assert msgpack.unpackb(data[3:], strict_map_key=False) == {0: 7}


def _code(data: bytes, **kw: Any) -> ErrorCode:
    with pytest.raises(DecodeError) as ei:
        decode(data, **kw)
    assert isinstance(ei.value.code, ErrorCode)
    return ei.value.code


def test_header_errors() -> None:
    good = encode(SyncRequest("c", 7))
    assert _code(b"") == ErrorCode.TRUNCATED
    assert _code(good[:2]) == ErrorCode.TRUNCATED
    assert _code(b"\xa1" + good[1:]) == ErrorCode.BAD_MAGIC
    assert _code(b"\xb2" + good[1:]) == ErrorCode.UNSUPPORTED_VERSION
    assert _code(good[:1] + b"\x02" + good[2:]) == ErrorCode.BAD_FLAGS
    assert _code(good[:2] + b"\x63" + good[3:]) == ErrorCode.UNKNOWN_TYPE
    assert _code(good, expected=Update) == ErrorCode.UNEXPECTED_TYPE
    assert decode(good, (Update, SyncRequest)) == SyncRequest("", 7)
    assert _code(good[:1] + b"\x01" + good[2:]) == ErrorCode.DECOMPRESS_FAILED


def _raw(code: int, body: Any, flags: int = 0) -> bytes:
    return bytes((0xB1, flags, code)) + msgpack.packb(body, use_bin_type=True)


def test_body_errors_name_the_field() -> None:
    assert _code(_raw(7, [1, 2])) == ErrorCode.MALFORMED
    assert _code(b"\xb1\x00\x07\xc1") == ErrorCode.MALFORMED  # 0xc1 is never valid msgpack
    assert _code(_raw(7, {0: 1}) + b"\x00") == ErrorCode.MALFORMED  # trailing bytes
    assert _code(_raw(7, {"0": 1})) == ErrorCode.MALFORMED
    assert _code(_raw(7, {})) == ErrorCode.MISSING_FIELD
    assert _code(_raw(7, {0: 1, 9: 1})) == ErrorCode.UNKNOWN_FIELD
    assert _code(_raw(7, {0: "1"})) == ErrorCode.INVALID_FIELD
    assert _code(_raw(7, {0: True})) == ErrorCode.INVALID_FIELD
    assert _code(_raw(7, {0: -2})) == ErrorCode.INVALID_FIELD
    assert _code(_raw(7, {0: 1 << 40})) == ErrorCode.INVALID_FIELD
    with pytest.raises(DecodeError, match="Update.grads"):
        decode(_raw(3, {0: 1, 1: 1, 2: b"abc", 3: 1, 4: 1, 5: 0.5}))
    with pytest.raises(DecodeError, match="Update.grads\\[1\\]"):
        decode(_raw(3, {0: 1, 1: 1, 2: b"\x00\x00\x00\x00\x00\x00\xc0\x7f", 3: 1, 4: 1, 5: 0.5}))  # NaN
    with pytest.raises(DecodeError, match="RoundResult.scalars"):
        decode(_raw(4, {0: 1, 1: b"\x01" * 16, 2: b"\x00" * 8, 3: 0.1, 4: 0, 5: 1, 6: b"\x00" * 32}))
    with pytest.raises(DecodeError, match="values_checksum"):
        decode(_raw(4, {0: 1, 1: b"", 2: b"", 3: 0.1, 4: 0, 5: 1, 6: b"\x00" * 31}))
    with pytest.raises(DecodeError, match="dist"):
        decode(_raw(4, {0: 1, 1: b"", 2: b"", 3: 0.1, 4: 2, 5: 1, 6: b"\x00" * 32}))
    # PROTOCOL.md 1.3 D1: a timestamp is a value of the wrong kind; as a body key it is a non-integer key
    assert _code(_raw(6, {0: True, 1: msgpack.Timestamp(1, 0)})) == ErrorCode.INVALID_FIELD
    assert _code(_raw(7, {msgpack.Timestamp(1, 0): 1})) == ErrorCode.MALFORMED
    assert _code(_raw(6, {0: True, 1: msgpack.ExtType(5, b"x")})) == ErrorCode.MALFORMED


def test_size_limit_checked_before_decompression() -> None:
    # 70 KB of garbage behind an Update header: refused on size alone (a body parse would say MALFORMED)
    assert _code(bytes((0xB1, 1, 3)) + b"\xff" * 70_000) == ErrorCode.TOO_LARGE
    data = encode(SyncRequest("c", 1))
    assert _code(data, max_bytes=len(data) - 1) == ErrorCode.TOO_LARGE


def test_zstd_bombs_are_refused() -> None:
    body = b"\x00" * (MAX_BODY + 10)
    declared = zstandard.ZstdCompressor(write_content_size=True).compress(body)
    assert _code(bytes((0xB1, 1, 2)) + declared) == ErrorCode.TOO_LARGE
    hidden = zstandard.ZstdCompressor(write_content_size=False).compress(body)
    assert _code(bytes((0xB1, 1, 2)) + hidden) == ErrorCode.TOO_LARGE
    corrupt = bytearray(zstandard.ZstdCompressor().compress(msgpack.packb({0: 1}) * 100))
    corrupt[-3] ^= 0xFF
    assert _code(bytes((0xB1, 1, 7)) + bytes(corrupt)) in (ErrorCode.DECOMPRESS_FAILED, ErrorCode.MALFORMED)


def test_float32_fields_are_rounded_at_construction() -> None:
    u = _update(grads=(0.1,), loss=0.1)
    assert u.grads == (float.__new__(float, 0.10000000149011612),)
    assert decode(encode(u), Update) == u
    with pytest.raises(ValueError, match="grads\\[0\\].*float32"):
        _update(grads=(1e300,))


BAD_FIELDS: list[tuple[Any, dict[str, Any], str]] = [
    (_update, {"round": -1}, "Update.round"),
    (_update, {"round": "3"}, "Update.round: expected int"),
    (_update, {"msg_id": 1 << 64}, "Update.msg_id"),
    (_update, {"grads": ()}, "Update.grads: expected 1..4096"),
    (_update, {"grads": (1.0, float("inf"))}, "Update.grads\\[1\\]"),
    (_update, {"grads": "12"}, "Update.grads: expected a sequence"),
    (_update, {"fp_tag": 1 << 32}, "Update.fp_tag"),
    (_update, {"loss": float("nan")}, "Update.loss"),
    (_update, {"n_samples": True}, "Update.n_samples"),
    (_update, {"client": "a+b"}, "Update.client"),
    (_plan, {"seeds": ()}, "RoundPlan.seeds"),
    (_plan, {"seeds": (1, -1)}, "RoundPlan.seeds\\[1\\]"),
    (_plan, {"steps": {"a": 4}}, "RoundPlan.steps\\['a'\\]"),
    (_plan, {"steps": {"#": 1}}, "RoundPlan.steps key"),
    (_plan, {"eps": 0.0}, "RoundPlan.eps"),
    (_plan, {"dist": "normal"}, "RoundPlan.dist"),
    (_plan, {"fingerprint": FP.upper()}, "RoundPlan.fingerprint"),
    (_plan, {"mask_id": FP}, "RoundPlan.mask_id"),
    (_plan, {"fleet": ""}, "RoundPlan.fleet"),
    (_plan, {"batch_size": 0}, "RoundPlan.batch_size"),
    (_plan, {"base_round": -2}, "RoundPlan.base_round"),
]


@pytest.mark.parametrize("factory,kw,msg", BAD_FIELDS, ids=[m for _, _, m in BAD_FIELDS])
def test_validation_names_the_field(factory: Any, kw: dict[str, Any], msg: str) -> None:
    with pytest.raises(ValueError, match=msg):
        factory(**kw)


def test_validation_other_types() -> None:
    with pytest.raises(ValueError, match="RoundResult.scalars: expected 2 items"):
        RoundResult(1, (1, 2), (0.5,), 0.1, "gaussian", 1, FP)
    with pytest.raises(ValueError, match="Join.capabilities\\['x'\\]"):
        Join("c", FP, MID, 1, 1.0, {"x": [1]})  # type: ignore[dict-item]  # the wrong type on purpose
    with pytest.raises(ValueError, match="Join.budget_gib"):
        Join("c", FP, MID, 1, -1.0)
    with pytest.raises(ValueError, match="Heartbeat.temp_c"):
        Heartbeat("c", 1.0, 1.0, 1, temp_c=float("nan"))
    with pytest.raises(ValueError, match="Status.online: expected bool"):
        Status("c", 1, 1.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="SyncRequest.have_round"):
        SyncRequest("c", -2)
    with pytest.raises(ValueError, match="Replay.results\\[0\\]"):
        Replay((SyncRequest("c", 1),))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="CheckpointChunk.index"):
        CheckpointChunk(1, 2, 2, FP, b"")
    with pytest.raises(ValueError, match="ErrorMsg.reason"):
        ErrorMsg(1, "x" * 5000)
    with pytest.raises(ValueError, match="RunState.state"):
        RunState("paused", 3, 1.0)  # protocol 1.3: four states only
    with pytest.raises(ValueError, match="RunState.last_round"):
        RunState("finished", -2, 1.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        _update().round = 5  # type: ignore[misc]


def test_error_codes_are_stable() -> None:
    # numbers are part of the protocol (docs/PROTOCOL.md): never renumber
    assert (ErrorCode.TOO_LARGE, ErrorCode.MALFORMED, ErrorCode.INVALID_FIELD, ErrorCode.BAD_CLIENT) == (
        1,
        9,
        12,
        13,
    )
    assert (ErrorCode.FINGERPRINT_MISMATCH, ErrorCode.STALE_ROUND, ErrorCode.INTERNAL) == (32, 34, 63)
    assert {cls: c for cls, (c, _, _) in codec.SCHEMAS.items()} == {
        Join: 1, RoundPlan: 2, Update: 3, RoundResult: 4, Heartbeat: 5, Status: 6, SyncRequest: 7,
        Replay: 8, CheckpointChunk: 9, ErrorMsg: 10, RunState: 11,
    }  # fmt: skip


def test_encode_refuses_non_messages_and_oversize() -> None:
    with pytest.raises(TypeError, match="not a message type"):
        encode("hello")  # type: ignore[arg-type]

    def random_result(r: int) -> RoundResult:  # 1 MB of incompressible pairs
        seeds = raw_u64(r, 65536).tolist()
        scalars = [u / 2**64 for u in raw_u64(r + 100, 65536).tolist()]
        return RoundResult(r, tuple(seeds), tuple(scalars), 0.1, "gaussian", 1, FP)

    huge = Replay(tuple(random_result(r) for r in range(9)))
    with pytest.raises(ValueError, match="over its limit"):
        encode(huge)


def test_check_order_of_protocol_1_3() -> None:
    """PROTOCOL.md §2 "Check order": the topic's client id first, then the header; within the body map
    non-integer keys (anywhere), unknown keys, missing keys, values: the wire order never decides."""
    assert _code(b"", client="-x") == ErrorCode.BAD_CLIENT  # check 2 before check 4 (TRUNCATED)
    assert _code(b"\x01\x00\x07", client="-x") == ErrorCode.BAD_CLIENT
    sync = bytes((0xB1, 0, 7))
    assert _code(sync + b"\x83\x09\x01\xa1a\x01\x00\x05") == ErrorCode.MALFORMED  # str key after unknown key 9
    assert _code(sync + b"\x83\xa1a\x01\x09\x01\x00\x05") == ErrorCode.MALFORMED
    assert _code(_raw(6, {0: True, 7: 1})) == ErrorCode.UNKNOWN_FIELD  # ts missing too
    assert _code(_raw(6, {0: 5})) == ErrorCode.MISSING_FIELD  # online invalid too
    assert _code(_raw(6, {1: 1.0})) == ErrorCode.MISSING_FIELD


def test_plan_fleet_is_the_topics() -> None:
    """1.3 D5: given the topic's fleet, a plan naming another one is INVALID_FIELD; without it, it decodes."""
    data = encode(_plan())
    assert decode(data, RoundPlan, fleet=_plan().fleet) == _plan()
    assert decode(data, RoundPlan) == _plan()
    assert _code(data, fleet="another-fleet") == ErrorCode.INVALID_FIELD
