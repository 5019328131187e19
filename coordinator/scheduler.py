"""Round scheduling decisions as pure functions: seeds, when to close.

Every random choice derives from the master seed through `shared.prng`, so a restarted coordinator (or
an auditor) recomputes the same seeds and the same sample:

    step seeds      derive_seed(master, round, t)                 t = 0..T-1   (docs/ARCHITECTURE.md)
    sampling        coordinator/sampling.py: the eligible ids with the smallest shared.sampling.sample_key
                    (sha256 of the round's seeds[0] and the id, which a device recomputes from the plan)
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass

from shared.prng import derive_seed


def round_seeds(master_seed: int, round: int, steps: int) -> tuple[int, ...]:
    return tuple(derive_seed(master_seed, round, t) for t in range(steps))


@dataclass(frozen=True)
class CloseDecision:
    action: str  # "wait" | "close" | "extend"
    reason: str


def quorum_met(sampled: Collection[str], reported: Collection[str], quorum: float, min_updates: int) -> bool:
    """At least ceil(quorum x sampled) and at least min_updates of the sampled clients reported."""
    return quorum_met_n(len(set(sampled)), len(set(reported) & set(sampled)), quorum, min_updates)


def quorum_met_n(n_sampled: int, got: int, quorum: float, min_updates: int) -> bool:
    """`quorum_met` on counts (the round book keeps them: no per-tick set of the sampled clients)."""
    return n_sampled > 0 and got >= min_updates and got >= math.ceil(quorum * n_sampled - 1e-9)


def close_decision(
    sampled: Collection[str], reported: Collection[str], now: float, deadline: float,
    min_updates: int, extensions: int, max_extensions: int,
    quorum: float = 1.0, grace_s: float = 0.0, quorum_since: float | None = None,
) -> CloseDecision:  # fmt: skip
    """Close when all sampled clients reported, when the quorum was reached `grace_s` ago (`quorum_since`:
    when the caller first saw `quorum_met`; one silent device no longer holds every round to its deadline),
    or at the deadline with >= min_updates; else extend.

    After `max_extensions` extensions a round with at least one update closes with what it has (a
    fleet that shrank below min_updates must still make progress); with none it keeps extending.
    """
    n, got = len(set(sampled)), len(set(reported) & set(sampled))
    return close_decision_n(n, got, now, deadline, min_updates, extensions, max_extensions, quorum, grace_s,
                            quorum_since)  # fmt: skip


def close_decision_n(
    n: int, got: int, now: float, deadline: float, min_updates: int, extensions: int, max_extensions: int,
    quorum: float = 1.0, grace_s: float = 0.0, quorum_since: float | None = None,
) -> CloseDecision:  # fmt: skip
    """`close_decision` on counts: n distinct sampled clients, got of them reported. O(1), so the round
    book can ask on every tick without building sets of a 10,000-client round."""
    if n and got >= n:
        return CloseDecision("close", f"all {got} sampled clients reported")
    if quorum_since is not None and now - quorum_since >= grace_s and quorum_met_n(n, got, quorum, min_updates):
        return CloseDecision("close", f"quorum: {got}/{n} reported, {grace_s:g} s grace over")
    if now < deadline:
        return CloseDecision("wait", f"{got}/{n} reported")
    if got >= min_updates:
        return CloseDecision("close", f"deadline with {got}/{n} updates")
    if extensions >= max_extensions and got > 0:
        return CloseDecision(
            "close", f"deadline after {extensions} extensions with {got} < min_updates {min_updates}"
        )
    return CloseDecision("extend", f"deadline with {got} < min_updates {min_updates}")
