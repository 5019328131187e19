"""The run's lifecycle: running -> finishing -> finished | stopped, as the fleet sees it.

    life = RunLifecycle.load(meta, target=config.rounds - 1)   # RunOver when the log says the run ended
    state, meta = life.begin(book, now)       # retained RunState on `run` + the meta keys to persist
    state, meta = life.stop(book, now, why)   # `meerkat stop`: the open round closes, none opens after it
    state, meta = life.end(book, now)         # book.done(): finished (round count) or stopped (stop asked)

One end for both ways a run ends: a fixed round count and `meerkat stop` each set the book's
`stop_after_round` (the open round, or the last closed one when none is open), so the pump ends the same
way (`Coordinator.run`). The state is kept in the event log's meta (`run_state`, `run_last_round`,
`run_reason`, `run_ended_at`): a coordinator restarted on an ended run refuses to start rounds again
(RunOver), one restarted while finishing keeps finishing. `meerkat stop` talks to the running pump
through a file in its state_dir (`request_stop`), read at each liveness beat: no broker rights and no
port needed, and the request survives a coordinator restart until it is carried out. With the event log
on PostgreSQL (coordinator workers: each has its own state_dir, maybe on another host) the request is the
log's meta key `stop_request` instead (`request_stop_in_log`); the pump takes either (`take_stop`).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Protocol

from shared.messages import RunState

log = logging.getLogger(__name__)

STOP_CHECK_S = 1.0  # how often the pump looks for a `meerkat stop` request

STOP_FILE = "stop.request"  # in the state_dir: `meerkat stop` writes it, the pump consumes it
STOP_META = "stop_request"  # the same request in the event log's meta (PostgreSQL: the cluster's shared state)


class RunOver(RuntimeError):
    """The event log says this run ended (finished or stopped): the coordinator does not start it again."""

    def __init__(self, state: str, last_round: int, ended_at: float | None, reason: str) -> None:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ended_at)) if ended_at else "?"
        super().__init__(
            f"this run is {state} (after round {last_round}, {when}{': ' + reason if reason else ''}); "
            "nothing to do. `meerkat report` writes its report again; a new run needs a fresh state_dir"
        )
        self.state, self.last_round = state, last_round


class _Book(Protocol):  # what the lifecycle reads and sets on coordinator/rounds.py RoundBook
    stop_after_round: int | None
    last_round: int

    @property
    def open_round(self) -> int | None: ...


def request_stop(state_dir: Path, reason: str = "meerkat stop", now: float | None = None) -> Path:
    """Ask the coordinator of `state_dir` to finish its open round and stop. Raises FileNotFoundError
    when `state_dir` does not exist (no coordinator ever ran there)."""
    state_dir = Path(state_dir)
    if not state_dir.is_dir():
        raise FileNotFoundError(f"{state_dir} is not a directory: is it the coordinator's state_dir?")
    path = state_dir / STOP_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"reason": reason, "at": time.time() if now is None else now}))
    os.replace(tmp, path)  # the pump never reads half a request
    return path


def take_stop_request(state_dir: Path) -> str | None:
    """The reason of a pending stop request (removed as it is taken), or None. A file that does not parse
    still asks for a stop: its reason says so."""
    path = Path(state_dir) / STOP_FILE
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    path.unlink(missing_ok=True)
    return _reason(text)


class _MetaLog(Protocol):  # what the stop request needs of coordinator/eventlog EventLog
    def get_meta(self, key: str) -> str | None: ...
    def set_meta(self, key: str, value: str) -> None: ...
    def delete_meta(self, key: str) -> None: ...
    def transaction(self) -> AbstractContextManager[None]: ...


def request_stop_in_log(log: _MetaLog, reason: str = "meerkat stop", now: float | None = None) -> None:
    """Ask the coordinator (the leading worker of a cluster) that writes `log` to finish its open round
    and stop: the meta key STOP_META, taken by `take_stop`."""
    with log.transaction():
        log.set_meta(STOP_META, json.dumps({"reason": reason, "at": time.time() if now is None else now}))


def _reason(text: str) -> str:
    try:
        reason = str(json.loads(text).get("reason", "meerkat stop"))
    except (ValueError, AttributeError):
        reason = "meerkat stop (unreadable request file)"
    return reason[:200]


def take_stop(state_dir: Path, log: _MetaLog | None = None) -> str | None:
    """A pending stop request's reason (taken: removed), from the state_dir's file, else (`log`: an event log
    on PostgreSQL) the log's meta key STOP_META; None when neither holds one."""
    reason = take_stop_request(state_dir)
    if reason is not None or log is None:
        return reason
    text = log.get_meta(STOP_META)
    if text is None:
        return None
    with log.transaction():
        log.delete_meta(STOP_META)
    return _reason(text)


