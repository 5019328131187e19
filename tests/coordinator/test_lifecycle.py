"""coordinator/lifecycle.py: running -> finishing -> finished | stopped, without a broker (the processes:
tests/e2e/test_run_lifecycle.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from coordinator.lifecycle import STOP_FILE, RunLifecycle, RunOver, request_stop, take_stop_request


@dataclass
class Book:
    stop_after_round: int | None = None
    last_round: int = -1
    open_round: int | None = None


def test_a_round_count_finishes() -> None:
    book, life = Book(), RunLifecycle.load({}, target=4)
    state, meta = life.begin(book, 1.0)
    assert (state.state, state.last_round, book.stop_after_round) == ("running", -1, 4)
    book.last_round = 4
    state, meta = life.end(book, 9.0)
    assert (state.state, state.last_round, state.reason) == ("finished", 4, "5 rounds")
    assert meta == {"run_state": "finished", "run_last_round": "4", "run_reason": "5 rounds", "run_ended_at": "9.0"}


def test_stop_finishes_the_open_round_or_stops_at_the_last_closed_one() -> None:
    book, life = Book(last_round=6, open_round=7), RunLifecycle.load({}, target=None)
    life.begin(book, 1.0)
    change = life.stop(book, 2.0, "meerkat stop")
    assert change is not None
    state, meta = change
    assert (state.state, state.last_round, book.stop_after_round) == ("finishing", 7, 7)
    assert life.stop(book, 3.0, "again") is None  # already finishing
    book.last_round, book.open_round = 7, None
    assert life.end(book, 4.0)[0].state == "stopped"
    idle = Book(last_round=3)
    other = RunLifecycle()
    other.begin(idle, 1.0)
    assert other.stop(idle, 2.0, "x") is not None and idle.stop_after_round == 3  # nothing open: stop now
    capped = Book(last_round=1, open_round=2, stop_after_round=1)  # a round count that ends sooner wins
    RunLifecycle().stop(capped, 1.0, "x")
    assert capped.stop_after_round == 1


def test_an_ended_run_is_not_started_again_and_finishing_survives_a_restart() -> None:
    with pytest.raises(RunOver, match=r"this run is stopped \(after round 7, .*meerkat stop\); nothing to do"):
        RunLifecycle.load({"run_state": "stopped", "run_last_round": "7", "run_reason": "meerkat stop",
                           "run_ended_at": "5.0"}, target=None)  # fmt: skip
    book = Book(last_round=6, open_round=7)
    life = RunLifecycle.load({"run_state": "finishing", "run_last_round": "7", "run_reason": "meerkat stop"}, None)
    state, _ = life.begin(book, 1.0)
    assert (state.state, state.last_round, book.stop_after_round) == ("finishing", 7, 7)


def test_the_stop_request_file(tmp_path: Path) -> None:
    assert take_stop_request(tmp_path) is None
    request_stop(tmp_path, "maintenance")
    assert (tmp_path / STOP_FILE).exists()
    assert take_stop_request(tmp_path) == "maintenance"
    assert take_stop_request(tmp_path) is None  # taken once
    (tmp_path / STOP_FILE).write_text("{not json")
    assert take_stop_request(tmp_path) == "meerkat stop (unreadable request file)"
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        request_stop(tmp_path / "missing")


def test_a_finished_run_goes_on_when_the_round_count_is_raised_or_removed_a_stopped_one_does_not() -> None:
    from coordinator.lifecycle import RunLifecycle, RunOver

    finished = {"run_state": "finished", "run_last_round": "2", "run_ended_at": "1.0", "run_reason": "3 rounds"}
    with pytest.raises(RunOver):
        RunLifecycle.load(finished, 2)  # the same count: nothing to do
    life = RunLifecycle.load(finished, 3)
    assert life.state == "running" and life.target == 3
    assert RunLifecycle.load(finished, None).state == "running"  # the count removed: until `meerkat stop`
    stopped = {**finished, "run_state": "stopped", "run_reason": "meerkat stop"}
    with pytest.raises(RunOver):
        RunLifecycle.load(stopped, 5)
