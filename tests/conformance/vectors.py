"""Hand-made decode vectors for the edge cases of docs/PROTOCOL.md §2 (deterministic; no broker needed).

    .venv/bin/python tests/conformance/vectors.py      # rewrites tests/conformance/vectors/decode_edge.jsonl

Each line: {"name", "rule" (the document's words), "topic", "payload" (hex), then either "error" (the code
a receiver must refuse it with) or "type" + "decoded" (it must be accepted, with these fields)}. A vector
with "pending" names the code change our implementation still needs for it; the runner reports those
separately instead of failing, and tests/conformance/test_conformance.py insists that exactly those fail.
"""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
OUT = HERE / "vectors" / "decode_edge.jsonl"
STEPS_OUT = HERE / "vectors" / "plan_steps.jsonl"  # 1.3 compact plans: T_client (runner op "steps")
for p in (HERE.parents[1], HERE):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import msgpack  # noqa: E402
import zstandard  # noqa: E402

F = "meerkat/v1/conf-vectors"
SYNC = f"{F}/sync/dev-a"
HDR_SYNC = bytes([0xB1, 0x00, 0x07])
HDR_SYNC_Z = bytes([0xB1, 0x01, 0x07])
BODY = msgpack.packb({0: 5})  # SyncRequest(have_round=5)
FRAME = zstandard.ZstdCompressor(write_content_size=True).compress(BODY)
SKIPPABLE = b"\x50\x2a\x4d\x18" + struct.pack("<I", 4) + b"meta"
SYNC5 = {"type": "SyncRequest", "decoded": {"have_round": 5}}


def _hb(extra: dict[int, Any]) -> bytes:
    return bytes([0xB1, 0, 5]) + msgpack.packb({0: 1.0, 1: 1.0, 2: 1, 8: -1, **extra}, use_single_float=False)


def _plan(n_seeds: int, extra: dict[int, Any] | None = None, *, fleet: str = "conf-vectors",
          steps: dict[Any, Any] | None = None) -> bytes:
    body = {0: fleet, 1: 0, 2: struct.pack(f"<{n_seeds}Q", *range(n_seeds)), 3: 0.01, 4: 0.001, 5: 0,
            6: {"dev-a": n_seeds} if steps is None else steps, 7: -1, 8: 1.0, 9: b"\x00" * 32, 10: b"\x00" * 8,
            11: 1, 12: b"\x00" * 32, **(extra or {})}  # fmt: skip
    raw = msgpack.packb(body, use_bin_type=True)
    return bytes([0xB1, 1, 2]) + zstandard.ZstdCompressor(write_content_size=True).compress(raw)


