"""Global top-k over per-layer scores, exact and deterministic, and how concentrated g^2 is at the top.

    select_top_k(keys, k)            -> {layer: sorted flat indices}          (ties by (layer, index))
    concentration(sq, fraction)      -> top-k mean g^2 vs the next tier / the f..10f band
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from shared import prng

BAND_FACTOR = 10  # the paper compares the top 0.1% with the 0.1%..1% band: f .. 10 f


class MaskBuildError(ValueError):
    """Bad calibration input, model or arguments for the mask builder; the message names the culprit."""



def float_keys(scores: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Order-preserving int32 keys of non-negative finite float32 scores: their IEEE bit patterns.

    The keys are views of fp32 scores (no copy: a 1B-weight model's scores are 4 GiB already); only a
    layer holding -0.0 (sign bit set) is copied once to turn it into +0.0.
    """
    keys = {}
    for name, s in scores.items():
        s32 = s.detach().float().flatten()
        if not bool(torch.isfinite(s32).all()):
            raise MaskBuildError(f"layer {name}: score has inf/NaN")
        if bool((s32 < 0).any()):
            raise MaskBuildError(f"layer {name}: scores must be >= 0")
        k = s32.view(torch.int32)
        if bool((k < 0).any()):  # -0.0
            k = (s32 + 0.0).view(torch.int32)
        keys[name] = k
    return keys


def random_keys(shapes: Mapping[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    """Uniform int64 keys from `shared.prng`: key of flat position j of the concatenation = u_j >> 1."""
    keys: dict[str, torch.Tensor] = {}
    offset = 0
    for name in sorted(shapes):
        n = math.prod(shapes[name])
        u = prng.raw_u64(seed, n, offset=offset) >> 1  # numpy uint64 -> fits int64
        keys[name] = torch.from_numpy(u.astype("int64"))
        offset += n
    return keys


RADIX_BITS = 16


def _kth_largest_key(keys: Mapping[str, torch.Tensor], k: int) -> int:
    """The k-th largest key over all layers: exact radix select, 16 bits at a time from the top.

    Keys are non-negative integers (float bit patterns or prng draws). Each pass counts the next 16
    bits of the keys that share the prefix found so far (one bincount per layer), then keeps the bucket
    where the count from the top reaches k: 2 passes over int32 keys, 4 over int64 (a bisection on
    the value took 31 / 63 passes: minutes at 1B weights). Memory: one layer's temporaries.
    """
    if any(t.numel() and int(t.min()) < 0 for t in keys.values()):
        raise MaskBuildError("keys must be non-negative")
    width = max(t.element_size() * 8 for t in keys.values())
    prefix, remaining, shift = 0, k, width
    while shift > 0:
        shift -= RADIX_BITS
        counts = torch.zeros(1 << RADIX_BITS, dtype=torch.int64)
        for t in keys.values():
            flat = t.flatten()
            if shift + RADIX_BITS < width:  # only keys that share the prefix found so far
                flat = flat[(flat >> (shift + RADIX_BITS)) == prefix]
            if flat.numel():
                digits = ((flat >> shift) & ((1 << RADIX_BITS) - 1)).long()
                counts += torch.bincount(digits, minlength=1 << RADIX_BITS)
        from_top = counts.flip(0).cumsum(0)  # keys in buckets >= b, b from the top
        pos = int(torch.searchsorted(from_top, torch.tensor(remaining)))
        remaining -= int(from_top[pos - 1]) if pos > 0 else 0
        prefix = (prefix << RADIX_BITS) | ((1 << RADIX_BITS) - 1 - pos)
    return prefix


def select_top_k(keys: Mapping[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """Exactly k positions with the largest keys, as sorted int64 flat indices per layer.

    Ties at the threshold go to the lowest (layer name, flat index) first, so the result is a pure
    function of the keys. Layers with no selected position are left out.
    """
    total = sum(t.numel() for t in keys.values())
    if not 1 <= k <= total:
        raise MaskBuildError(f"k must be in [1, {total}], got {k}")
    thr = _kth_largest_key(keys, k)
    ties_left = k - sum(int((t > thr).sum()) for t in keys.values())
    out: dict[str, torch.Tensor] = {}
    for name in sorted(keys):
        t = keys[name].flatten()
        above = torch.nonzero(t > thr).flatten()
        ties = torch.nonzero(t == thr).flatten()[: max(ties_left, 0)]
        ties_left -= ties.numel()
        idx = torch.sort(torch.cat([above, ties])).values.to(torch.int64)
        if idx.numel():
            out[name] = idx
    return out


def top_values(scores: Mapping[str, torch.Tensor], m: int) -> torch.Tensor:
    """The m largest scores over all layers, float64, sorted descending."""
    keys = float_keys(scores)
    thr = _kth_largest_key(keys, m)
    parts = [s.detach().flatten()[keys[n] > thr].double() for n, s in scores.items()]
    above = torch.cat(parts)
    thr_value = torch.tensor([thr], dtype=torch.int32).view(torch.float32).double()
    vals = torch.cat([above, thr_value.expand(m - above.numel())])
    return torch.sort(vals, descending=True).values


def k_for(fraction: float, total: int) -> int:
    """Number of masked weights for a fraction of `total` (rounded, at least 1)."""
    if not (0.0 < fraction <= 1.0) or math.isnan(fraction):
        raise MaskBuildError(f"fraction must be in (0, 1], got {fraction}")
    return max(1, min(total, round(fraction * total)))


def concentration(sq: Mapping[str, torch.Tensor], fraction: float) -> dict[str, Any]:
    """Mean g^2 of the top fraction vs the next tier of equal size and vs the f..10f band.

    The band is clipped to the number of weights; a ratio whose comparison tier is empty or all zero
    is None (JSON has no infinity).
    """
    total = sum(t.numel() for t in sq.values())
    k = k_for(fraction, total)
    m = min(total, BAND_FACTOR * k)
    vals = top_values(sq, m)
    overall = sum(float(t.double().sum()) for t in sq.values()) / total
    top = float(vals[:k].mean())
    nxt = vals[k : 2 * k]
    band = vals[k:m]

    def ratio(tier: torch.Tensor) -> float | None:
        if tier.numel() == 0:
            return None
        mean = float(tier.mean())
        return top / mean if mean > 0 else None

    return {
        "fraction": fraction,
        "k": k,
        "n_weights": total,
        "top_mean_sq": top,
        "next_tier_mean_sq": float(nxt.mean()) if nxt.numel() else None,
        "ratio_next_tier": ratio(nxt),
        "band": [fraction, fraction * m / k],
        "band_mean_sq": float(band.mean()) if band.numel() else None,
        "ratio_band": ratio(band),
        "overall_mean_sq": overall,
        "top_mass_share": float(vals[:k].sum()) / (overall * total) if overall > 0 else None,
    }


def mask_sq_stats(indices: Mapping[str, torch.Tensor], sq: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Mean g^2 at a mask's positions and the share of all g^2 mass the mask holds."""
    missing = sorted(set(indices) - set(sq))
    if missing:
        raise MaskBuildError(f"mask layers not in the model: {', '.join(missing[:5])}")
    at = sum(float(sq[n].flatten()[idx].double().sum()) for n, idx in indices.items())
    nnz = sum(idx.numel() for idx in indices.values())
    mass = sum(float(t.double().sum()) for t in sq.values())
    return {"mask_mean_sq": at / max(nnz, 1), "mask_mass_share": at / mass if mass > 0 else 0.0}
