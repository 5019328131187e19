"""Per-seed aggregation rules: N clients' T_k scalars -> T scalars G_t, in O(N T).

Every client of a round shares its seeds s_0..s_{T-1}, so client k's virtual path is
    v_k = v - lr * sum_{t < T_k} g_{k,t} z_t
and any average of the paths is again `v - lr * sum_t G_t z_t`: aggregation never touches a vector.
A client that ran fewer steps (T_k < T) has coordinate 0 along the later seeds (its path stopped).

- fedavg:  G_t = sum_k w_k g_{k,t}, w_k = n_k / sum_j n_j          (exact FedAvg of the paths)
- clipped: each client's scalar vector g_k is first scaled to L2 norm <= clip_norm, then fedavg. With
           Rademacher z the path displacement has norm lr * sqrt(nnz) * ||g_k|| (z_t nearly orthogonal),
           so this bounds every client's influence on the weights.
- median:  G_t = median_k g_{k,t} (missing steps count as 0), unweighted: robust to < N/2 bad clients.
- trimmed: per step, drop floor(trim_fraction * N) lowest and highest values, mean of the rest (unweighted).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from shared.apply import fedavg_scalars

RULES = ("fedavg", "clipped", "median", "trimmed")


def _padded(per_client: Mapping[str, Sequence[float]], T: int) -> np.ndarray:
    """(N, T) float64 matrix of the clients' scalars in client-id order, missing steps 0."""
    names = sorted(per_client)
    m = np.zeros((len(names), T), dtype=np.float64)  # (N, T)
    for i, k in enumerate(names):
        gs = per_client[k]
        m[i, : len(gs)] = gs
    return m


def aggregate(
    rule: str,
    per_client: Mapping[str, Sequence[float]],
    n_samples: Mapping[str, int],
    T: int,
    *,
    clip_norm: float = 10.0,
    trim_fraction: float = 0.1,
) -> list[float]:
    """T scalars G_t from the reporting clients' scalars under `rule` (see module docstring)."""
    if rule not in RULES:
        raise ValueError(f"aggregation rule must be one of {RULES}, got {rule!r}")
    if not per_client:
        raise ValueError("no client reported: nothing to aggregate")
    for k, gs in per_client.items():
        if len(gs) > T:
            raise ValueError(f"client {k!r} reported {len(gs)} scalars, more than T={T}")
        if not all(math.isfinite(g) for g in gs):
            raise ValueError(f"client {k!r} reported a non-finite scalar")
    weights = {k: float(n_samples[k]) for k in per_client}
    if rule == "fedavg":
        return fedavg_scalars(per_client, weights, T)
    if rule == "clipped":
        clipped: dict[str, list[float]] = {}
        for k, gs in per_client.items():
            norm = math.sqrt(math.fsum(g * g for g in gs))
            scale = 1.0 if norm <= clip_norm else clip_norm / norm
            clipped[k] = [g * scale for g in gs]
        return fedavg_scalars(clipped, weights, T)
    m = _padded(per_client, T)
    if rule == "median":
        return [float(x) for x in np.median(m, axis=0)] if T else []
    n = m.shape[0]
    cut = int(math.floor(trim_fraction * n))
    if n - 2 * cut <= 0:
        cut = (n - 1) // 2
    s = np.sort(m, axis=0)[cut : n - cut]  # (N - 2 cut, T)
    return [math.fsum(s[:, t].tolist()) / s.shape[0] for t in range(T)]


def late_pairs(
    late: Mapping[str, Sequence[float]],
    n_samples: Mapping[str, int],
    seeds: Sequence[int],
    share: float,
) -> tuple[list[int], list[float]]:
    """Seeds and scalars that fold late updates of one closed round into a later result.

    The late clients are FedAvg-ed among themselves on their round's `seeds`, then scaled by `share`
    (their sample share among everyone the later result uses). Returns ([], []) when nothing is late.
    """
    if not late:
        return [], []
    T = len(seeds)
    g = fedavg_scalars(late, {k: float(n_samples[k]) for k in late}, T)
    used = max(len(v) for v in late.values())
    return list(seeds[:used]), [x * share for x in g[:used]]