def vectors() -> list[dict[str, Any]]:
    v: list[dict[str, Any]] = [
        dict(name="empty", rule="shorter than the header", topic=f"{F}/to/dev-a", payload=b"\xb1\x00", error="TRUNCATED"),
        dict(name="bad_magic", rule="high nibble of byte 0", topic=SYNC, payload=b"\x01\x00\x07\x81\x00\x05", error="BAD_MAGIC"),
        dict(name="version_2", rule="schema version", topic=SYNC, payload=b"\xb2\x00\x07" + BODY, error="UNSUPPORTED_VERSION"),
        dict(name="reserved_flag", rule="flag bits 1-7", topic=SYNC, payload=b"\xb1\x02\x07" + BODY, error="BAD_FLAGS"),
        dict(name="type_12", rule="type code", topic=SYNC, payload=b"\xb1\x00\x0c" + BODY, error="UNKNOWN_TYPE"),
        dict(name="wrong_topic", rule="type expected on the topic", topic=f"{F}/plan", payload=HDR_SYNC + BODY,
             error="UNEXPECTED_TYPE"),
        dict(name="bad_client_id", rule="client id from the topic", topic=f"{F}/sync/-x", payload=HDR_SYNC + BODY,
             error="BAD_CLIENT"),
        dict(name="zstd_no_content_size", rule="a frame without the content size is accepted", topic=SYNC,
             payload=HDR_SYNC_Z + zstandard.ZstdCompressor(write_content_size=False).compress(BODY), **SYNC5),
        dict(name="zstd_small_body", rule="compression is the sender's choice", topic=SYNC,
             payload=HDR_SYNC_Z + FRAME, **SYNC5),
        dict(name="zstd_trailing_bytes", rule="bytes after the zstd frame", topic=SYNC,
             payload=HDR_SYNC_Z + FRAME + b"\x00\x01", error="DECOMPRESS_FAILED"),
        dict(name="zstd_two_frames", rule="bytes after the zstd frame (a second frame)", topic=SYNC,
             payload=HDR_SYNC_Z + FRAME + FRAME, error="DECOMPRESS_FAILED"),
        dict(name="zstd_skippable_frame", rule="exactly one zstd data frame", topic=SYNC,
             payload=HDR_SYNC_Z + SKIPPABLE + FRAME, error="DECOMPRESS_FAILED"),
        dict(name="zstd_corrupt", rule="corrupt frame", topic=SYNC, payload=HDR_SYNC_Z + b"not a zstd frame",
             error="DECOMPRESS_FAILED"),
        dict(name="msgpack_trailing_byte", rule="exactly one msgpack object", topic=SYNC, payload=HDR_SYNC + BODY + b"\xc0",
             error="MALFORMED"),
        dict(name="duplicate_key", rule="duplicate map keys", topic=SYNC, payload=HDR_SYNC + b"\x82\x00\x05\x00\x06",
             error="MALFORMED"),
        dict(name="duplicate_nested_key", rule="duplicate map keys (nested)", topic=f"{F}/join/dev-a",
             payload=bytes([0xB1, 0, 1]) + b"\x86\x00\xc4\x20" + b"\x00" * 32 + b"\x01\xc4\x08" + b"\x00" * 8
             + b"\x02\x01\x03\xcb" + struct.pack(">d", 1.0) + b"\x04\x82\xa1k\x01\xa1k\x02\x05\xff",
             error="MALFORMED"),
        dict(name="negative_key", rule="a negative integer key is a key this version does not define", topic=SYNC,
             payload=HDR_SYNC + b"\x82\x00\x05\xff\x06", error="UNKNOWN_FIELD"),
        dict(name="str_key", rule="keys are integers", topic=SYNC, payload=HDR_SYNC + msgpack.packb({"0": 5}),
             error="MALFORMED"),
        dict(name="float_key", rule="keys are integers", topic=SYNC, payload=HDR_SYNC + b"\x81\xca\x00\x00\x00\x00\x05",
             error="MALFORMED"),
        dict(name="ext_type", rule="msgpack ext types", topic=SYNC, payload=HDR_SYNC + b"\x81\x00\xd4\x01\x05",
             error="MALFORMED"),
        dict(name="missing_required", rule="required key absent", topic=f"{F}/hb/dev-a",
             payload=bytes([0xB1, 0, 5]) + msgpack.packb({0: 1.0, 1: 1.0, 2: 1}), error="MISSING_FIELD"),
        dict(name="nil_optional", rule="an optional key is absent, never nil", topic=f"{F}/hb/dev-a",
             payload=_hb({3: None}), error="INVALID_FIELD"),
        dict(name="bool_for_int", rule="bool is not an integer", topic=SYNC, payload=HDR_SYNC + b"\x81\x00\xc3",
             error="INVALID_FIELD"),
        dict(name="int_for_float", rule="an integer is accepted for a float field", topic=f"{F}/hb/dev-a",
             payload=_hb({}).replace(b"\x00\xcb" + struct.pack(">d", 1.0), b"\x00\x01", 1),
             type="Heartbeat", decoded={"ts": 1.0, "cpu_pct": 1.0, "rss_bytes": 1, "round": -1}),
        dict(name="hb_eval", rule="v1.2: a Heartbeat may carry the device's latest evaluation (keys 9-12)",
             topic=f"{F}/hb/dev-a", payload=_hb({9: 4, 10: 0.5, 11: 0.75, 12: 32}), type="Heartbeat",
             decoded={"ts": 1.0, "cpu_pct": 1.0, "rss_bytes": 1, "round": -1, "eval_round": 4, "eval_loss": 0.5,
                      "eval_acc": 0.75, "eval_n": 32}),
        dict(name="hb_eval_partial", rule="v1.2: eval_round, eval_loss and eval_n come together",
             topic=f"{F}/hb/dev-a", payload=_hb({9: 4, 10: 0.5}), error="INVALID_FIELD"),
        dict(name="run_state", rule="v1.3: the run's lifecycle, retained on `run` (type 11)", topic=f"{F}/run",
             payload=bytes([0xB1, 0, 11]) + msgpack.packb({0: "stopped", 1: 41, 2: 5.0, 3: "meerkat stop"}),
             type="RunState", decoded={"state": "stopped", "last_round": 41, "ts": 5.0, "reason": "meerkat stop"}),
        dict(name="run_state_unknown", rule="v1.3: state is one of running, finishing, finished, stopped",
             topic=f"{F}/run", payload=bytes([0xB1, 0, 11]) + msgpack.packb({0: "paused", 1: 41, 2: 5.0, 3: ""}),
             error="INVALID_FIELD"),
        dict(name="hb_dp", rule="v1.3: a Heartbeat may carry the device's spent privacy budget (keys 13-15)",
             topic=f"{F}/hb/dev-a", payload=_hb({13: 1.25, 14: 1e-3, 15: True}), type="Heartbeat",
             decoded={"ts": 1.0, "cpu_pct": 1.0, "rss_bytes": 1, "round": -1, "dp_epsilon": 1.25, "dp_delta": 1e-3,
                      "dp_exhausted": True}),
        dict(name="hb_dp_partial", rule="v1.3: dp_epsilon and dp_delta come together",
             topic=f"{F}/hb/dev-a", payload=_hb({13: 1.25}), error="INVALID_FIELD"),
        dict(name="plan_dp", rule="v1.3: a plan may carry the fleet's DP rule (keys 13-17)", topic=f"{F}/plan",
             payload=_plan(3, {13: 1.0, 14: 0.0, 15: 8.0, 16: 0.0, 17: 40}), type="RoundPlan"),
        dict(name="plan_dp_partial", rule="v1.3: the DP keys 13-17 come together", topic=f"{F}/plan",
             payload=_plan(3, {13: 1.0, 15: 8.0}), error="INVALID_FIELD"),
        dict(name="hb_paused", rule="v1.3: a Heartbeat may say the device policy paused it, and why (keys 16-18)",
             topic=f"{F}/hb/dev-a", payload=_hb({16: False, 17: "on battery", 18: 0.25}), type="Heartbeat",
             decoded={"ts": 1.0, "cpu_pct": 1.0, "rss_bytes": 1, "round": -1, "available": False,
                      "pause_reason": "on battery", "trained_share": 0.25}),
        dict(name="hb_available", rule="v1.3: an available device sends no pause_reason", topic=f"{F}/hb/dev-a",
             payload=_hb({16: True, 18: 1.0}), type="Heartbeat",
             decoded={"ts": 1.0, "cpu_pct": 1.0, "rss_bytes": 1, "round": -1, "available": True, "trained_share": 1.0}),
        dict(name="hb_reason_while_available", rule="v1.3: pause_reason only with available = false",
             topic=f"{F}/hb/dev-a", payload=_hb({16: True, 17: "busy"}), error="INVALID_FIELD"),
        dict(name="hb_share_over_1", rule="v1.3: trained_share is in [0, 1]", topic=f"{F}/hb/dev-a",
             payload=_hb({16: True, 18: 1.5}), error="INVALID_FIELD"),
        dict(name="hb_peak_rss", rule="v1.3: a Heartbeat may carry the process's peak RSS since it started (key 19)",
             topic=f"{F}/hb/dev-a", payload=_hb({19: 473 << 20}), type="Heartbeat",
             decoded={"ts": 1.0, "cpu_pct": 1.0, "rss_bytes": 1, "round": -1, "peak_rss_bytes": 473 << 20}),
        dict(name="hb_peak_rss_negative", rule="v1.3: peak_rss_bytes is a uint", topic=f"{F}/hb/dev-a",
             payload=_hb({19: -1}), error="INVALID_FIELD"),
        dict(name="invalid_utf8", rule="str is UTF-8", topic=f"{F}/to/dev-a",
             payload=bytes([0xB1, 0, 10]) + b"\x82\x00\x01\x01\xa1\xff", error="MALFORMED"),
        dict(name="keys_out_of_order", rule="a receiver must not depend on key order", topic=f"{F}/status/dev-a",
             payload=bytes([0xB1, 0, 6]) + b"\x82\x01\xcb" + struct.pack(">d", 2.0) + b"\x00\xc3",
             type="Status", decoded={"online": True, "ts": 2.0}),
        dict(name="grads_4097", rule="an Update carries at most 4096 grads: a bin over the type's max bin (§2) is MALFORMED", topic=f"{F}/up/dev-a",
             payload=bytes([0xB1, 1, 3]) + zstandard.ZstdCompressor().compress(msgpack.packb(
                 {0: 0, 1: 1, 2: b"\x00" * 4 * 4097, 3: 1, 4: 0, 5: 1.0})), error="MALFORMED"),
        dict(name="plan_4097_seeds", rule="a plan carries at most 4096 seeds (= the Update limit)", topic=f"{F}/plan",
             payload=_plan(4097), error="INVALID_FIELD"),
        dict(name="plan_4096_seeds", rule="a plan of 4096 seeds, one client running all of them", topic=f"{F}/plan",
             payload=_plan(4096), type="RoundPlan"),
    ]  # fmt: skip
    v += limits() + check_order() + decisions() + error_codes() + compact_plans()
    for x in v:
        x["payload"] = x["payload"].hex()
    return v


