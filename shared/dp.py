"""Differentially private projected gradients: per-example clipping, Gaussian noise, Poisson sampling.

One private SPSA step (edge_client/engine/spsa.py `private_spsa_step`) publishes

    d_i = (l_i(v + eps z) - l_i(v - eps z)) / (2 eps)        each example i of the step's batch
    g   = float32( (sum_i clip(d_i, C) + sigma C xi) / B )     xi ~ N(0, 1), B the EXPECTED batch size

where the batch is a Poisson sample of the device's n examples (each independently with q = B / n) and
clip(d, C) = max(-C, min(C, d)). Adding or removing one example moves the sum by at most C, so this is
the sampled Gaussian mechanism shared/accountant.py accounts for. Dividing by the expected B (not the
drawn size) keeps the batch size itself out of what is published.

The direction z comes from the fleet's PUBLIC seed; only the scalar carries data, so only the scalar is
noised (DP-ZO, Tang et al. 2024; DPZero, Zhang et al. 2024). The noise xi and the Poisson sample come
from a device-local SECRET: `SecretStream` derives, for each (label, path...), a stream key
HMAC-SHA256(secret, label | path) and draws from the project's counter-based stream (shared.prng) under
that key. Nothing public (fleet seeds, client id, round) determines it, and a step recomputed after a
crash (same path) draws the same xi and sample, so its g -- and the resumed Update -- are byte-identical.
Each per-step key is a one-way function of the secret: learning one stream says nothing of the others.
"""

from __future__ import annotations

import hashlib
import hmac
import math
from dataclasses import dataclass

import numpy as np

from shared.prng import MASK64, raw_u64, u64_at

SECRET_BYTES = 32
_TWO_POW_53 = float(1 << 53)


@dataclass(frozen=True)
class DpParams:
    """What one private step needs: clip C, noise multiplier sigma (noise std = sigma C), expected batch B."""

    clip: float
    noise_multiplier: float
    batch_size: int

    def __post_init__(self) -> None:
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise ValueError(f"DpParams.clip: must be a finite float > 0, got {self.clip!r}")
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier >= 0):
            raise ValueError(f"DpParams.noise_multiplier: must be a finite float >= 0, got {self.noise_multiplier!r}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"DpParams.batch_size: must be an int >= 1, got {self.batch_size!r}")


def clip_scalars(diffs: np.ndarray, clip: float) -> np.ndarray:
    """Each per-example projected difference clipped to [-C, C] (float64)."""
    d = np.asarray(diffs, dtype=np.float64)
    if not np.isfinite(d).all():
        raise FloatingPointError("non-finite per-example projected difference")
    return np.clip(d, -clip, clip)


def private_scalar(diffs: np.ndarray, params: DpParams, xi: float) -> float:
    """(sum of clipped diffs + sigma C xi) / B in float64; the caller rounds it to float32 (spsa.to_f32)."""
    clipped = clip_scalars(diffs, params.clip)
    noise = params.noise_multiplier * params.clip * xi
    return (math.fsum(clipped.tolist()) + noise) / params.batch_size


class SecretStream:
    """Randomness only this device can reproduce: stream keys HMAC-SHA256(secret, label | path)."""

    def __init__(self, secret: bytes) -> None:
        if not isinstance(secret, bytes) or len(secret) < 16:
            raise ValueError(f"SecretStream: the secret must be >= 16 bytes, got {type(secret).__name__} "
                             f"of {len(secret) if isinstance(secret, bytes) else '?'}")  # fmt: skip
        self._secret = secret

    def __repr__(self) -> str:
        return "SecretStream(<secret>)"  # never print the key

    def key(self, label: str, *path: int) -> int:
        """u64 stream key of (label, path): one HMAC; the path ints are u64 (negative ints are refused)."""
        if any(isinstance(p, bool) or not 0 <= p <= MASK64 for p in path):
            raise ValueError(f"SecretStream.key: path items must be ints in [0, 2**64), got {path!r}")
        msg = label.encode() + b"|" + b"".join(int(p).to_bytes(8, "little") for p in path)
        return int.from_bytes(hmac.new(self._secret, msg, hashlib.sha256).digest()[:8], "little")

    def gaussian(self, label: str, *path: int) -> float:
        """One N(0, 1) draw (Box-Muller on two 53-bit uniforms of the keyed stream), float64."""
        k = self.key(label, *path)
        u1 = ((u64_at(k, 0) >> 11) + 1) / _TWO_POW_53  # (0, 1]: log never sees 0
        u2 = (u64_at(k, 1) >> 11) / _TWO_POW_53  # [0, 1)
        return math.sqrt(-2.0 * math.log(u1)) * math.cos(2.0 * math.pi * u2)

    def poisson_sample(self, n: int, q: float, label: str, *path: int) -> list[int]:
        """Indices i in [0, n) kept independently with probability q: u_i < q 2^64 on the keyed stream."""
        if not (0.0 < q <= 1.0):
            raise ValueError(f"poisson_sample: q must be in (0, 1], got {q!r}")
        if q == 1.0:
            return list(range(n))
        u = raw_u64(self.key(label, *path), n)
        return [int(i) for i in np.flatnonzero(u < np.uint64(int(q * 2.0**64)))]


def sample_rate(batch_size: int, n: int) -> float:
    """q = B / n (capped at 1): each example's chance to be in a step's Poisson batch."""
    if n < 1 or batch_size < 1:
        raise ValueError(f"sample_rate needs batch_size >= 1 and n >= 1, got {batch_size}, {n}")
    return min(1.0, batch_size / n)


__all__ = ["SECRET_BYTES", "DpParams", "SecretStream", "clip_scalars", "private_scalar", "sample_rate"]
