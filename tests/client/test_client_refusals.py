"""Refused Joins, RATE_LIMITED and a silent fleet (edge_client/service/refusals.py, `JoinBackoff`): through
the round core, which turns a real refusal into an Exit, and on the back-off alone."""

from __future__ import annotations

from collections import Counter

import pytest

from edge_client.service.actions import EXIT_MISMATCH, DropQueued, Exit, SendJoin, SendSync, SlowDown
from edge_client.service.refusals import JoinBackoff
from shared.messages import ErrorCode, ErrorMsg, Replay

from roundkit import FLEET, FP, MASK, V0, core, of, plan, result, run_steps  # isort: skip

# ---- refusals (issues 14 and 16) ------------------------------------------------------------------

OTHER_MASK = "f" * 16
MASK_REFUSED = ErrorMsg(ErrorCode.MASK_MISMATCH, f"mask {MASK} is not the fleet's {OTHER_MASK}")


def test_refused_join_confirmed_by_the_plan_exits_with_what_to_fix() -> None:
    c = core()
    assert c.on_plan(plan(mask_id=OTHER_MASK), 0.0) == []  # the retained plan alone: refuse it and wait
    (ex,) = c.on_error(MASK_REFUSED, 0.0)
    assert isinstance(ex, Exit) and ex.code == EXIT_MISMATCH == 6
    for needle in (f"fleet {FLEET}", "MASK_MISMATCH", f"mask {OTHER_MASK}", f"mask {MASK}", FP[:12], "Fix:", "mask file"):
        assert needle in ex.reason, (needle, ex.reason)
    assert c.tick(100.0) == [] and c.counters["exit_mismatch"] == 1  # nothing more while the pump stops


def test_refusal_first_then_a_mismatching_plan_exits() -> None:
    c = core()
    assert c.on_error(ErrorMsg(ErrorCode.FINGERPRINT_MISMATCH, "base model ..."), 0.0) == []  # no plan yet: not sure
    (ex,) = c.on_plan(plan(fingerprint="cd" * 32), 0.0)
    assert isinstance(ex, Exit) and "cdcdcdcdcdcd" in ex.reason and "FINGERPRINT_MISMATCH" in ex.reason


def test_refusal_while_the_plan_matches_is_not_ours_rejoin_with_capped_backoff(caplog: pytest.LogCaptureFixture) -> None:
    c = core()
    c.on_plan(plan(steps={"other": 3}), 0.0)  # the fleet runs exactly our model and mask
    c.tick(0.0)  # the once-after-connect SyncRequest
    joins: list[float] = []
    for _ in range(8):  # a spoofer keeps getting Joins under our id refused: never an Exit
        t = joins[-1] if joins else 0.0
        assert c.on_error(MASK_REFUSED, t) == []  # the back-off counts from the refusal
        while not of(SendJoin, c.tick(t)):
            t += 0.5
        joins.append(t)
    gaps = [b - a for a, b in zip([0.0, *joins[:-1]], joins, strict=True)]
    assert gaps == [2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0, 60.0], gaps  # 2 s doubling, capped at 60 s
    assert "not our doing" in caplog.text and any(r.levelname == "ERROR" for r in caplog.records)
    # UNKNOWN_CLIENT while refused: the back-off still decides (no Join storm)
    assert c.on_error(ErrorMsg(ErrorCode.UNKNOWN_CLIENT, "who?"), 0.0) == []
    # an answered SyncRequest proves we are joined: back to normal (UNKNOWN_CLIENT -> Join at once)
    c.on_replay(Replay(()), 0.0)
    assert c.joins.refusals == 0 and c.on_error(ErrorMsg(ErrorCode.UNKNOWN_CLIENT, "who?"), 0.0) == [SendJoin(-1)]


def test_quant_refused_three_times_without_a_sign_of_joining_exits() -> None:
    c = core()
    c.on_plan(plan(steps={"other": 3}), 0.0)  # a plan says nothing about quant
    quant = ErrorMsg(ErrorCode.QUANT_MISMATCH, "quant int8 is not the fleet's nf4")
    assert c.on_error(quant, 0.0) == [] and c.on_error(quant, 0.0) == []
    (ex,) = c.on_error(quant, 0.0)
    assert isinstance(ex, Exit) and "3 times" in ex.reason and "QUANT_MISMATCH" in ex.reason and "quant" in ex.reason
    # a spoofed QUANT_MISMATCH between our accepted Joins: the Replay resets the count
    c2 = core()
    for _ in range(5):
        assert c2.on_error(quant, 0.0) == []
        c2.on_replay(Replay(()), 0.0)
    assert c2.exiting is None


def test_no_plan_and_repeated_mask_refusals_exit() -> None:
    c = core()
    assert c.on_error(MASK_REFUSED, 0.0) == [] and c.on_error(MASK_REFUSED, 0.0) == []
    (ex,) = c.on_error(MASK_REFUSED, 0.0)
    assert isinstance(ex, Exit) and "fleet f1 runs" not in ex.reason  # no plan: the fleet's side comes from the reason
    assert OTHER_MASK in ex.reason


def test_reconnect_while_refused_waits_for_the_backoff() -> None:
    c = core()
    c.on_error(MASK_REFUSED, 0.0)
    c.disconnected(0.0)
    assert c.connected(0.0) == []  # not at once: the schedule of the refusals
    assert of(SendJoin, c.tick(0.0)) == [] and of(SendJoin, c.tick(2.0)) == [SendJoin(-1)]