# ---- protocol 1.3: every §2 limit, the check order, ext/timestamp, the decisions, every error code --------

HB, ST, JOIN, UP, TO = (f"{F}/{k}/dev-a" for k in ("hb", "status", "join", "up", "to"))
FP32, MASK8 = b"\x11" * 32, b"\x22" * 8
JOIN_JSON = {"fingerprint": "11" * 32, "mask_id": "22" * 8, "n_samples": 3, "budget_gib": 1.0, "last_round": -1}
EMOJI = "\U0001f600"  # 1 character (code point), 4 UTF-8 bytes
TS32, TS64, TS96 = b"\xd6\xff" + b"\x00" * 4, b"\xd7\xff" + b"\x00" * 8, b"\xc7\x0c\xff" + b"\x00" * 12  # timestamps


def _p(code: int, body: bytes, flags: int = 0) -> bytes:
    return bytes([0xB1, flags, code]) + body


def _mp(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True, use_single_float=False)


def _join(caps: dict[str, Any]) -> bytes:
    return _p(1, _mp({0: FP32, 1: MASK8, 2: 3, 3: 1.0, 4: caps, 5: -1}))


def _update(**kw: Any) -> bytes:
    body = {0: 0, 1: 1, 2: struct.pack("<f", 0.5), 3: 1, 4: 7, 5: 1.0}
    body.update({int(k[1:]): x for k, x in kw.items()})
    return _p(3, _mp(body))


