"""What decoding one message type may cost (`Limits`), derived from its schema (`LIMITS`), and the msgpack
hooks that hold a body to them while it is parsed (`BodyShape`: container count and nesting depth).

Decoding costs O(the type's allowed size), never O(what a payload claims): the largest body a legal
message can have, and how many containers, how long and how deep, follow from its fields. The codec
checks them before anything is decompressed (payload), while decompressing (shared.codec.zstd_frame) and
while parsing (msgpack's own length limits, plus the hooks below).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from shared.codec.base import HEADER_LEN, MAX_BODY, MAX_REPLAY_BODY, DecodeError
from shared.codec.schema import SCHEMAS, Field
from shared.messages import ErrorCode, Replay, RoundResult

_HDR = 5  # most bytes of a msgpack str/bin/array/map header (the 32-bit forms)
_SCALAR = 9  # most bytes of a msgpack int or float (receivers accept any width)


@dataclass(frozen=True)
class Limits:
    """What decoding one message type may cost. Every number follows from the type's schema (LIMITS)."""

    max_payload: int  # whole payload, header included, compressed or not
    max_body: int  # msgpack body after decompression: the largest legal body, at most MAX_BODY
    max_str: int  # bytes of any one msgpack str
    max_bin: int  # bytes of any one msgpack bin
    max_array: int  # items of any one msgpack array
    max_map: int  # entries of any one msgpack map
    max_containers: int  # maps + arrays in the whole body, the top-level map included
    max_depth: int  # nesting of containers: 1 = a top-level map of scalars only
    max_window: int  # zstd window (bytes) a frame may ask the decompressor to allocate


MIN_BODY = 1 << 10  # body floor: tiny types keep 1 KiB of slack (1024 objects at most cost nothing)
MIN_STR = 64  # str/bin floor: a short value of the wrong kind still gets INVALID_FIELD naming the field
MIN_MAP = 16  # map floor: a key this version does not know is reported as UNKNOWN_FIELD, not MALFORMED
MIN_WINDOW = 8 << 20  # zstd window floor: what levels <= 19 use when streaming without a declared size


@dataclass(frozen=True)
class _FieldShape:
    wire: int  # most bytes of the value on the wire
    strs: int = 0
    bins: int = 0
    arrays: int = 0
    maps: int = 0
    containers: int = 0
    depth: int = 0


def _field_shape(f: Field) -> _FieldShape:
    """Upper bounds for one legal value of field `f` (any legal encoding, not just the reference one)."""
    if f.kind in ("int", "f64", "f32", "dist"):
        return _FieldShape(_SCALAR)
    if f.kind == "bool":
        return _FieldShape(1)
    if f.kind == "str":
        return _FieldShape(_HDR + f.n, strs=f.n)
    if f.kind in ("bin", "hex"):
        return _FieldShape(_HDR + f.n, bins=f.n)
    if f.kind in ("f32s", "f64s", "u64s"):
        size = 4 if f.kind == "f32s" else 8
        return _FieldShape(_HDR + size * f.n, bins=size * f.n)
    if f.kind == "map":  # str keys -> scalars (or str values where kv[1] says so)
        k, v = f.kv
        entry = _HDR + k + max(_SCALAR, _HDR + v if v else 0)
        return _FieldShape(_HDR + f.n * entry, strs=max(k, v), maps=f.n, containers=1, depth=1)
    if f.kind == "results":
        inner = _derive(SCHEMAS[RoundResult][1], 1 << 62)
        return _FieldShape(
            _HDR + f.n * inner.max_body,
            strs=inner.max_str,
            bins=inner.max_bin,
            arrays=f.n,
            maps=inner.max_map,
            containers=1 + f.n * inner.max_containers,
            depth=1 + inner.max_depth,
        )
    raise AssertionError(f"no shape for field kind {f.kind!r}")


def _derive(fields: tuple[Field, ...], ceiling: int, body_ceiling: int = MAX_BODY) -> Limits:
    """Limits of a type from its fields. `ceiling` caps the payload; `body_ceiling` the body where the
    schema allows more than is sane to decode at once (Replay: 1024 results of 65 536 pairs each)."""
    shapes = [_field_shape(f) for f in fields]
    body = max(MIN_BODY, _HDR + sum(_SCALAR + s.wire for s in shapes))  # keys counted at any int width
    body = min(body, body_ceiling)
    window = MIN_WINDOW
    while window < body:
        window <<= 1
    return Limits(
        max_payload=min(ceiling, HEADER_LEN + body),  # senders compress only when that is smaller
        max_body=body,
        max_str=max([MIN_STR] + [s.strs for s in shapes]),
        max_bin=max([MIN_STR] + [s.bins for s in shapes]),
        max_array=max([0] + [s.arrays for s in shapes]),
        max_map=max([MIN_MAP, len(fields)] + [s.maps for s in shapes]),
        max_containers=1 + sum(s.containers for s in shapes),
        max_depth=1 + max(s.depth for s in shapes),
        max_window=window,
    )


_BODY_CEILING: dict[type, int] = {Replay: MAX_REPLAY_BODY}
LIMITS: dict[type, Limits] = {
    cls: _derive(fields, ceiling, _BODY_CEILING.get(cls, MAX_BODY))
    for cls, (_, fields, ceiling) in SCHEMAS.items()
}


class BodyShape:
    """msgpack object_pairs_hook/list_hook: counts containers and their nesting depth while the body is built.

    msgpack-python limits each container's length but not how many there are or how deep they nest (its
    C stack stops at 1024 levels); the hooks run once per finished container, children before parents,
    so a parent's depth is 1 + its deepest child's. Raising here stops the parse at once.
    """

    def __init__(self, name: str, lim: Limits) -> None:
        self.name = name
        self.lim = lim
        self.depth: dict[int, int] = {}  # id(container) -> depth; every container stays alive in its parent

    def on_pairs(self, pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
        """A map from its (key, value) pairs: a repeated key is MALFORMED at any depth (msgpack itself
        would keep the last one, so two receivers could disagree on what a message says)."""
        obj = dict(pairs)
        if len(obj) != len(pairs):
            raise DecodeError(ErrorCode.MALFORMED, f"{self.name}: a map repeats a key")
        self._check(obj, obj.values())
        return obj

    def on_array(self, obj: list[Any]) -> list[Any]:
        self._check(obj, obj)
        return obj

    def _check(self, obj: object, children: Any) -> None:
        if len(self.depth) >= self.lim.max_containers:
            raise DecodeError(
                ErrorCode.MALFORMED,
                f"{self.name}: more than {self.lim.max_containers} maps/arrays in the body",
            )
        d = 1
        if self.depth:  # the first container to finish holds none; skip scanning its (maybe many) values
            for v in children:
                if type(v) is dict or type(v) is list:
                    d = max(d, self.depth.get(id(v), 1) + 1)
        if d > self.lim.max_depth:
            raise DecodeError(
                ErrorCode.MALFORMED, f"{self.name}: containers nest deeper than {self.lim.max_depth}"
            )
        self.depth[id(obj)] = d
