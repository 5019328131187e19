"""ClientRounds and the run's lifecycle (RunState on `run`, protocol 1.3): a device at the final round idles
(no Join, sync or step) or exits 0 with exit_when_run_over; one behind catches up first; a new run wakes it."""

from __future__ import annotations

from edge_client.service.actions import Exit, SendJoin, SendSync
from shared.messages import RunState

from roundkit import V0, core, result  # isort: skip


def test_a_device_at_the_final_round_idles() -> None:
    c = core()
    res, _ = result(0, V0)
    c.on_result(res, 0.0)
    assert c.round == 0
    assert c.handle(RunState("finished", 0, 1.0, "1 rounds"), 1.0) == []
    assert c.runs.over_at(c.round)
    assert c.tick(100.0) == [] and c.tick(10_000.0) == []  # no sync, no Join: nobody would answer


def test_a_device_behind_catches_up_then_exits_when_asked() -> None:
    c = core(exit_when_run_over=True)
    assert c.handle(RunState("stopped", 1, 1.0, "meerkat stop"), 1.0) == []  # at round -1: not over yet
    assert not c.runs.over_at(c.round) and c.known_round == 1
    assert any(isinstance(a, SendSync) for a in c.tick(20.0))  # it asks for the rounds it missed
    r0, v1 = result(0, V0)
    r1, _ = result(1, v1)
    c.on_result(r0, 21.0)
    c.on_result(r1, 21.0)
    (out,) = c.tick(22.0)
    assert isinstance(out, Exit) and out.code == 0 and "stopped after round 1" in out.reason
    assert c.tick(23.0) == []  # said once


def test_finishing_trains_on_and_a_new_run_wakes_an_idle_device() -> None:
    c = core()
    res, _ = result(0, V0)
    c.on_result(res, 0.0)
    assert c.handle(RunState("finishing", 1, 1.0, "meerkat stop"), 1.0) == [] and not c.runs.over_at(c.round)
    c.handle(RunState("stopped", 0, 2.0, "meerkat stop"), 2.0)
    assert c.runs.over_at(c.round) and c.tick(50.0) == []
    c.handle(RunState("running", -1, 3.0), 3.0)  # a new run on the fleet (a fresh coordinator state_dir)
    assert not c.runs.over_at(c.round)
    c.connected(60.0)
    assert any(isinstance(a, SendJoin) for a in c.connected(60.0))