def test_rate_limited_slows_sync_and_resends_with_backoff() -> None:
    c = core()
    c.on_result(result(4, V0)[0], 0.0)  # far behind: wants to sync every 5 s
    assert c.tick(0.0) == [SendSync(-1)]
    assert c.on_error(ErrorMsg(ErrorCode.RATE_LIMITED, "sync"), 5.0) == [SlowDown(10.0)]
    assert c.tick(5.0) == [] and c.tick(14.9) == [] and c.tick(15.1) == [SendSync(-1)]  # held 10 s from t=5
    assert c.on_error(ErrorMsg(ErrorCode.RATE_LIMITED, "sync"), 0.0) == [SlowDown(20.0)]  # doubling
    assert c.on_error(ErrorMsg(ErrorCode.RATE_LIMITED, "sync"), 0.0) == [SlowDown(40.0)]
    for _ in range(5):
        c.on_error(ErrorMsg(ErrorCode.RATE_LIMITED, "sync"), 0.0)
    assert c.on_error(ErrorMsg(ErrorCode.RATE_LIMITED, "sync"), 0.0) == [SlowDown(120.0)]  # capped


@pytest.mark.parametrize("code", [ErrorCode.UNKNOWN_ROUND, ErrorCode.CONFLICT, ErrorCode.STALE_ROUND,
                                  ErrorCode.NOT_IN_ROUND, ErrorCode.BAD_UPDATE])
def test_final_refusal_of_the_queued_update_drops_it(code: ErrorCode) -> None:
    c = core()
    assert c.on_error(ErrorMsg(code, "x"), 0.0) == []  # nothing queued: nothing to drop
    c.on_plan(plan(), 0.0)
    run_steps(c)
    assert c.trained_round == 0 and c.on_error(ErrorMsg(code, "x"), 0.0) == [DropQueued(0)]
    assert c.counters["updates_refused"] == 1
    c.on_result(result(0, V0)[0], 0.0)
    assert c.on_error(ErrorMsg(code, "x"), 0.0) == []  # round 0 is committed: its row is gone anyway


def test_silent_fleet_is_reported_loudly(caplog: pytest.LogCaptureFixture) -> None:
    c = core()
    for t in (0.0, 10.0, 29.0):
        c.tick(t)
    assert c.counters["coordinator_silent"] == 0
    c.tick(30.5)
    assert c.counters["coordinator_silent"] == 1
    rec = [r for r in caplog.records if "no coordinator on fleet" in r.getMessage()]
    assert rec and rec[0].levelname == "ERROR" and f"'{FLEET}'" in rec[0].getMessage()
    c.tick(45.0)
    assert c.counters["coordinator_silent"] == 1  # not on every tick
    c.tick(61.0)
    assert c.counters["coordinator_silent"] == 2
    c.on_plan(plan(steps={"other": 3}), 0.0)  # a coordinator spoke: quiet
    c.tick(500.0)
    assert c.counters["coordinator_silent"] == 2


# ---- JoinBackoff alone ---------------------------------------------------------------------------


def test_backoff_counts_from_the_refusal_and_waits_out_rate_limited() -> None:
    b = JoinBackoff(FLEET, (FP, MASK), Counter())
    assert b.may_join_now(0.0)  # never refused: Join at once
    assert b.refused(MASK_REFUSED, "MASK_MISMATCH", None, 100.0) is None  # 1 of 3, no plan: not yet believed
    assert not b.may_join_now(100.5)  # a reconnection now waits for the schedule
    assert not b.rejoin_due(101.9) and b.rejoin_due(102.0) and not b.rejoin_due(102.0)  # 2 s, then consumed
    assert b.rate_limited("sync", 200.0) == 10.0 and b.quiet(209.9) and not b.quiet(210.0)
    assert b.refused(MASK_REFUSED, "MASK_MISMATCH", None, 200.0) is None  # 2nd: 4 s, but RATE_LIMITED holds it
    assert not b.rejoin_due(205.0) and b.rejoin_due(210.0)
    why = b.refused(MASK_REFUSED, "MASK_MISMATCH", None, 300.0)
    assert why is not None and "3 times in a row" in why
    b.joined()  # a sign we are joined: all forgiven, the slow-down streak too
    assert (b.refusal, b.refusals) == (None, 0) and b.may_join_now(301.0)
    assert b.rate_limited("sync", 400.0) == 10.0


def test_a_plan_contradicts_a_refusal_only_for_another_model_or_mask() -> None:
    b = JoinBackoff(FLEET, (FP, MASK), Counter())
    assert b.contradicted(plan(mask_id=OTHER_MASK)) is None  # no refusal: a foreign plan alone proves nothing
    b.refused(MASK_REFUSED, "MASK_MISMATCH", None, 0.0)
    assert b.contradicted(plan()) is None
    why = b.contradicted(plan(mask_id=OTHER_MASK))
    assert why is not None and "MASK_MISMATCH" in why
    q = JoinBackoff(FLEET, (FP, MASK), Counter())
    q.refused(ErrorMsg(ErrorCode.QUANT_MISMATCH, "int8 vs nf4"), "QUANT_MISMATCH", None, 0.0)
    assert q.contradicted(plan(mask_id=OTHER_MASK)) is None  # a plan carries no quant: it cannot confirm that one
