"""Per-seed aggregation rules and late-update folding: N clients' T_k scalars -> the result's scalars, O(N T).

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
- centered (the default): per step, each scalar clipped into median +- center_clip_k x MAD of the step's
           values; with center_discount each client's n_k is scaled by the share of its scalars that were
           inside their bands (its trust); then fedavg (coordinator/centered.py). A round where no scalar
           leaves its band is fedavg bit for bit.

`result_scalars` is THE formula of a round result, late updates included (docs/PROTOCOL.md §5.1): a second
implementation that follows it gets the same float64 bits. The inputs are not re-checked for
finiteness: `shared.messages.Update` checked them at the wire boundary.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import chain
from operator import mul

import numpy as np

from coordinator import centered
from coordinator.records import UpdateRow
from shared.apply import fedavg_scalars
from shared.messages import MAX_SEEDS

RULES = ("fedavg", "clipped", "median", "trimmed", "centered")


@dataclass(frozen=True)
class Group:
    """The updates of one round that go into a result: the round's seeds, each client's scalars and n_samples."""

    seeds: tuple[int, ...]
    grads: Mapping[str, Sequence[float]]
    n_samples: Mapping[str, float]  # the stored weights (ints); `centered` with discount scales them


def _padded(per_client: Mapping[str, Sequence[float]], T: int) -> np.ndarray:
    """(N, T) float64 matrix of the clients' scalars in client-id order, missing steps 0."""
    names = sorted(per_client)
    m = np.zeros((len(names), T), dtype=np.float64)  # (N, T)
    for i, k in enumerate(names):
        gs = per_client[k]
        m[i, : len(gs)] = gs
    return m


def _check(rule: str, per_client: Mapping[str, Sequence[float]], T: int) -> None:
    if rule not in RULES:
        raise ValueError(f"aggregation rule must be one of {RULES}, got {rule!r}")
    if not per_client:
        raise ValueError("no client reported: nothing to aggregate")
    for k, gs in per_client.items():
        if len(gs) > T:
            raise ValueError(f"client {k!r} reported {len(gs)} scalars, more than T={T}")


def clip(gs: Sequence[float], clip_norm: float) -> list[float]:
    """g scaled to L2 norm <= clip_norm: norm = sqrt(fsum(g_t^2)); g_t * (clip_norm / norm) when over."""
    norm = math.sqrt(math.fsum(g * g for g in gs))
    if norm <= clip_norm:
        return list(gs)
    scale = clip_norm / norm
    return [g * scale for g in gs]


def aggregate(
    rule: str,
    per_client: Mapping[str, Sequence[float]],
    n_samples: Mapping[str, float],
    T: int,
    *,
    clip_norm: float = 10.0,
    trim_fraction: float = 0.1,
    center_clip_k: float = 4.0,
    center_discount: bool = False,
) -> list[float]:
    """T scalars G_t from the reporting clients' scalars under `rule` (see module docstring)."""
    _check(rule, per_client, T)
    weights = {k: float(n_samples[k]) for k in per_client}
    if rule == "fedavg":
        return fedavg_scalars(per_client, weights, T)
    if rule == "centered":
        c = centered.clip_round(per_client, T, center_clip_k)
        if not center_discount:
            return fedavg_scalars(c.values, weights, T)
        weights = {k: w * c.trust(k) for k, w in weights.items()}
        kept = {k: gs for k, gs in c.values.items() if weights[k] > 0}  # a 0 weight adds 0 terms: leave it out
        return fedavg_scalars(kept, {k: weights[k] for k in kept}, T)
    if rule == "clipped":
        return fedavg_scalars({k: clip(gs, clip_norm) for k, gs in per_client.items()}, weights, T)
    m = _padded(per_client, T)
    if rule == "median":
        return [float(x) for x in np.median(m, axis=0)] if T else []
    n = m.shape[0]
    cut = int(math.floor(trim_fraction * n))
    if n - 2 * cut <= 0:
        cut = (n - 1) // 2
    s = np.sort(m, axis=0)[cut : n - cut]  # (N - 2 cut, T)
    return [math.fsum(s[:, t].tolist()) / s.shape[0] for t in range(T)]


def _weighted(group: Group, grads: Mapping[str, Sequence[float]], N: float, T: int) -> list[float]:
    """G_t = fsum over the group's clients with T_k > t of (n_k / N) * g_{k,t}, t = 0..T-1.

    The clients that ran all T steps (all of them unless MEERKAT-VP limited some) go column by column
    through zip / map(mul) in C: the same Python float products, and fsum is correctly rounded whatever
    the order of its terms (10,000 updates at a close: ~25 -> ~8 ms)."""
    w = {k: float(group.n_samples[k]) / N for k in grads}
    full = [k for k, gs in grads.items() if len(gs) == T]
    short = [(w[k], gs) for k, gs in grads.items() if len(gs) != T]
    w_full = [w[k] for k in full]
    cols = zip(*(grads[k] for k in full), strict=True) if full else iter([()] * T)  # column t: g_{k,t}, k in full
    return [
        math.fsum(chain(map(mul, w_full, col), (wk * gs[t] for wk, gs in short if len(gs) > t)))
        for t, col in zip(range(T), cols, strict=True)
    ]


