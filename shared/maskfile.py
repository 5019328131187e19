"""The sparse mask file: which weights of the base model the fleet fine-tunes.

A mask is chosen once (`meerkat mask build`) and never changes during a run. On disk it is one
safetensors file (layout in docs/PROTOCOL.md, "Mask file"):

    idx.{layer}   int64 (k_l,)   sorted unique flat indices into the layer's (rows, cols) weight
    grad.{layer}  float32 (k_l,) optional mean pre-training gradient at those indices (GradIP)
    metadata      meerkat.format_version, method, fraction, calibration, fingerprint, created, shapes

Everybody flattens the masked values the same way: layers in sorted name order, each layer's indices in
ascending order; `Mask.offsets()` gives each layer's (start, stop) in that flat buffer.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save

from shared.fsio import SHARED_MODE, atomic_write

FORMAT_VERSION = 1
_IDX = "idx."
_GRAD = "grad."
_META_KEYS = ("format_version", "method", "fraction", "calibration", "fingerprint", "created", "shapes")


class MaskError(ValueError):
    """A mask is malformed or does not belong to this model; the message names the layer or key."""


@dataclass(frozen=True)
class MaskMeta:
    """Where a mask came from. `fingerprint` is the base model's `fingerprint_model_dir` (sha256 hex)."""

    format_version: int
    method: str  # e.g. "gradsq-topk": top fraction by mean squared pre-training gradient
    fraction: float  # nnz / total weights of the masked layers
    calibration: str  # free text: corpus, number of sequences, sequence length
    fingerprint: str
    created: str = ""  # ISO 8601 UTC, informational

    def __post_init__(self) -> None:
        if not isinstance(self.format_version, int) or self.format_version != FORMAT_VERSION:
            raise MaskError(f"meta.format_version: expected {FORMAT_VERSION}, got {self.format_version!r}")
        for name in ("method", "calibration", "fingerprint", "created"):
            if not isinstance(getattr(self, name), str):
                raise MaskError(f"meta.{name}: expected str, got {type(getattr(self, name)).__name__}")
        frac = self.fraction
        if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not 0.0 < float(frac) <= 1.0:
            raise MaskError(f"meta.fraction: expected a float in (0, 1], got {frac!r}")
        if not _is_hex(self.fingerprint, 64):
            raise MaskError(
                f"meta.fingerprint: expected 64 lowercase hex chars (sha256), got {self.fingerprint!r}"
            )


@dataclass(frozen=True, eq=False)
class Mask:
    """Per-layer sorted unique int64 flat indices (+ optional fp32 mean pre-training gradient there)."""

    layers: dict[str, torch.Tensor]
    shapes: dict[str, tuple[int, int]]
    grad: dict[str, torch.Tensor] | None
    meta: MaskMeta
    _offsets: dict[str, tuple[int, int]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _validate(self.layers, self.shapes, self.grad)
        object.__setattr__(self, "_offsets", flat_offsets(self.layers))

    @property
    def layer_names(self) -> list[str]:
        """Layer names in flat-buffer order (sorted)."""
        return sorted(self.layers)

    @property
    def nnz(self) -> int:
        """Total number of masked values = length of the flat side-car buffer."""
        return sum(int(t.numel()) for t in self.layers.values())

    def offsets(self) -> dict[str, tuple[int, int]]:
        """layer -> (start, stop) in the flat buffer; layers in sorted name order."""
        return dict(self._offsets)

    @property
    def mask_id(self) -> str:
        """Short stable id: sha256 over (name, NUL, u64 count, int64 LE indices) per sorted layer, hex[:16]."""
        h = hashlib.sha256()
        for name in self.layer_names:
            idx = self.layers[name]
            h.update(name.encode("utf-8") + b"\0")
            h.update(int(idx.numel()).to_bytes(8, "little"))
            h.update(_le_bytes(idx))
        return h.hexdigest()[:16]

    def flat_grad(self) -> torch.Tensor | None:
        """The mean pre-training gradient as one flat fp32 (nnz,) buffer in flat order, or None."""
        if self.grad is None:
            return None
        if not self.layers:
            return torch.zeros(0, dtype=torch.float32)
        return torch.cat([self.grad[name] for name in self.layer_names])


def flat_offsets(layers: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, int]]:
    """layer -> (start, stop) of its indices in the flat buffer: layers in sorted name order."""
    offsets: dict[str, tuple[int, int]] = {}
    start = 0
    for name in sorted(layers):
        stop = start + int(layers[name].numel())
        offsets[name] = (start, stop)
        start = stop
    return offsets


