"""The JSON form of a decoded message, as the conformance kit writes and compares it (docs/PROTOCOL.md §12).

One JSON object per message body, keyed by the field NAMES of PROTOCOL.md §2 (not the integer keys):
hex32/hex8 -> lowercase hex string; u64[] -> list of JSON integers (exact, up to 2^64-1); f32[]/f64[] ->
list of numbers; f32/f64 -> number (a float32 field shows its float32 value widened to float64, exactly);
dist -> "rademacher" | "gaussian"; bin -> lowercase hex string; Replay.results -> list of RoundResult
objects. An optional field that is absent on the wire is absent here. The client id of Join/Update/
Heartbeat/Status/SyncRequest is NOT part of the body (it comes from the topic) and not in this form.
"""

from __future__ import annotations

from typing import Any

from shared.codec import SCHEMAS
from shared.messages import Message

TYPE_NAMES = {cls.__name__: code for cls, (code, _, _) in SCHEMAS.items()}


def _value(kind: str, v: Any) -> Any:
    if kind == "bin":
        return bytes(v).hex()
    if kind in ("u64s", "f32s", "f64s"):
        return list(v)
    if kind == "map":
        return dict(v)
    if kind == "results":
        return [to_json(r) for r in v]
    return v  # int, f32, f64, bool, str, hex (already a str), dist (already a name)


def to_json(msg: Message) -> dict[str, Any]:
    """{field name: JSON value} of the message body (see module docstring)."""
    _, fields, _ = SCHEMAS[type(msg)]
    out: dict[str, Any] = {}
    for f in fields:
        v = getattr(msg, f.name)
        if v is None and f.optional:
            continue
        out[f.name] = _value(f.kind, v)
    return out


__all__ = ["TYPE_NAMES", "to_json"]