def _result(r: int) -> dict[int, Any]:
    return {0: r, 1: struct.pack("<Q", 9), 2: struct.pack("<d", 0.25), 3: 0.01, 4: 0, 5: 1, 6: b"\x33" * 32}


def _zstd_stream(body: bytes) -> bytes:
    """One zstd frame WITHOUT the content size (the receiver only learns the size by decompressing)."""
    return zstandard.ZstdCompressor(write_content_size=False).compress(body)


def limits() -> list[dict[str, Any]]:
    """One vector (or an at-limit / over-limit pair) per limit of the §2 table."""
    big = _mp({0: 5}) + b"\xc0" * 1100  # 1 103 bytes: over SyncRequest's 1 024-byte max body
    return [
        dict(name="too_large_payload", rule="§2 max payload (Status 1 024): checked before anything is parsed",
             topic=ST, payload=_p(6, _mp({0: True, 1: 1.0})) + b"\x00" * 1013, error="TOO_LARGE"),
        dict(name="too_large_declared_size", rule="§2 zstd: a frame may not declare more than the max body",
             topic=SYNC, payload=HDR_SYNC_Z + zstandard.ZstdCompressor(write_content_size=True).compress(big),
             error="TOO_LARGE"),
        dict(name="too_large_window", rule="§2 zstd: a frame may not ask for a window over max(8 MiB, max body)",
             topic=SYNC, payload=HDR_SYNC_Z + bytes.fromhex("28b52ffd0070190000810005"), error="TOO_LARGE"),
        dict(name="window_at_limit", rule="§2 zstd: an 8 MiB window is allowed for every type", topic=SYNC,
             payload=HDR_SYNC_Z + bytes.fromhex("28b52ffd0068190000810005"), **SYNC5),
        dict(name="too_large_stream", rule="§2 zstd: a frame without a size is decompressed in a bounded stream",
             topic=SYNC, payload=HDR_SYNC_Z + _zstd_stream(big), error="TOO_LARGE"),
        dict(name="str_over_max_str", rule="§2 max str (ErrorMsg 4 096 bytes): MALFORMED while parsing", topic=TO,
             payload=_p(10, _mp({0: 1, 1: "x" * 4097})), error="MALFORMED"),
        dict(name="bin_over_max_bin", rule="§2 max bin (Heartbeat 64): MALFORMED while parsing", topic=HB,
             payload=_hb({0: b"\x00" * 65}), error="MALFORMED"),
        dict(name="bin_at_max_bin_wrong_kind", rule="§2 max bin floor 64: a short value of the wrong kind is "
             "INVALID_FIELD", topic=HB, payload=_hb({0: b"\x00" * 64}), error="INVALID_FIELD"),
        dict(name="array_in_arrayless_type", rule="§2 max array (SyncRequest 0)", topic=SYNC,
             payload=_p(7, _mp({0: [1]})), error="MALFORMED"),
        dict(name="array_over_max_array", rule="§2 max array (Replay 1 024 results)", topic=TO,
             payload=_p(8, _mp({0: [{}] * 1025})), error="MALFORMED"),
        dict(name="array_at_max_array", rule="§2 max array: 1 024 results parse; each is then a RoundResult "
             "body (here without its keys)", topic=TO, payload=_p(8, _mp({0: [{}] * 1024})), error="MISSING_FIELD"),
        dict(name="map_over_max_map", rule="§2 max map (SyncRequest 16 entries)", topic=SYNC,
             payload=_p(7, _mp({k: 0 for k in range(17)})), error="MALFORMED"),
        dict(name="map_at_max_map", rule="§2 max map floor 16: an unknown key is UNKNOWN_FIELD", topic=SYNC,
             payload=_p(7, _mp({k: 0 for k in range(16)})), error="UNKNOWN_FIELD"),
        dict(name="caps_over_max_map", rule="§2 max map (Join 64: capabilities has at most 64 entries)", topic=JOIN,
             payload=_join({f"k{i}": i for i in range(65)}), error="MALFORMED"),
        dict(name="containers_over", rule="§2 containers (SyncRequest 1: the body only)", topic=SYNC,
             payload=_p(7, _mp({0: {}})), error="MALFORMED"),
        dict(name="containers_over_join", rule="§2 containers (Join 2: the body + capabilities)", topic=JOIN,
             payload=_join({"a": {}}), error="MALFORMED"),
        dict(name="depth_over", rule="§2 depth (Replay 3: body > results > one result)", topic=TO,
             payload=_p(8, _mp({0: [[[]]]})), error="MALFORMED"),
        dict(name="depth_at_limit", rule="§2 depth 3: a Replay of one result", topic=TO,
             payload=_p(8, _mp({0: [_result(4)]})), type="Replay"),
    ]  # fmt: skip