def _is_hex(s: object, n: int) -> bool:
    return isinstance(s, str) and len(s) == n and all(c in "0123456789abcdef" for c in s)


def _le_bytes(t: torch.Tensor) -> bytes:
    arr = t.detach().cpu().contiguous().numpy()
    return arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()


def _validate(
    layers: dict[str, torch.Tensor], shapes: dict[str, tuple[int, int]], grad: dict[str, torch.Tensor] | None
) -> None:
    if not isinstance(layers, dict) or not isinstance(shapes, dict):
        raise MaskError("layers and shapes must be dicts keyed by layer name")
    if set(layers) != set(shapes):
        missing = sorted(set(layers) ^ set(shapes))
        raise MaskError(f"layers and shapes disagree on layer names: {missing}")
    if grad is not None and set(grad) != set(layers):
        raise MaskError(
            f"grad must cover exactly the masked layers; differs on {sorted(set(grad) ^ set(layers))}"
        )
    for name in sorted(layers):
        if not isinstance(name, str) or not name or "\0" in name:
            raise MaskError(f"layer name {name!r}: expected a non-empty str")
        shape = shapes[name]
        if (
            not isinstance(shape, tuple)
            or len(shape) != 2
            or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)
        ):
            raise MaskError(f"layer {name!r}: shape must be (rows, cols) of positive ints, got {shape!r}")
        idx = layers[name]
        if not isinstance(idx, torch.Tensor) or idx.dtype != torch.int64 or idx.dim() != 1:
            what = f"{idx.dtype} {tuple(idx.shape)}" if isinstance(idx, torch.Tensor) else type(idx).__name__
            raise MaskError(f"layer {name!r}: indices must be a 1-D int64 tensor, got {what}")
        size = shape[0] * shape[1]
        if idx.numel() > 0:
            lo, hi = int(idx.min()), int(idx.max())
            if lo < 0 or hi >= size:
                raise MaskError(f"layer {name!r}: index out of range [0, {size}): min {lo}, max {hi}")
            diff = idx[1:] - idx[:-1]
            if bool((diff < 0).any()):
                pos = int(torch.nonzero(diff < 0)[0, 0])
                raise MaskError(f"layer {name!r}: indices not sorted at position {pos + 1}")
            if bool((diff == 0).any()):
                pos = int(torch.nonzero(diff == 0)[0, 0])
                raise MaskError(f"layer {name!r}: duplicate index {int(idx[pos])} at position {pos + 1}")
        if grad is not None:
            g = grad[name]
            if (
                not isinstance(g, torch.Tensor)
                or g.dtype != torch.float32
                or tuple(g.shape) != tuple(idx.shape)
            ):
                what = f"{g.dtype} {tuple(g.shape)}" if isinstance(g, torch.Tensor) else type(g).__name__
                raise MaskError(
                    f"layer {name!r}: grad must be float32 of shape {tuple(idx.shape)}, got {what}"
                )
            if not bool(torch.isfinite(g).all()):
                raise MaskError(f"layer {name!r}: grad has NaN or inf")


def save_mask(mask: Mask, path: str | Path) -> None:
    """Write `mask` as a safetensors file (see module docstring), atomically: a crash leaves the old file or the new."""
    tensors: dict[str, torch.Tensor] = {}
    for name in mask.layer_names:
        tensors[_IDX + name] = mask.layers[name].detach().cpu().contiguous()
        if mask.grad is not None:
            tensors[_GRAD + name] = mask.grad[name].detach().cpu().contiguous()
    m = mask.meta
    metadata = {
        "meerkat.format_version": str(m.format_version),
        "meerkat.method": m.method,
        "meerkat.fraction": repr(float(m.fraction)),
        "meerkat.calibration": m.calibration,
        "meerkat.fingerprint": m.fingerprint,
        "meerkat.created": m.created,
        "meerkat.shapes": json.dumps({k: list(mask.shapes[k]) for k in mask.layer_names}, sort_keys=True),
    }
    atomic_write(Path(path), save(tensors, metadata=metadata), mode=SHARED_MODE)  # devices download masks


