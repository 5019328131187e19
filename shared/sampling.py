"""Who runs a round, and how many steps (docs/PROTOCOL.md §2 RoundPlan, 1.3 "compact plan").

A 1.3 coordinator publishes a compact plan: `steps` holds only the exceptions (MEERKAT-VP-limited
devices) and `sample_max` says who else is sampled, so the plan's size does not grow with the fleet:

    key(c)    = the first 8 bytes, little-endian, of sha256(le64(seeds[0]) || utf8(c)), as a u64
    T(c)      = steps[c]            when c is a key of steps
              = len(seeds)          when sample_max is present and key(c) <= sample_max
              = 0 (not sampled)     otherwise

A plan without `sample_max` (the 1.2 form, a coordinator with plan_form = "list") lists every sampled
client in `steps`. Both sides use `plan_steps` (the device: train or sit out; the coordinator: accept
or NOT_IN_ROUND), so they cannot disagree.
"""

from __future__ import annotations

import hashlib
from typing import Protocol

U64 = (1 << 64) - 1


class _Plan(Protocol):  # RoundPlan (the wire) and coordinator.records.PlanRow (the book) both have these
    @property
    def seeds(self) -> tuple[int, ...]: ...
    @property
    def steps(self) -> dict[str, int]: ...
    @property
    def sample_max(self) -> int | None: ...


def sample_key(seed0: int, client: str) -> int:
    """key(c): the u64 a device compares with `sample_max` (seed0 = the plan's seeds[0])."""
    h = hashlib.sha256(seed0.to_bytes(8, "little") + client.encode("utf-8")).digest()
    return int.from_bytes(h[:8], "little")


def plan_steps(plan: _Plan, client: str) -> int:
    """T(c) of the module docstring: the steps `client` runs in `plan`, 0 when it sits the round out."""
    t = plan.steps.get(client)
    if t is not None:
        return t
    if plan.sample_max is not None and sample_key(plan.seeds[0], client) <= plan.sample_max:
        return len(plan.seeds)
    return 0