def check_order() -> list[dict[str, Any]]:
    """Payloads with two faults: the earlier check of §2 "Check order" decides the code."""
    sync_body = HDR_SYNC + BODY
    return [
        dict(name="order_foreign_version", rule="check 1: a topic not of §1 is ignored unread",
             topic="meerkat/v2/conf-vectors/plan", payload=sync_body, ignored="foreign_topic"),
        dict(name="order_foreign_kind", rule="check 1: an unknown topic kind", topic=f"{F}/bogus/dev-a",
             payload=sync_body, ignored="foreign_topic"),
        dict(name="order_foreign_levels", rule="check 1: a topic with an extra level", topic=f"{SYNC}/x",
             payload=sync_body, ignored="foreign_topic"),
        dict(name="order_foreign_round", rule="check 1: result/{round} without leading zeros", topic=f"{F}/result/017",
             payload=b"", ignored="foreign_topic"),
        dict(name="order_foreign_fleet", rule="check 1: the fleet level is not a valid id",
             topic="meerkat/v1/-f/plan", payload=b"", ignored="foreign_topic"),
        dict(name="order_bad_client_before_truncated", rule="check 2: the topic's client id before any payload byte",
             topic=f"{F}/sync/-x", payload=b"", error="BAD_CLIENT"),
        dict(name="order_bad_client_before_clear", rule="check 2: BAD_CLIENT before a retained clear",
             topic=f"{F}/status/_x", payload=b"", error="BAD_CLIENT"),
        dict(name="retained_clear_plan", rule="check 3: a zero-length payload on plan clears it (not a message)",
             topic=f"{F}/plan", payload=b"", ignored="retained_clear"),
        dict(name="retained_clear_result_latest", rule="check 3: zero-length on result/latest",
             topic=f"{F}/result/latest", payload=b"", ignored="retained_clear"),
        dict(name="retained_clear_status", rule="check 3: zero-length on status/{client}", topic=ST, payload=b"",
             ignored="retained_clear"),
        dict(name="retained_clear_sync", rule="check 3: zero-length on a client topic (the coordinator clears "
             "retained device messages, 1.3)", topic=SYNC, payload=b"", ignored="retained_clear"),
        dict(name="empty_result_round", rule="checks 3, 4: result/{round} is not retained: zero-length is TRUNCATED",
             topic=f"{F}/result/3", payload=b"", error="TRUNCATED"),
        dict(name="empty_to", rule="checks 3, 4: zero-length on to/{client} is TRUNCATED", topic=TO, payload=b"",
             error="TRUNCATED"),
        dict(name="order_version_before_flags", rule="checks 6, 7", topic=SYNC, payload=b"\xb2\x02\x07" + BODY,
             error="UNSUPPORTED_VERSION"),
        dict(name="order_flags_before_type", rule="checks 7, 8", topic=SYNC, payload=b"\xb1\x02\x0c" + BODY,
             error="BAD_FLAGS"),
        dict(name="order_type_before_topic_type", rule="checks 8, 9", topic=f"{F}/plan", payload=b"\xb1\x00\x0c" + BODY,
             error="UNKNOWN_TYPE"),
        dict(name="order_unexpected_before_too_large", rule="checks 9, 10", topic=SYNC,
             payload=_p(6, b"\x00" * 2000), error="UNEXPECTED_TYPE"),
        dict(name="order_too_large_before_zstd", rule="checks 10, 11: the payload size before decompressing",
             topic=ST, payload=_p(6, b"not zstd" * 200, flags=1), error="TOO_LARGE"),
        dict(name="order_parse_before_fields", rule="checks 12, 14: a duplicate key before an unknown key",
             topic=SYNC, payload=HDR_SYNC + b"\x82\x09\x01\x09\x02", error="MALFORMED"),
        dict(name="order_ext_before_fields", rule="checks 12, 16: an ext (not a timestamp) before any field check",
             topic=ST, payload=_p(6, b"\x82\x00\x05\x01\xd4\x01\x00"), error="MALFORMED"),
        dict(name="order_nonint_key_after_unknown", rule="checks 13, 14: a non-integer key anywhere in the map "
             "before an unknown key (wire order does not matter)", topic=SYNC,
             payload=HDR_SYNC + b"\x83\x09\x01\xa1a\x01\x00\x05", error="MALFORMED"),
        dict(name="order_unknown_before_missing", rule="checks 14, 15", topic=ST, payload=_p(6, _mp({0: True, 7: 1})),
             error="UNKNOWN_FIELD"),
        dict(name="order_unknown_before_invalid", rule="checks 14, 16", topic=SYNC, payload=_p(7, _mp({0: "x", 9: 1})),
             error="UNKNOWN_FIELD"),
        dict(name="order_missing_before_invalid", rule="checks 15, 16: a missing key before a bad value at a lower "
             "key", topic=ST, payload=_p(6, _mp({0: 5})), error="MISSING_FIELD"),
    ]  # fmt: skip


