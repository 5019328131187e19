"""Start-up after kill -9: read from the event log what the round book needs (`rounds.Recovered`).

values      newest verified checkpoint + replay of the later logged results (`checkpoint.rebuild_values`)
open plan   the round still `open` in the log (it must follow the last result), with its accepted updates
late        stored `late` updates not yet folded, and the plans of their rounds
dedupe      (client, round) -> msg_id of the last LATE_WINDOW rounds, and those rounds' plans
replay      the last replay_max results
registry    every client row; MEERKAT-VP flags and the logged GradIP history (insertion order)

`check_meta` runs first: a state_dir of another run (model, mask, fleet, seed, v_0) is refused.
"""

from __future__ import annotations

import logging

import torch

from coordinator.actions import Recovered
from coordinator.checkpoint import rebuild_values
from coordinator.eventlog import EventLog
from coordinator.rounds import LATE_WINDOW

log = logging.getLogger(__name__)


class StateMismatch(RuntimeError):
    """The state_dir belongs to another run (model, mask, fleet or master seed differ)."""


def check_meta(events: EventLog, state_dir: object, want: dict[str, str]) -> None:
    """Log each `want` key a fresh log lacks; raise StateMismatch when a logged one differs."""
    with events.transaction():
        for key, value in want.items():
            have = events.get_meta(key)
            if have is None:
                events.set_meta(key, value)
            elif have != value:
                raise StateMismatch(
                    f"{state_dir}: logged {key} is {have!r} but this coordinator has {value!r}; "
                    "use a fresh state_dir for a new run"
                )


def recover(events: EventLog, v0: torch.Tensor, mask_id: str, fingerprint: str, replay_max: int) -> Recovered:
    values, last = rebuild_values(events, v0, mask_id, fingerprint)
    plan = events.open_plan()
    if plan is not None and plan.round != last + 1:
        raise RuntimeError(f"open round {plan.round} in the log does not follow the last result {last}")
    oldest = last + 1 - LATE_WINDOW
    late = events.updates(status="late")
    accepted = events.updates(round=plan.round, status="accepted") if plan is not None else []
    plans = {p.round: p for p in events.plans(since=oldest)}
    for r in {u.round for u in late} - set(plans):
        p = events.get_plan(r)
        if p is None:
            raise RuntimeError(f"late update of round {r} in the log has no plan: log corrupt")
        plans[r] = p
    if plan is not None:
        log.info("reopening round %d with %d committed updates", plan.round, len(accepted))
    return Recovered(
        values=values, last_round=last, open_plan=plan,
        plans=tuple(plans[r] for r in sorted(plans)), pending=tuple(accepted + late),
        stored={**events.update_keys(since=oldest), **{(u.client, u.round): u.msg_id for u in late}},
        results=tuple(events.results(after=last - max(1, replay_max))), clients=tuple(events.clients()),
        limited=events.limited_clients(), gradip=events.gradip_history(),
        drift_steps={d.client: d.n_steps for d in events.drift_rows()},
        lr_state=events.views.lr_state(),
    )  # fmt: skip
