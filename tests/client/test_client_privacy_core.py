"""The round core with a DeviceBudget (edge_client/privacy.py): DP plans carry their step parameters,
Updates carry no loss and charge the budget, a plan that no longer fits is refused, a device that
cannot train privately refuses DP plans, and the budget reloaded from a ledger gives the same epsilon."""

from __future__ import annotations

import logging

import pytest

from edge_client.privacy import DeviceBudget, FleetDp
from edge_client.service.actions import QueueUpdate, TrainStep
from shared.accountant import Spend, default_delta, epsilon, noise_multiplier

from roundkit import IDENTITY, core, plan, run_steps  # isort: skip

DP = dict(dp_clip=0.5, dp_noise=0.0, dp_epsilon=3.0, dp_delta=0.0, dp_steps=6)
N = IDENTITY.n_samples  # 24


def test_dp_round_carries_its_parameters_and_charges_the_budget() -> None:
    budget = DeviceBudget(N)
    c = core(privacy=budget)
    c.on_plan(plan(0, **DP), 0.0)
    acts = run_steps(c)
    steps = [a for a in acts if isinstance(a, TrainStep)]
    (queued,) = [a for a in acts if isinstance(a, QueueUpdate)]
    q, delta = 4 / N, default_delta(N)
    sigma = noise_multiplier(3.0, delta, q, 6)
    assert [s.dp.path for s in steps if s.dp] == [(0, queued.update.msg_id, t) for t in range(3)]
    assert {(s.dp.params.clip, s.dp.params.noise_multiplier, s.dp.params.batch_size, s.dp.q) for s in steps if s.dp} == {
        (0.5, sigma, 4, q)}
    assert queued.spend == Spend(q, sigma, 3) and queued.update.loss == 0.0
    assert budget.spent() == (epsilon([Spend(q, sigma, 3)], delta), delta)


def test_plan_past_the_budget_is_refused_once_with_a_clear_line(caplog: pytest.LogCaptureFixture) -> None:
    q, delta = 4 / N, default_delta(N)
    sigma = noise_multiplier(3.0, delta, q, 6)
    budget = DeviceBudget(N, [Spend(q, sigma, 3), Spend(q, sigma, 3)])  # two rounds already published
    assert budget.spends == [Spend(q, sigma, 6)]  # one term per (q, sigma), as StateStore keeps it
    c = core(privacy=budget)
    with caplog.at_level(logging.WARNING):
        c.on_plan(plan(0, **DP), 0.0)
        c.on_plan(plan(0, **DP), 0.0)  # re-published: no second line
        acts = run_steps(c)
    assert not [a for a in acts if isinstance(a, TrainStep)] and c.job is None
    lines = [r.getMessage() for r in caplog.records if "privacy budget spent" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith("not training round 0: privacy budget spent: epsilon")
    assert budget.exhausted and c.counters["dp_refused"] == 1


def test_device_without_privacy_refuses_dp_plans_but_trains_plain_ones() -> None:
    c = core()
    c.on_plan(plan(0, **DP), 0.0)
    assert not [a for a in run_steps(c) if isinstance(a, TrainStep)]
    c2 = core(privacy=DeviceBudget(N))
    c2.on_plan(plan(0), 0.0)
    acts = run_steps(c2)
    assert all(a.dp is None for a in acts if isinstance(a, TrainStep))
    (queued,) = [a for a in acts if isinstance(a, QueueUpdate)]
    assert queued.spend is None and queued.update.loss != 0.0


def test_fleet_rule_from_the_plan() -> None:
    assert FleetDp.of(plan(0)) is None
    assert FleetDp.of(plan(0, **DP)) == FleetDp(0.5, 0.0, 3.0, 0.0, 6)
    with pytest.raises(ValueError, match="all five or none"):
        plan(0, dp_clip=0.5)


def test_owner_floor_refuses_plain_plans_and_stops_below_the_fleet_target() -> None:
    c = core(privacy=DeviceBudget(N, max_epsilon=1.0))
    c.on_plan(plan(0), 0.0)  # the fleet trains without DP: refused
    assert not [a for a in run_steps(c) if isinstance(a, TrainStep)] and c.counters["dp_refused"] == 1
    q, delta = 4 / N, default_delta(N)
    sigma = noise_multiplier(3.0, delta, q, 6)
    assert epsilon([Spend(q, sigma, 3)], delta) > 1.0  # one round at the fleet's sigma passes the owner's 1.0
    c2 = core(privacy=DeviceBudget(N, max_epsilon=1.0))
    c2.on_plan(plan(0, **DP), 0.0)
    assert not [a for a in run_steps(c2) if isinstance(a, TrainStep)]
    c3 = core(privacy=DeviceBudget(N, max_epsilon=100.0))
    c3.on_plan(plan(0, **DP), 0.0)  # a looser floor: the fleet's target applies
    assert len([a for a in run_steps(c3) if isinstance(a, TrainStep)]) == 3


def test_a_rule_the_device_cannot_account_is_refused_not_a_crash() -> None:
    budget = DeviceBudget(1)  # one example: no default delta 1 / n^1.1 below 1 / n exists
    c = core(privacy=budget)
    c.on_plan(plan(0, **DP), 0.0)
    assert not [a for a in run_steps(c) if isinstance(a, TrainStep)] and budget.exhausted
    assert budget.spent() is None  # nothing to report, and no exception in the heartbeat thread