def decisions() -> list[dict[str, Any]]:
    """The 1.3 decisions (PROTOCOL.md Changelog 1.3, D1-D11), one vector or more each."""
    hb = {"ts": 1.0, "cpu_pct": 1.0, "rss_bytes": 1, "round": -1}
    upd = {"round": 0, "msg_id": 1, "grads": [0.5], "n_samples": 1, "fp_tag": 7, "loss": 1.0}
    return [
        dict(name="d1_timestamp32", rule="D1: a msgpack timestamp (ext -1, 4 bytes) is a value of the wrong kind",
             topic=HB, payload=_p(5, b"\x84\x00" + TS32 + b"\x01\x01\x02\x01\x08\xff"), error="INVALID_FIELD"),
        dict(name="d1_timestamp64", rule="D1: timestamp, 8 bytes", topic=ST, payload=_p(6, b"\x82\x00\xc3\x01" + TS64),
             error="INVALID_FIELD"),
        dict(name="d1_timestamp96", rule="D1: timestamp, 12 bytes", topic=ST, payload=_p(6, b"\x82\x00\xc3\x01" + TS96),
             error="INVALID_FIELD"),
        dict(name="d1_timestamp_bad_length", rule="D1: ext -1 of another length is not a timestamp: MALFORMED",
             topic=ST, payload=_p(6, b"\x82\x00\xc3\x01\xc7\x05\xff" + b"\x00" * 5), error="MALFORMED"),
        dict(name="d1_timestamp_bad_nanoseconds", rule="D1: a timestamp with nanoseconds over 999 999 999: MALFORMED",
             topic=ST, payload=_p(6, b"\x82\x00\xc3\x01\xd7\xff" + b"\xff" * 4 + b"\x00" * 4), error="MALFORMED"),
        dict(name="d1_ext_13_bytes", rule="D1: any other ext (here type 1, 13 bytes) is MALFORMED", topic=ST,
             payload=_p(6, b"\x82\x00\xc3\x01\xc7\x0d\x01" + b"\x00" * 13), error="MALFORMED"),
        dict(name="d1_timestamp_body_key", rule="D1: a timestamp as a body key is a non-integer key", topic=SYNC,
             payload=HDR_SYNC + b"\x81" + TS32 + b"\x05", error="MALFORMED"),
        dict(name="d1_timestamp_after_unknown", rule="D1: a timestamp value is checked with the values (check 16), "
             "after the keys", topic=ST, payload=_p(6, b"\x83\x00\xc3\x01" + TS32 + b"\x07\x01"), error="UNKNOWN_FIELD"),
        dict(name="d1_timestamp_in_capabilities", rule="D1: a timestamp as a capabilities value", topic=JOIN,
             payload=_p(1, b"\x86\x00\xc4\x20" + FP32 + b"\x01\xc4\x08" + MASK8 + b"\x02\x03\x03\x01\x04\x81\xa1t"
                        + TS32 + b"\x05\xff"), error="INVALID_FIELD"),
        dict(name="d2_f64_in_f32_narrowed", rule="D2: an f64 in an f32 field is rounded to the nearest float32",
             topic=HB, payload=_hb({1: 0.1}), type="Heartbeat", decoded={**hb, "cpu_pct": 0.10000000149011612}),
        dict(name="d2_int_in_f32", rule="D2: an integer in an f32 field", topic=HB, payload=_hb({1: 3}),
             type="Heartbeat", decoded={**hb, "cpu_pct": 3.0}),
        dict(name="d2_f64_large_narrowed", rule="D2: a finite f64 within float32 range", topic=UP,
             payload=_update(k5=1e38), type="Update", decoded={**upd, "loss": 9.999999680285692e37}),
        dict(name="d2_f64_overflows_f32", rule="D2: an f64 whose float32 rounding is infinite is INVALID_FIELD",
             topic=UP, payload=_update(k5=3.5e38), error="INVALID_FIELD"),
        dict(name="d2_range_before_rounding", rule="D2: the range is checked on the value as sent (eval_acc "
             "1 + 1e-9 rounds to 1.0f but is out of 0 ... 1)", topic=HB,
             payload=_hb({9: 4, 10: 0.5, 11: 1.000000001, 12: 32}), error="INVALID_FIELD"),
        dict(name="d2_nan", rule="D2: values must be finite", topic=HB, payload=_hb({0: float("nan")}),
             error="INVALID_FIELD"),
        dict(name="d2_inf_f32", rule="D2: values must be finite (float 32 inf)", topic=HB,
             payload=_p(5, b"\x84\x00\xcb" + struct.pack(">d", 1.0) + b"\x01\xca\x7f\x80\x00\x00\x02\x01\x08\xff"),
             error="INVALID_FIELD"),
        dict(name="d5_plan_fleet_mismatch", rule="D5: a plan whose fleet is not the topic's fleet", topic=f"{F}/plan",
             payload=_plan(2, fleet="other-fleet"), error="INVALID_FIELD"),
        dict(name="d6_replay_out_of_order_decodes", rule="D6: consecutive ascending is the sender's rule; a "
             "receiver does not refuse a Replay for its order", topic=TO,
             payload=_p(8, _mp({0: [_result(5), _result(4)]})), type="Replay"),
        dict(name="d7_steps_key_not_an_id", rule="D7: a steps key that is not a client id", topic=f"{F}/plan",
             payload=_plan(2, steps={"-x": 1}), error="INVALID_FIELD"),
        dict(name="d7_steps_key_int", rule="D7: a steps key that is not a str", topic=f"{F}/plan",
             payload=_plan(2, steps={5: 1}), error="INVALID_FIELD"),
        dict(name="d8_reason_1024_chars", rule="D8: lengths in chars are Unicode code points (1 024 x 4 bytes)",
             topic=TO, payload=_p(10, _mp({0: 1, 1: EMOJI * 1024})), type="ErrorMsg",
             decoded={"code": 1, "reason": EMOJI * 1024}),
        dict(name="d8_reason_1025_chars", rule="D8: 1 025 code points (2 050 bytes) is over 1 024 chars", topic=TO,
             payload=_p(10, _mp({0: 1, 1: "\u00e9" * 1025})), error="INVALID_FIELD"),
        dict(name="d8_caps_key_64_chars", rule="D8: a capabilities key of 64 code points (256 bytes)", topic=JOIN,
             payload=_join({EMOJI * 64: 1, "v": EMOJI * 256}), type="Join",
             decoded={**JOIN_JSON, "capabilities": {EMOJI * 64: 1, "v": EMOJI * 256}}),
        dict(name="d8_caps_key_65_chars", rule="D8: a capabilities key of 65 chars", topic=JOIN,
             payload=_join({"k" * 65: 1}), error="INVALID_FIELD"),
        dict(name="d8_caps_value_257_chars", rule="D8: a capabilities str value of 257 chars", topic=JOIN,
             payload=_join({"v": "x" * 257}), error="INVALID_FIELD"),
        dict(name="range_have_round_low", rule="ranges: have_round -1 ... 2^32-1", topic=SYNC,
             payload=_p(7, _mp({0: -2})), error="INVALID_FIELD"),
        dict(name="range_have_round_high", rule="ranges: have_round -1 ... 2^32-1", topic=SYNC,
             payload=_p(7, _mp({0: 1 << 32})), error="INVALID_FIELD"),
        dict(name="range_have_round_max", rule="ranges: have_round 2^32-1", topic=SYNC,
             payload=_p(7, _mp({0: (1 << 32) - 1})), type="SyncRequest", decoded={"have_round": (1 << 32) - 1}),
        dict(name="range_msg_id_u64", rule="ranges: msg_id is u64", topic=UP, payload=_update(k1=(1 << 64) - 1),
             type="Update", decoded={**upd, "msg_id": (1 << 64) - 1}),
        dict(name="range_n_samples_zero_decodes", rule="Update n_samples 0 decodes (the coordinator refuses it: "
             "BAD_UPDATE, Acceptance 7)", topic=UP, payload=_update(k3=0), type="Update", decoded={**upd, "n_samples": 0}),
        dict(name="range_grads_empty", rule="ranges: 1 ... 4 096 grads", topic=UP, payload=_update(k2=b""),
             error="INVALID_FIELD"),
        dict(name="range_errmsg_code", rule="ErrorMsg code <= 65 535", topic=TO, payload=_p(10, _mp({0: 1 << 16, 1: ""})),
             error="INVALID_FIELD"),
        dict(name="errmsg_unknown_code", rule="unknown ErrorMsg codes must be tolerated", topic=TO,
             payload=_p(10, _mp({0: 999, 1: "?"})), type="ErrorMsg", decoded={"code": 999, "reason": "?"}),
    ]  # fmt: skip