def result_scalars(
    rule: str,
    on_time: Group,
    late: Sequence[Group] = (),
    *,
    clip_norm: float = 10.0,
    trim_fraction: float = 0.1,
    center_clip_k: float = 4.0,
    center_discount: bool = False,
) -> tuple[list[int], list[float]]:
    """(seeds, scalars) of a round result: the round's own updates plus late updates of older rounds.

    Contributors j are the on-time clients U and, per late round r (in `late`, ascending round order),
    its late clients L_r. With `clipped` every contributor's vector is clipped first (`clip`). With
    `centered` every on-time scalar is clipped into its step's band and every late scalar to +-B, B = the
    on-time late bound (coordinator/centered.py; none below centered.MIN_CLIENTS on-time contributors);
    with `center_discount` n_j is then float64(n_j) * trust_j, trust_j = the share of j's judged scalars
    that were inside their band (late ones: inside +-B), one division (`centered.Clipped.trust`).
        N    = fsum(n_j over U and every L_r)                   (n_j as float64)
        w_j  = n_j / N                                         (one IEEE division)
        fedavg, clipped, centered:  G_t = fsum_{j in U, T_j > t} w_j * g_{j,t}         t < T
        median, trimmed:  G_t   = (fsum_{j in U} n_j / N) * R_t   R_t = the rule over U alone (unweighted)
        late round r:     G^r_t = fsum_{j in L_r, T_j > t} w_j * g_{j,t}            t < max_{j in L_r} T_j
    Pairs: (s_t, G_t) for t < T, then for each late round r in order (s^r_t, G^r_t). Without late
    updates this is exactly `aggregate(rule, ...)` (the share of U is then exactly 1.0). A late update
    always counts with its FedAvg weight: median and trimmed cannot rank one client's scalars of another
    round against this round's, so they bound only the on-time part (`clipped` and `centered` bound all).
    """
    T = len(on_time.seeds)
    _check(rule, on_time.grads, T)
    for g in late:
        _check("fedavg", g.grads, len(g.seeds))

    bound = centered.late_bound(on_time.grads, center_clip_k) if rule == "centered" and late else None

    def prepared(g: Group) -> Group:
        if rule == "clipped":
            return Group(g.seeds, {k: clip(gs, clip_norm) for k, gs in g.grads.items()}, g.n_samples)
        if rule != "centered" or (g is not on_time and bound is None):
            return g
        c = centered.clip_round(g.grads, T, center_clip_k) if g is on_time else centered.clamp_all(g.grads, bound or 0.0)
        n = {k: float(g.n_samples[k]) * c.trust(k) for k in g.grads} if center_discount else g.n_samples
        return Group(g.seeds, c.values, n)

    ready = [prepared(g) for g in (on_time, *late)]
    N = math.fsum(float(g.n_samples[k]) for g in ready for k in g.grads)
    if rule in ("fedavg", "clipped", "centered"):
        scalars = _weighted(ready[0], ready[0].grads, N, T)
    else:
        share = math.fsum(float(on_time.n_samples[k]) for k in on_time.grads) / N
        R = aggregate(rule, on_time.grads, on_time.n_samples, T, trim_fraction=trim_fraction)
        scalars = [share * r for r in R]
    seeds = list(on_time.seeds)
    for g in ready[1:]:
        used = max(len(gs) for gs in g.grads.values())
        seeds += g.seeds[:used]
        scalars += _weighted(g, g.grads, N, used)
    return seeds, scalars


def late_to_fold(late: Iterable[UpdateRow], T: int) -> list[UpdateRow]:
    """The pending late updates of the oldest rounds first, whole rounds only, while the result stays
    within MAX_SEEDS (seed, scalar) pairs (T: the closing round's); the rest stay pending for the next result."""
    pending = list(late)
    out: list[UpdateRow] = []
    pairs = T
    for r in sorted({u.round for u in pending}):
        group = sorted((u for u in pending if u.round == r), key=lambda u: u.client)
        used = max(len(u.grads) for u in group)
        if pairs + used > MAX_SEEDS:
            break
        pairs += used
        out += group
    return out


def round_groups(
    seeds: tuple[int, ...], ups: Sequence[UpdateRow], late: Sequence[UpdateRow],
    plan_seeds: Mapping[int, tuple[int, ...]],
) -> tuple[Group, list[Group]]:
    """The closing round's group (its on-time updates) and one group per round of the late updates folded
    into its result (`plan_seeds`: round -> that round's seeds), the arguments of `result_scalars`."""
    on_time = Group(seeds, {u.client: u.grads for u in ups}, {u.client: u.n_samples for u in ups})
    groups = [
        Group(plan_seeds[r], {u.client: u.grads for u in late if u.round == r},
              {u.client: u.n_samples for u in late if u.round == r})
        for r in sorted({u.round for u in late})
    ]  # fmt: skip
    return on_time, groups


@dataclass(frozen=True)
class Closing:
    """What a closing round's result is made of: the late updates folded in, the (seed, scalar) pairs,
    whether centred clipping fell back to FedAvg (too few on-time updates to tell an outlier)."""

    late: list[UpdateRow]
    seeds: list[int]
    scalars: list[float]
    small: bool


def close_scalars(
    rule: str, seeds: tuple[int, ...], ups: Sequence[UpdateRow], late_pool: Iterable[UpdateRow] | None,
    plan_seeds: Mapping[int, tuple[int, ...]], *, clip_norm: float, trim_fraction: float, center_clip_k: float,
    center_discount: bool = False,
) -> Closing:
    """The result of a round with on-time updates `ups` (`late_pool`: pending late updates under straggler
    policy "next", None under "drop"): `late_to_fold`, `round_groups`, then THE formula `result_scalars`."""
    late = late_to_fold(late_pool, len(seeds)) if late_pool is not None else []
    on_time, groups = round_groups(seeds, ups, late, plan_seeds)
    small = rule == "centered" and centered.is_small(on_time.grads)
    out_seeds, scalars = result_scalars(rule, on_time, groups, clip_norm=clip_norm, trim_fraction=trim_fraction,
                                        center_clip_k=center_clip_k, center_discount=center_discount)  # fmt: skip
    return Closing(late, list(out_seeds), list(scalars), small)
