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


def _plan(n_seeds: int) -> bytes:
    body = {0: "f", 1: 0, 2: struct.pack(f"<{n_seeds}Q", *range(n_seeds)), 3: 0.01, 4: 0.001, 5: 0,
            6: {"dev-a": n_seeds}, 7: -1, 8: 1.0, 9: b"\x00" * 32, 10: b"\x00" * 8, 11: 1, 12: b"\x00" * 32}  # fmt: skip
    raw = msgpack.packb(body, use_bin_type=True)
    return bytes([0xB1, 1, 2]) + zstandard.ZstdCompressor(write_content_size=True).compress(raw)


def vectors() -> list[dict[str, Any]]:
    v: list[dict[str, Any]] = [
        dict(name="empty", rule="shorter than the header", topic=SYNC, payload=b"", error="TRUNCATED"),
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
    for x in v:
        x["payload"] = x["payload"].hex()
    return v


def write(path: Path = OUT) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(x, separators=(",", ":")) + "\n" for x in vectors()))


if __name__ == "__main__":
    write()