def error_codes() -> list[dict[str, Any]]:
    """Every protocol refusal code (32-63) as the ErrorMsg a client must decode; codes 1-13 are refusals above."""
    from shared.messages import ErrorCode

    return [
        dict(name=f"errmsg_{c.name.lower()}", rule=f"ErrorMsg carrying {c.name} ({c.value})", topic=TO,
             payload=_p(10, _mp({0: c.value, 1: c.name})), type="ErrorMsg", decoded={"code": c.value, "reason": c.name})
        for c in ErrorCode if c.value >= 32
    ]  # fmt: skip


# ---- protocol 1.3: compact plans (issue 31) ---------------------------------------------------------------

U64_MAX = (1 << 64) - 1
SEED0 = 0x243F6A8885A308D3  # seeds[0] of the sampling vectors' plans


def _key(seed0: int, client: str) -> int:
    """§2 RoundPlan: sha256(le64(seeds[0]) || utf8(client)), first 8 bytes little-endian (written out here,
    not imported, so the vectors do not depend on the code they check)."""
    import hashlib

    return int.from_bytes(hashlib.sha256(seed0.to_bytes(8, "little") + client.encode()).digest()[:8], "little")


def _cplan(sample_max: int | None, steps: dict[str, int], n_seeds: int = 3) -> bytes:
    seeds = struct.pack(f"<{n_seeds}Q", SEED0, *range(1, n_seeds))
    body = {0: "conf-vectors", 1: 4, 2: seeds, 3: 0.01, 4: 0.001, 5: 0, 6: steps, 7: 3, 8: 1.0, 9: FP32, 10: MASK8,
            11: 1, 12: b"\x33" * 32, **({} if sample_max is None else {18: sample_max})}  # fmt: skip
    return _p(2, _mp(body))


