"""Apply a round result to the flat side-car buffer, bit-identically on every machine.

    acc_0     = 0                                           (float64, n)
    acc_{t+1} = acc_t + float64(scalars[t]) * float64(z_t)  t = 0..T-1 in list order, z_t = directions(seeds[t])
    out       = float32( float64(values) - float64(lr) * acc_T )

Every operation is an elementwise IEEE-754 float64 multiply or add done as its own numpy pass on CPU
(no fused multiply-add, no reduction across elements), so the result does not depend on threads, SIMD
width or the device the caller keeps its buffer on.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from shared.prng import DISTS, Dist, directions

_CHUNK = 1 << 16  # elements per pass: acc + scratch stay in L2 while all T directions are added


def _check_values(values: torch.Tensor) -> None:
    if not isinstance(values, torch.Tensor):
        raise TypeError(f"values must be a torch.Tensor, got {type(values).__name__}")
    if values.dtype != torch.float32 or values.dim() != 1:
        raise ValueError(f"values must be a 1-D float32 tensor, got {values.dtype} {tuple(values.shape)}")


def apply_round(
    values: torch.Tensor, seeds: Sequence[int], scalars: Sequence[float], lr: float, dist: Dist
) -> torch.Tensor:
    """NEW fp32 CPU tensor `values - lr * sum_t scalars[t] * z_t` (float64 accumulation, one cast)."""
    _check_values(values)
    if len(seeds) != len(scalars):
        raise ValueError(f"seeds and scalars differ in length: {len(seeds)} vs {len(scalars)}")
    if dist not in DISTS:
        raise ValueError(f"dist must be one of {DISTS}, got {dist!r}")
    if not math.isfinite(lr):
        raise ValueError(f"lr must be finite, got {lr!r}")
    for t, g in enumerate(scalars):
        if not math.isfinite(g):
            raise ValueError(f"scalars[{t}] is not finite: {g!r}")
    n = int(values.numel())
    base = values.detach().to("cpu").numpy().astype(np.float64)  # copy, float64
    acc = np.empty(min(n, _CHUNK), dtype=np.float64)
    tmp = np.empty_like(acc)
    for start in range(0, n, _CHUNK):  # element-wise math, so chunking (cache-sized) changes no bit
        c = min(_CHUNK, n - start)
        a, w = acc[:c], tmp[:c]
        a.fill(0.0)
        for seed, g in zip(seeds, scalars, strict=True):
            w[...] = directions(int(seed), c, dist, offset=start).numpy()  # exact float32 -> float64
            np.multiply(w, np.float64(g), out=w)
            np.add(a, w, out=a)
        np.multiply(a, np.float64(lr), out=a)
        np.subtract(base[start : start + c], a, out=base[start : start + c])
    return torch.from_numpy(base.astype(np.float32))


def values_checksum(values: torch.Tensor) -> str:
    """sha256 hex of the little-endian float32 bytes of a 1-D fp32 buffer."""
    _check_values(values)
    arr = values.detach().to("cpu").contiguous().numpy()
    return hashlib.sha256(arr.astype("<f4", copy=False).tobytes()).hexdigest()


def fedavg_scalars(
    per_client: Mapping[str, Sequence[float]], weights: Mapping[str, float], T: int
) -> list[float]:
    """Exact FedAvg of the clients' virtual paths as T per-seed scalars.

    G_t = sum_{k: T_k > t} w_k g_{k,t} with w_k = weights[k] / sum_j weights[j] over all reporting
    clients (a client that ran fewer steps contributes 0 to the later seeds: its path stopped there).
    Each sum is math.fsum (correctly rounded, independent of client order). The scalars are not
    re-checked for finiteness: `shared.messages.Update` did that at the wire boundary and
    `apply_round` guards its own input. With late updates the coordinator uses
    `coordinator.aggregate.result_scalars`, which equals this function when nothing is late.
    """
    if isinstance(T, bool) or not isinstance(T, int) or T < 0:
        raise ValueError(f"T must be an int >= 0, got {T!r}")
    if not per_client:
        raise ValueError("per_client is empty: no client reported")
    for k, gs in per_client.items():
        if k not in weights:
            raise ValueError(f"weights has no entry for client {k!r}")
        w = weights[k]
        if not math.isfinite(w) or w <= 0:
            raise ValueError(f"weights[{k!r}] must be finite and > 0, got {w!r}")
        if len(gs) > T:
            raise ValueError(f"client {k!r} reported {len(gs)} scalars, more than T={T}")
    total = math.fsum(weights[k] for k in per_client)
    norm = {k: weights[k] / total for k in per_client}
    return [math.fsum(norm[k] * gs[t] for k, gs in per_client.items() if len(gs) > t) for t in range(T)]


__all__ = ["apply_round", "fedavg_scalars", "values_checksum"]
