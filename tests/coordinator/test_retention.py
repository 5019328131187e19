"""Retention (docs/COORDINATOR.md "Retention"): a long run's event log stays flat, and a coordinator
restarted from the pruned log continues exactly like the one that never stopped (values, MEERKAT-VP
statistics, the next rounds' actions). Real SQLite files and checkpoint files; the pump's own steps."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from coordfakes import synthetic_v0

from coordinator.actions import Action, Persist, Publish, WriteCheckpoint
from coordinator.checkpoint import checkpoint_path, write_checkpoint
from coordinator.config import CoordinatorConfig
from coordinator.drift import DriftMonitor
from coordinator.eventlog import EventLog
from coordinator.recovery import recover
from coordinator.retention import retention_bounds
from coordinator.rounds import RoundBook
from shared.fingerprint import fp_tag
from shared.messages import Join, RoundPlan, Update
from shared.prng import raw_u64
from shared.sampling import plan_steps

FP, MASK = "ab" * 32, "0123456789abcdef"
CAPS: dict[str, str | int | float | bool] = {"compact_plan": True}  # a 1.3 client (compact plans)
NNZ = 256
CLIENTS = ("a", "b", "c")


def cfg(**kw: Any) -> CoordinatorConfig:
    base: dict[str, Any] = dict(
        fleet="f", steps=3, lr=0.01, min_clients=3, min_updates=1, round_deadline_s=10.0, metrics=False,
        checkpoint_every=8, keep_checkpoints=2, replay_max=8, retain_rounds=64, drift_window=2, drift_min_steps=4,
        drift_decay_rule="absolute",  # the decaying grads flag clients: retention must keep what restores them
    )  # fmt: skip
    return CoordinatorConfig(**{**base, **kw})


def new_book(c: CoordinatorConfig, log: EventLog | None = None) -> RoundBook:
    grad = torch.from_numpy((raw_u64(11, NNZ) >> 40).astype("float64") / 2**24 - 0.5)
    drift = DriftMonitor(grad, "rademacher", c.drift_thresholds(), keep_history=False)
    rec = None if log is None else recover(log, synthetic_v0(NNZ), MASK, FP, c.replay_max)
    return RoundBook(c, fingerprint=FP, mask_id=MASK, values=synthetic_v0(NNZ), drift=drift, recovered=rec)


def carry(log: EventLog, state: Path, c: CoordinatorConfig, acts: list[Action]) -> list[Action]:
    """What the pump does with the book's actions: one transaction, checkpoints, then retention."""
    with log.transaction():
        log.persist_many([a.record for a in acts if isinstance(a, Persist)])
    for a in acts:
        if isinstance(a, WriteCheckpoint):
            path = checkpoint_path(state, a.round)
            path.parent.mkdir(parents=True, exist_ok=True)
            ck = write_checkpoint(path, a.round, a.values, MASK, FP)
            with log.transaction():
                log.add_checkpoint(a.round, str(path), ck, 0.0)
                for r, _, _ in log.checkpoints()[c.keep_checkpoints :]:
                    log.remove_checkpoint(r)
            before, results_before = retention_bounds(a.round, c.retain_rounds, c.replay_max,
                                                      [r for r, _, _ in log.checkpoints()])  # fmt: skip
            with log.transaction():
                log.prune(before, results_before, c.drift_window)
    return acts


def play_round(b: RoundBook, r: int, sink: Any) -> list[Action]:
    """Open round r, every client answers (T from the plan; decaying grads so MEERKAT-VP has a signal),
    close it. Returns every action."""
    t = 10.0 * r
    acts = sink(b.tick(t))
    plan = next(a.message for a in acts if isinstance(a, Publish) and isinstance(a.message, RoundPlan))
    for i, k in enumerate(CLIENTS):
        grads = tuple(math.sin(r * 0.7 + i + s) * (2.0 if k != "c" else 2.0 / (1 + r)) for s in range(plan_steps(plan, k)))
        loss = 1.0 + 0.3 * math.sin(r * 1.3)  # rises and falls: lr = "auto" grows, backs off and damps
        acts += sink(b.handle(Update(r, r + 1, grads, 4 + i, fp_tag(FP), loss, client=k), t + 1 + i))
    return acts + sink(b.tick(t + 5))


@pytest.mark.parametrize("lr", [0.01, "auto"])
def test_long_run_log_stays_flat_and_restart_continues_identically(tmp_path: Path, event_log: str, lr: Any) -> None:
    c = cfg(lr=lr)
    state = tmp_path / "state"
    log = EventLog(state, event_log=event_log)
    live = new_book(c)
    for k in CLIENTS:
        carry(log, state, c, live.handle(Join(k, FP, MASK, 4, 1.0, CAPS, -1), 0.0))
    rows = {}
    for r in range(200):
        play_round(live, r, lambda acts: carry(log, state, c, acts))
        if r in (103, 199):  # same phase of checkpoint_every: the log holds the same rows
            rows[r] = log.views.table_rows()
    if lr == "auto":  # an `lr` event only in the rounds whose lr moved: as many as the window allows
        assert max(rows[103].pop("events"), rows[199].pop("events")) <= (64 + 8) * 4
    assert rows[103] == rows[199], rows
    # the window (64 rounds + up to checkpoint_every since the last prune) plus each client's first and last
    # drift_window updates: O(retain_rounds), not O(rounds)
    assert rows[199]["updates"] <= (64 + 8) * 3 + 2 * 2 * 3
    assert rows[199]["rounds"] <= 64 + 8 and rows[199]["results"] <= 64 + 8
    assert rows[199].get("lr_decisions", 0) <= (64 + 8 if lr == "auto" else 0)
    assert min(u.round for u in log.updates()) == 0  # the first drift_window updates of each client stay

    again = new_book(c, log)  # a restart from the pruned log
    assert again.last_round == live.last_round == 199
    assert torch.equal(again.values, live.values)
    assert again.drift is not None and live.drift is not None
    for k in CLIENTS:
        assert again.drift.steps_seen(k) == live.drift.steps_seen(k) > 200
        assert again.drift.stats(k) == live.drift.stats(k)
    assert again.vp.limited() == live.vp.limited()
    for r in range(200, 204):  # and the next rounds: the same actions, byte for byte
        assert play_round(again, r, lambda acts: acts) == play_round(live, r, lambda acts: acts)
    if lr == "auto":  # the controller moved (the restart resumed a state that matters) and kept its newest row
        assert {d.action for d in log.views.lr_decisions()} >= {"grow", "backoff"}
        assert log.views.lr_state() is not None
    log.close()


def test_retention_off_keeps_everything(tmp_path: Path) -> None:
    c = cfg(retain_rounds=0)
    state = tmp_path / "state"
    log = EventLog(state)
    b = new_book(c)
    for k in CLIENTS:
        carry(log, state, c, b.handle(Join(k, FP, MASK, 4, 1.0, CAPS, -1), 0.0))
    for r in range(80):
        play_round(b, r, lambda acts: carry(log, state, c, acts))
    n = log.views.table_rows()
    assert n["updates"] == 240 and n["results"] == 80 and n["rounds"] == 80
    log.close()


def test_retention_bounds() -> None:
    assert retention_bounds(499, 256, 50, [479, 489, 499]) == (244, 244)
    assert retention_bounds(499, 256, 50, [489, 499, 229]) == (244, 230)  # the oldest checkpoint's results stay
    assert retention_bounds(100, 256, 50, [99]) == (0, 0)
    assert retention_bounds(999, 0, 50, [999]) == (0, 0)
