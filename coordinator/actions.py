"""What the round book asks its pump to do (actions), what a restarted pump hands it (`Recovered`), and the
two wire messages built from its rows (`plan_message`, `result_message`). No state, no I/O.

A pump carries out a list of actions in order: `Persist` records are committed (one transaction per
batch) before anything is acked or published; `Publish` goes out after the commit; `WriteCheckpoint`
after that; `Duplicate` and `Dropped` are metrics only.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from coordinator.records import ClientRow, PlanRow, Record, ResultRow, UpdateRow
from coordinator.sampling import wire_steps
from shared.messages import CheckpointChunk, ErrorMsg, Replay, RoundPlan, RoundResult, RunState


@dataclass(frozen=True)
class Publish:
    """Send `message`: to=None broadcasts it (plan or result), to=client sends it on `to/{client}`."""

    message: RoundPlan | RoundResult | Replay | CheckpointChunk | ErrorMsg | RunState
    to: str | None = None


@dataclass(frozen=True)
class Persist:
    """Make `record` durable (before acking the messages of the batch and before publishing)."""

    record: Record


@dataclass(frozen=True)
class WriteCheckpoint:
    """Write the values after `round` as a sparse checkpoint (every `checkpoint_every` rounds)."""

    round: int
    values: torch.Tensor


@dataclass(frozen=True)
class Duplicate:
    """A re-sent update (same client, round and msg_id) was ignored."""

    client: str
    round: int
    msg_id: int


@dataclass(frozen=True)
class Dropped:
    """A client message dropped unanswered (rate limit, reply budget): a metric, nothing is stored."""

    client: str
    kind: str
    reason: str


Action = Publish | Persist | WriteCheckpoint | Duplicate | Dropped


@dataclass(frozen=True)
class Recovered:
    """What a restarted coordinator hands the book (coordinator/recovery.py reads it from the event log)."""

    values: torch.Tensor  # after last_round
    last_round: int
    open_plan: PlanRow | None = None
    plans: tuple[PlanRow, ...] = ()  # the last LATE_WINDOW rounds' plans + those of pending late updates
    pending: tuple[UpdateRow, ...] = ()  # the open round's accepted updates + late updates not yet folded
    stored: dict[tuple[str, int], int] = field(default_factory=dict)  # (client, round) -> msg_id, same rounds
    results: tuple[ResultRow, ...] = ()  # the newest results (at least the last replay_max), round order
    clients: tuple[ClientRow, ...] = ()
    limited: dict[str, int] = field(default_factory=dict)  # MEERKAT-VP flags: client -> round flagged
    gradip: Iterable[tuple[str, int, Sequence[float]]] = ()  # logged GradIP, insertion order
    drift_steps: dict[str, int] = field(default_factory=dict)  # logged MEERKAT-VP step count per client
    lr_state: dict[str, Any] | None = None  # the step-size controller's, after last_round (coordinator/lrctl.py)


def plan_message(p: PlanRow, fleet: str, fingerprint: str, mask_id: str) -> RoundPlan:
    """The wire plan of `p`: a compact plan (p.sample_max set) lists only its exceptions (coordinator/sampling.py)."""
    return RoundPlan(
        fleet=fleet, round=p.round, seeds=p.seeds, lr=p.lr, eps=p.eps, dist=p.dist, steps=wire_steps(p),
        base_round=p.base_round, deadline=p.deadline, fingerprint=fingerprint, mask_id=mask_id,
        batch_size=p.batch_size, values_checksum=p.base_checksum, sample_max=p.sample_max,
    )  # fmt: skip


def result_message(r: ResultRow) -> RoundResult:
    return RoundResult(r.round, r.seeds, r.scalars, r.lr, r.dist, r.n_clients, r.values_checksum)