class RunLifecycle:
    """The run's state and the one place it changes. Pure: the pump persists `meta` and publishes the
    RunState in one `_carry_out`."""

    def __init__(self, state: str = "running", reason: str = "", target: int | None = None) -> None:
        self.state, self.reason, self.target = state, reason, target
        self._stop_check_at = -float("inf")

    @classmethod
    def load(cls, meta: Mapping[str, str], target: int | None) -> RunLifecycle:
        """From the event log's meta; RunOver when the run ended. `target`: the configured last round. A run
        `finished` at its round count goes on when the operator raised the count past its last round or removed
        it (`target` None: until `meerkat stop`); a `stopped` run never does: the stop was an operator's word too."""
        state, reason = meta.get("run_state", "running"), meta.get("run_reason", "")
        last = int(meta.get("run_last_round", "-1"))
        if state == "finished" and (target is None or target > last):
            more = "no round count" if target is None else f"the round count now asks for round {target}"
            log.info("the run finished after round %d; %s: the run goes on", last, more)
            return cls("running", f"after round {last}: {more}", target)
        if state in ("finished", "stopped"):
            ended = meta.get("run_ended_at")
            raise RunOver(state, last, float(ended) if ended else None, reason)
        if state == "finishing":
            target = int(meta["run_last_round"])  # the round a stop asked to finish with (kept across restarts)
        return cls(state, reason, target)

    def begin(self, book: _Book, now: float) -> tuple[RunState, dict[str, str]]:
        """At start: the book stops after the target round; the fleet learns the state (retained)."""
        if self.target is not None:
            book.stop_after_round = self.target if book.stop_after_round is None else min(book.stop_after_round, self.target)
        return self._state(book, now)

    def stop(self, book: _Book, now: float, reason: str) -> tuple[RunState, dict[str, str]] | None:
        """`meerkat stop`: finish the open round (or stop after the last closed one). None when the run is
        already finishing."""
        if self.state != "running":
            return None
        last = book.open_round if book.open_round is not None else book.last_round
        book.stop_after_round = last if book.stop_after_round is None else min(book.stop_after_round, last)
        self.state, self.reason, self.target = "finishing", reason, book.stop_after_round
        return self._state(book, now)

    def poll_stop(self, book: _Book, now: float, take: Callable[[], str | None]) -> tuple[RunState, dict[str, str]] | None:
        """A `meerkat stop` request (`take`: `take_stop_request` on the state dir, called at most every
        STOP_CHECK_S): finish the open round, then stop; the state to publish and persist, or None (no
        request, or the run already ending)."""
        if self._stop_check_at <= now < self._stop_check_at + STOP_CHECK_S:
            return None
        self._stop_check_at = now
        reason = take()
        if reason is None:
            return None
        change = self.stop(book, now, reason)
        if change is None:
            log.info("stop request (%s): the run is already %s", reason, self.state)
        else:
            log.info("stop request (%s): finishing: round %d is the last", reason, change[0].last_round)
        return change

    def end(self, book: _Book, now: float) -> tuple[RunState, dict[str, str]]:
        """The book is done: `stopped` after a stop request, else `finished` (the configured round count)."""
        self.state = "stopped" if self.state == "finishing" else "finished"
        if self.state == "finished" and not self.reason:
            self.reason = f"{book.last_round + 1} rounds"
        rs, meta = self._state(book, now)
        meta["run_ended_at"] = repr(float(now))
        return rs, meta

    def _state(self, book: _Book, now: float) -> tuple[RunState, dict[str, str]]:
        last = self.target if self.state == "finishing" and self.target is not None else book.last_round
        rs = RunState(self.state, last, now, self.reason)
        return rs, {"run_state": self.state, "run_last_round": str(last), "run_reason": self.reason}
