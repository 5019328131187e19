"""The fleet's differential-privacy switch, as the coordinator states it in every RoundPlan.

Device-level DP (docs/PRIVACY.md) is computed and accounted on the devices; the coordinator only says
which rule the fleet runs (RoundPlan keys 13-17, docs/PROTOCOL.md 1.3), shows each device's spent
epsilon (Heartbeat keys 13-15: status, dashboard, /metrics) and otherwise aggregates as usual.
"""

from __future__ import annotations

import dataclasses

from coordinator.config import CoordinatorConfig
from shared.messages import RoundPlan


def plan_fields(config: CoordinatorConfig) -> dict[str, float | int]:
    """The RoundPlan's dp_* keys for this fleet: empty when DP is off (dp_epsilon = 0)."""
    if not config.dp_epsilon:
        return {}
    return {
        "dp_clip": config.dp_clip, "dp_noise": config.dp_noise, "dp_epsilon": config.dp_epsilon,
        "dp_delta": config.dp_delta, "dp_steps": config.dp_steps or max(1, config.rounds * config.steps),
    }  # fmt: skip


def with_privacy(plan: RoundPlan, config: CoordinatorConfig) -> RoundPlan:
    """`plan` carrying the fleet's DP rule (the same plan when DP is off)."""
    fields = plan_fields(config)
    return dataclasses.replace(plan, **fields) if fields else plan  # type: ignore[arg-type]


__all__ = ["plan_fields", "with_privacy"]