def compact_plans() -> list[dict[str, Any]]:
    """Decode vectors of key 18 (sample_max)."""
    return [
        dict(name="compact_plan", rule="1.3: a compact plan: sample_max (key 18), steps holds only the exceptions",
             topic=f"{F}/plan", payload=_cplan(1 << 63, {"dev-vp": 1}), type="RoundPlan"),
        dict(name="compact_plan_all", rule="1.3: sample_max 2^64-1 samples every device", topic=f"{F}/plan",
             payload=_cplan(U64_MAX, {}), type="RoundPlan"),
        dict(name="compact_plan_negative", rule="1.3: sample_max is a u64", topic=f"{F}/plan",
             payload=_cplan(-1, {}), error="INVALID_FIELD"),
        dict(name="compact_plan_float", rule="1.3: sample_max is an integer", topic=f"{F}/plan",
             payload=_cplan(None, {}).replace(b"\x8d", b"\x8e", 1) + b"\x12\xcb" + struct.pack(">d", 0.5),
             error="INVALID_FIELD"),
    ]  # fmt: skip


def steps_vectors() -> list[dict[str, Any]]:
    """What each client runs under a plan (runner op "steps"): the hash, the threshold's edges, exceptions."""
    ids = [f"dev-{i:03d}" for i in range(12)]
    keys = sorted((_key(SEED0, c), c) for c in ids)
    mid_key, mid = keys[5]  # sample_max = the 6th smallest key: those 6 are in, the rest out
    out: list[dict[str, Any]] = []

    def add(name: str, rule: str, sample_max: int | None, steps: dict[str, int], client: str, want: int) -> None:
        out.append(dict(name=name, rule=rule, topic=f"{F}/plan", payload=_cplan(sample_max, steps).hex(),
                        client=client, key=_key(SEED0, client), steps=want))  # fmt: skip

    for k, c in keys:
        add(f"rule_{c}", "key <= sample_max: len(seeds) steps, else 0", mid_key, {}, c, 3 if k <= mid_key else 0)
    add("rule_key_equal", "key == sample_max is sampled (<=)", mid_key, {}, mid, 3)
    add("rule_key_minus_one", "sample_max one below the key: not sampled", mid_key - 1, {}, mid, 0)
    add("exception_limited", "a steps entry wins over the rule (MEERKAT-VP: 1 step)", mid_key, {mid: 1}, mid, 1)
    out_id = keys[-1][1]
    add("exception_above_rule", "a steps entry samples a device the rule does not cover", mid_key, {out_id: 2},
        out_id, 2)
    add("all_sampled", "sample_max 2^64-1: every device", U64_MAX, {}, out_id, 3)
    add("none_by_rule", "sample_max 0: only the exceptions (and a key of exactly 0)", 0, {ids[0]: 3}, ids[1], 0)
    add("list_plan_listed", "no sample_max (1.2 list plan): steps names every sampled device", None, {ids[0]: 2},
        ids[0], 2)
    add("list_plan_unlisted", "no sample_max: a device not listed sits the round out", None, {ids[0]: 2}, ids[1], 0)
    add("mixed_case_id", "the id's bytes as they are (case kept, '_', '.', '-')", mid_key, {}, "Dev_9.x-Z",
        3 if _key(SEED0, "Dev_9.x-Z") <= mid_key else 0)
    return out


def write(path: Path = OUT, steps_path: Path = STEPS_OUT) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(x, separators=(",", ":")) + "\n" for x in vectors()))
    steps_path.write_text("".join(json.dumps(x, separators=(",", ":")) + "\n" for x in steps_vectors()))


if __name__ == "__main__":
    write()