def load_mask(path: str | Path, expected_fingerprint: str | None = None) -> Mask:
    """Read and validate a mask file; raises MaskError naming the layer/key that is wrong."""
    p = Path(path)
    if not p.is_file():
        raise MaskError(f"mask file not found: {p}")
    try:
        with safe_open(str(p), framework="pt") as f:
            raw_meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise MaskError(f"{p}: not a readable safetensors file: {exc}") from exc
    meta = _parse_meta(raw_meta, p)
    shapes_raw = _json_meta(raw_meta, "shapes", p)
    if not isinstance(shapes_raw, dict):
        raise MaskError(f"{p}: metadata meerkat.shapes must be a JSON object")
    shapes: dict[str, tuple[int, int]] = {}
    for name, shp in shapes_raw.items():
        if not isinstance(shp, list) or len(shp) != 2 or not all(isinstance(d, int) for d in shp):
            raise MaskError(f"{p}: layer {name!r}: shape in metadata must be [rows, cols], got {shp!r}")
        shapes[name] = (int(shp[0]), int(shp[1]))
    layers: dict[str, torch.Tensor] = {}
    grads: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        if key.startswith(_IDX):
            layers[key[len(_IDX) :]] = t
        elif key.startswith(_GRAD):
            grads[key[len(_GRAD) :]] = t
        else:
            raise MaskError(f"{p}: unexpected tensor key {key!r} (expected idx.<layer> or grad.<layer>)")
    try:
        mask = Mask(layers=layers, shapes=shapes, grad=grads or None, meta=meta)
    except MaskError as exc:
        raise MaskError(f"{p}: {exc}") from exc
    if expected_fingerprint is not None and meta.fingerprint != expected_fingerprint:
        raise MaskError(
            f"{p}: meerkat.fingerprint {meta.fingerprint[:16]}... does not match the base model "
            f"{expected_fingerprint[:16]}...: this mask was built for another model"
        )
    return mask


def _json_meta(raw: dict[str, str], key: str, p: Path) -> object:
    full = "meerkat." + key
    if full not in raw:
        raise MaskError(f"{p}: metadata key {full!r} missing (not a meerkat mask file?)")
    try:
        return json.loads(raw[full])
    except json.JSONDecodeError as exc:
        raise MaskError(f"{p}: metadata {full!r} is not valid JSON: {exc}") from exc


def _parse_meta(raw: dict[str, str], p: Path) -> MaskMeta:
    for key in _META_KEYS:
        if "meerkat." + key not in raw:
            raise MaskError(f"{p}: metadata key 'meerkat.{key}' missing (not a meerkat mask file?)")
    try:
        version = int(raw["meerkat.format_version"])
    except ValueError as exc:
        raise MaskError(f"{p}: metadata 'meerkat.format_version' is not an int") from exc
    try:
        fraction = float(raw["meerkat.fraction"])
    except ValueError as exc:
        raise MaskError(f"{p}: metadata 'meerkat.fraction' is not a float") from exc
    if not math.isfinite(fraction):
        raise MaskError(f"{p}: metadata 'meerkat.fraction' must be finite")
    try:
        return MaskMeta(
            format_version=version,
            method=raw["meerkat.method"],
            fraction=fraction,
            calibration=raw["meerkat.calibration"],
            fingerprint=raw["meerkat.fingerprint"],
            created=raw["meerkat.created"],
        )
    except MaskError as exc:
        raise MaskError(f"{p}: {exc}") from exc


__all__ = ["FORMAT_VERSION", "Mask", "MaskError", "MaskMeta", "flat_offsets", "load_mask", "save_mask"]
