"""RoundBook.reconnected: after each (re)connect of the coordinator's link the open plan is re-published
(devices re-send the Updates a broker that lost its session forgot), with time for those re-sends."""

from __future__ import annotations

from test_rounds_core import FP, MASK, book, config, join, records, sent, update

from coordinator.records import ReplanRecord
from shared.messages import RoundPlan, RoundResult


def test_reconnect_republishes_plan_and_result_and_gives_time_for_resends() -> None:
    b = book(config(min_clients=2, min_updates=2))
    join(b, "a", 2)
    join(b, "b", 2)
    assert b.reconnected(0.0) == []  # nothing open, nothing closed: nothing to re-publish
    (p0,) = sent(b.tick(0.0), RoundPlan)
    for k in ("a", "b"):
        b.handle(update(k, 0, [0.5, -0.5], 2), 1.0)
    b.tick(1.0)  # closes round 0
    (p1,) = sent(b.tick(1.0), RoundPlan)
    b.handle(update("a", 1, [0.1, 0.2], 2), 2.0)
    acts = b.reconnected(9.0)  # deadline 11.0 is nearly due: moved to now + round_deadline_s
    (res,) = sent(acts, RoundResult)
    (again,) = sent(acts, RoundPlan)
    assert res.round == 0 and again.round == 1 and again.deadline == 19.0
    assert (again.seeds, again.steps, again.values_checksum) == (p1.seeds, p1.steps, p1.values_checksum)
    (rec,) = records(acts, ReplanRecord)
    assert (rec.round, rec.deadline, rec.extensions) == (1, 19.0, 0)  # not an extension
    b.tick(15.0)  # past the old deadline (11), before the new one: round 1 stays open
    assert b.plan is not None and b.plan.extensions == 0
    assert (p0.fingerprint, p0.mask_id) == (FP, MASK)


def test_reconnect_with_far_deadline_keeps_it() -> None:
    b = book(config(min_clients=2, round_deadline_s=100.0))
    join(b, "a", 2)
    join(b, "b", 2)
    (p,) = sent(b.tick(0.0), RoundPlan)
    acts = b.reconnected(1.0)  # due in 99 s > RESEND_GRACE_S: unchanged
    (again,) = sent(acts, RoundPlan)
    assert again == p and records(acts, ReplanRecord) == []
