"""What the client's round core asks its pump to do: the action types `ClientRounds` returns.

Each action is a request the pump (edge_client/service/client.py over MQTT and SQLite, bench/inproc.py in
memory) carries out in order before the next event; `docs/ARCHITECTURE.md` "edge_client" lists who does
what with each. The types carry values only: no I/O, no clock.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeAlias

import torch

from edge_client.engine.spsa import StepResult
from edge_client.privacy import DpStep
from shared.accountant import Spend
from shared.messages import Update
from shared.prng import Dist

EXIT_MISMATCH = 6  # `meerkat client` exit status: the fleet runs another model / mask / quantization


@dataclass(frozen=True)
class SendJoin:
    """Publish Join(fingerprint, mask_id, n_samples, budget, capabilities, last_round) on join/{client}."""

    last_round: int


@dataclass(frozen=True)
class SendSync:
    """Publish SyncRequest(have_round) on sync/{client}."""

    have_round: int


@dataclass(frozen=True, eq=False)
class LoadValues:
    """Load `values` (CPU fp32 (nnz,)) into the trainer's side-car buffer: the start of a local path."""

    values: torch.Tensor


@dataclass(frozen=True)
class TrainStep:
    """Run SPSA step `step` of `round` on the trainer's buffer (Trainer.step), then call step_done()."""

    round: int
    msg_id: int
    step: int
    seed: int
    eps: float
    lr: float
    dist: Dist
    batch_size: int
    data_pointer: int  # the batch starts here
    dp: DpStep | None = None  # a DP fleet: the private step's parameters (edge_client/privacy.py)


@dataclass(frozen=True)
class SaveStep:
    """Persist a finished step (StateStore.record_step) so a restart resumes after it."""

    round: int
    msg_id: int
    step: int
    result: StepResult
    data_pointer: int  # after this step


@dataclass(frozen=True)
class QueueUpdate:
    """The round is trained: in ONE transaction queue `update` in the outbox, move the data pointer to
    `data_pointer` and mark (update.round, update.msg_id) trained (StateStore.finish_training); then
    publish it on up/{client} (QoS1) and keep re-publishing until the round's result is committed."""

    update: Update
    data_pointer: int
    spend: Spend | None = None  # a DP fleet: what the update costs; charged in the same transaction


@dataclass(frozen=True)
class ResendUpdates:
    """Publish every queued Update again now (Outbox.reconnected): a result is overdue, or the plan of a
    round we answered was re-published, so the coordinator may not hold an Update the broker acknowledged
    (e.g. a broker restart that dropped its session); it dedupes on (client, round, msg_id), so a copy it
    already holds costs nothing."""


@dataclass(frozen=True, eq=False)
class Commit:
    """Make `values` the values at `round` (StateStore.commit_round); this also drops saved steps and
    outbox rows of rounds <= round. round -1 with v_0 is the reset after a checksum mismatch."""

    round: int
    values: torch.Tensor
    checksum: str


@dataclass(frozen=True)
class DropRound:
    """The round closed before we finished training it (the Commit before this one already dropped its
    saved steps; the data pointer did not move). Nothing to persist: for logs and simulators."""

    round: int
    steps_done: int
    steps: int


@dataclass(frozen=True)
class Exit:
    """This device cannot take part in its fleet (the coordinator refused its Join and the evidence says the
    refusal is real): stop the service with exit status `code` (EXIT_MISMATCH) and print `reason`, which
    names what the device holds, what the fleet runs and how to fix it. Restarting would not help."""

    code: int
    reason: str


@dataclass(frozen=True)
class DropQueued:
    """The coordinator refused the queued Update of `round` for good (UNKNOWN_ROUND, CONFLICT, STALE_ROUND,
    NOT_IN_ROUND, BAD_UPDATE): delete its outbox row (Outbox.discard) so it is never re-sent."""

    round: int


@dataclass(frozen=True)
class SlowDown:
    """The coordinator said RATE_LIMITED: publish no outbox re-send for `seconds` (the core itself holds its
    SyncRequests and Joins back as long)."""

    seconds: float


Action: TypeAlias = (
    SendJoin | SendSync | LoadValues | TrainStep | SaveStep | QueueUpdate | ResendUpdates | Commit | DropRound
    | Exit | DropQueued | SlowDown
)

__all__ = [
    "Action",
    "Commit",
    "DropQueued",
    "DropRound",
    "EXIT_MISMATCH",
    "Exit",
    "LoadValues",
    "QueueUpdate",
    "ResendUpdates",
    "SaveStep",
    "SendJoin",
    "SendSync",
    "SlowDown",
    "TrainStep",
]
