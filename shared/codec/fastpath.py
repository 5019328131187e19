"""One-pass decoders for the coordinator's commonest messages, Heartbeat and Update: the wire readers' and
the constructor's checks in a single pass over the body map (a 10,000-device fleet sends ~667 heartbeats
a second, and 10,000 Updates per round in a burst).

`from_map` (shared/codec/schema.py) checks the map's keys first (MALFORMED, UNKNOWN_FIELD, MISSING_FIELD),
then calls `heartbeat(m, client)` / `update(m, client)`. Each returns the message the general path builds
(a reader per field, then `Heartbeat.__post_init__` / `Update.from_wire`) when every value is of the plain
kind and in range, and None for anything else: an int where a float goes, a value out of range or not
finite, or a field this path leaves to the general one (the Heartbeat's evaluation, DP and pause_reason
fields, rare and cross-checked). None costs nothing but the general path, which then decides and names
the error, so the outcome never depends on the path. tests/shared/test_codec_fastpath.py compares the two
on random and edge-case maps.
"""

from __future__ import annotations

import math
from array import array
from struct import unpack
from typing import Any

from shared.fields import F32_MAX, MAX_STEPS, U32, U64, _to_f32
from shared.messages import Heartbeat, Update
from shared.topics import ID_RE

# key -> (name, kind, lo, hi) of the fields this path decides; kinds: f64 / f32 (a Python float on the
# wire, finite, lo <= v <= hi; f32 rounded to float32 as _f32 does) / int / bool. Ranges as in
# Heartbeat.__post_init__.
_FIELDS: dict[int, tuple[str, str, float, float]] = {
    0: ("ts", "f64", 0.0, math.inf),
    1: ("cpu_pct", "f32", 0.0, 1e5),
    2: ("rss_bytes", "int", 0, U64),
    3: ("gpu_mem_bytes", "int", 0, U64),
    4: ("temp_c", "f32", -300.0, 1000.0),
    5: ("power_w", "f32", 0.0, 1e6),
    6: ("step_time_s", "f64", 0.0, math.inf),
    7: ("peak_mem_bytes", "int", 0, U64),
    8: ("round", "int", -1, U32),
    15: ("dp_exhausted", "bool", 0, 0),
    16: ("available", "bool", 0, 0),
    18: ("trained_share", "f32", 0.0, 1.0),
    19: ("peak_rss_bytes", "int", 0, U64),
}
_KEYS = frozenset(_FIELDS)
_NONE: dict[str, Any] = {f: None for f in Heartbeat.__dataclass_fields__}  # every field; the absent optional ones stay None
_isfinite = math.isfinite


def heartbeat(m: dict[Any, Any], client: str) -> Heartbeat | None:
    """The Heartbeat of body map `m` (keys already checked: ints, known, the required ones there), or None:
    take the general path (module docstring)."""
    if not _KEYS.issuperset(m) or (client and not ID_RE.match(client)):
        return None
    out = dict(_NONE)
    f32_names: list[str] = []
    f32_values: list[float] = []
    for key, v in m.items():
        name, kind, lo, hi = _FIELDS[key]
        cls = v.__class__
        if kind == "int":
            if cls is not int or not lo <= v <= hi:
                return None
        elif kind == "bool":
            if cls is not bool:
                return None
        elif cls is not float or not lo <= v <= hi or not _isfinite(v):
            return None
        elif kind == "f32":
            f32_names.append(name)
            f32_values.append(v)
            continue
        out[name] = v
    if f32_values:
        out.update(zip(f32_names, array("f", f32_values), strict=True))  # rounded as struct "<f" rounds
    out["client"] = client
    h = object.__new__(Heartbeat)
    h.__dict__.update(out)
    return h


def update(m: dict[Any, Any], client: str) -> Update | None:
    """The Update of body map `m` (its six keys, all required, already checked), or None: take the general
    path. The checks of the readers (ints are ints, grads a bin of float32 values, loss a number) and of
    `Update.from_wire` (ranges, 1..MAX_STEPS finite grads, loss finite within float32), in that order."""
    rnd, msg_id, raw, n, tag, loss = m[0], m[1], m[2], m[3], m[4], m[5]
    if (
        rnd.__class__ is int and 0 <= rnd <= U32 and msg_id.__class__ is int and 0 <= msg_id <= U64
        and n.__class__ is int and 0 <= n <= U32 and tag.__class__ is int and 0 <= tag <= U32
        and raw.__class__ is bytes and not len(raw) % 4 and 4 <= len(raw) <= 4 * MAX_STEPS
        and loss.__class__ is float and _isfinite(loss) and abs(loss) <= F32_MAX
        and (not client or ID_RE.match(client))
    ):  # fmt: skip
        grads = unpack(f"<{len(raw) // 4}f", raw)
        if _isfinite(sum(grads)):  # the sum of float32 values is finite iff each is
            u = object.__new__(Update)
            u.__dict__.update(round=rnd, msg_id=msg_id, grads=grads, n_samples=n, fp_tag=tag, loss=_to_f32(loss),
                              client=client)  # fmt: skip
            return u
    return None


__all__ = ["heartbeat", "update"]
