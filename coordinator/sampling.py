"""Who a round samples, as pure functions: the plan the round book opens and the plan an extension re-issues.

Every device's sampling key is `shared.sampling.sample_key(seeds[0], id)` (sha256 of the round's first
seed and the id: a device recomputes its own from the plan). The coordinator samples the
`clients_per_round` ELIGIBLE devices (joined, online, not benched, not paused by their policy, privacy
budget left: RoundBook.eligible) with the smallest keys (0 = all of them):

    compact plan (plan_form "compact", 1.3)  sample_max = the largest sampled key (all: 2^64 - 1); the wire
                                             plan carries it and, in `steps`, only the MEERKAT-VP exceptions
    list plan (plan_form "list", 1.2)        `steps` names every sampled device

The round EXPECTS the sampled eligible devices (PlanRow.steps: quorum, misses, "all reported"). Under a
compact plan a device that was not eligible at the open (offline, benched, paused, not yet joined) but
whose key is <= sample_max is in the round too: its update is accepted (RoundBook.extra), it is not
waited for. An extension keeps every sampled device and its T_k and only raises sample_max.
"""

from __future__ import annotations

from collections.abc import Callable, Collection

from coordinator.config import CoordinatorConfig
from coordinator.records import PlanRow
from coordinator.scheduler import round_seeds
from shared.sampling import U64, sample_key

StepsFor = Callable[[str, int], int]  # DriftPolicy.steps_for: T, or 1 for a MEERKAT-VP-limited client


def choose(pool: Collection[str], k: int, seed0: int, compact: bool) -> tuple[list[str], int | None]:
    """(sampled ids sorted, sample_max or None for a list plan): the k eligible ids with the smallest keys
    (ties by id), all of them for k = 0 or k >= len(pool). Compact: every pool id with key <= the k-th key
    (a u64 tie, odds 2^-64 per pair, samples both)."""
    keyed = sorted((sample_key(seed0, c), c) for c in set(pool))
    if k == 0 or k >= len(keyed):
        top = U64 if k == 0 else (keyed[-1][0] if keyed else 0)
        return [c for _, c in sorted(keyed, key=lambda kc: kc[1])], (top if compact else None)
    if not compact:
        return sorted(c for _, c in keyed[:k]), None
    top = keyed[k - 1][0]
    return sorted(c for key, c in keyed if key <= top), top


def open_plan(c: CoordinatorConfig, r: int, eligible: Collection[str], now: float, base_checksum: str,
              steps_for: StepsFor, lr: float | None = None) -> PlanRow:  # fmt: skip
    """The plan of round r over `eligible`: seeds, sampling, T_k (MEERKAT-VP), deadline; `lr` the round
    book's (coordinator/lrctl.py; None: config `lr`, which must then be a number)."""
    if lr is None:
        if isinstance(c.lr, str):
            raise ValueError(f"open_plan: lr = {c.lr!r} needs the controller's lr")
        lr = c.lr
    seeds = round_seeds(c.master_seed, r, c.steps)
    sampled, sample_max = choose(eligible, c.clients_per_round, seeds[0], c.plan_form == "compact")
    return PlanRow(
        round=r, state="open", opened_at=now, deadline=now + c.round_deadline_s, seeds=seeds,
        steps={k: steps_for(k, c.steps) for k in sampled}, lr=lr, eps=c.eps, dist=c.dist,
        batch_size=c.batch_size, base_round=r - 1, base_checksum=base_checksum, extensions=0, sample_max=sample_max,
    )  # fmt: skip


def extend_plan(c: CoordinatorConfig, plan: PlanRow, eligible: Collection[str], n_accepted: int, now: float,
                steps_for: StepsFor) -> tuple[PlanRow, list[str]]:  # fmt: skip
    """The re-issued plan of an extension and the devices it adds. New eligible devices the plan's rule
    already covers (key <= sample_max) are added first; then, with clients_per_round > 0, as many more
    as are still missing to min_updates (the smallest keys above sample_max, which rises to the largest
    of them), with clients_per_round = 0 every new eligible device. Earlier devices and T_k are kept."""
    pool = set(eligible) - set(plan.steps)
    seed0, top = plan.seeds[0], plan.sample_max
    keyed = sorted((sample_key(seed0, k), k) for k in pool)
    covered = [k for key, k in keyed if top is not None and key <= top]
    rest = [(key, k) for key, k in keyed if top is None or key > top]
    want = max(c.min_updates - n_accepted - len(covered), 0) if c.clients_per_round else len(rest)
    more = rest[:want]
    if top is not None and more:
        top = more[-1][0]
    extra = sorted(covered + [k for _, k in more])
    steps = {**plan.steps, **{k: steps_for(k, c.steps) for k in extra}}
    new = PlanRow(**{**plan.__dict__, "steps": steps, "deadline": now + c.round_deadline_s,
                     "extensions": plan.extensions + 1, "sample_max": top})  # fmt: skip
    return new, extra


def wire_steps(p: PlanRow) -> dict[str, int]:
    """The `steps` a plan publishes: every sampled device (list plan) or only the exceptions (compact plan:
    those whose T_k is not len(seeds), i.e. the MEERKAT-VP-limited ones)."""
    if p.sample_max is None:
        return p.steps
    T = len(p.seeds)
    return {k: t for k, t in p.steps.items() if t != T}
