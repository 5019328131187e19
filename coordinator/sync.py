"""How devices catch up: what a SyncRequest is answered (a Replay of the missed results, or the values in
checkpoint chunks), and the re-send grace after the coordinator's own link reconnected.

Pure: the round book (`RoundBook.sync_reply`, `RoundBook.reconnected`) passes its state; the admission
budget (coordinator/admission.py) decides whether an answer is sent.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterable
from dataclasses import replace

import torch

from coordinator.actions import Publish, result_message
from coordinator.checkpoint import value_chunks
from coordinator.records import EventRecord, PlanRow, Record, ReplanRecord, ResultRow
from shared.apply import values_checksum
from shared.codec import encode
from shared.messages import CheckpointChunk, Replay

log = logging.getLogger(__name__)


def sync_messages(
    client: str, have_round: int, values: torch.Tensor, last_round: int, results: Iterable[ResultRow],
    replay_max: int, chunk_bytes: int,
) -> list[Publish]:
    """Replay of the missed results when at most replay_max behind (empty when up to date), else the
    values after `last_round` in checkpoint chunks (also for a client ahead of us, or a Replay over the
    payload limit)."""
    behind = last_round - have_round
    if 0 <= behind <= replay_max:
        missed = [r for r in results if r.round > have_round]
        if len(missed) == behind:
            replay = Replay(tuple(result_message(r) for r in missed))
            try:
                encode(replay)
                return [Publish(replay, to=client)]
            except ValueError as exc:
                log.info("replay for %s too large (%s): sending a checkpoint", client, exc)
    checksum = values_checksum(values)
    chunks = value_chunks(values, chunk_bytes)
    log.info("sending %s the values of round %d in %d chunks (it has round %d)", client, last_round, len(chunks),
             have_round)  # fmt: skip
    return [
        Publish(CheckpointChunk(last_round, i, len(chunks), checksum, data), to=client)
        for i, data in enumerate(chunks)
    ]


def resend_grace(plan: PlanRow, accepted: Collection[str], now: float, grace_s: float) -> tuple[PlanRow, list[Record]]:
    """After the coordinator's link (re)connected the broker may have lost the Updates it PUBACKed to devices
    while we were away; a device that answered the open round sends its kept Update again on seeing the plan
    (docs/PROTOCOL.md "Delivery"). A deadline due sooner than now + `grace_s` while updates are missing is
    moved there, so those re-sends count on time: the new plan and its records (persisted like an extension,
    not counted as one); the plan itself and no record when nothing moves."""
    grace = now + grace_s
    if plan.deadline >= grace or set(accepted) == set(plan.steps):
        return plan, []
    new = replace(plan, deadline=grace)
    log.info("round %d: link reconnected, deadline moved to now + %.0f s for re-sent updates", plan.round, grace_s)
    return new, [
        ReplanRecord(plan.round, dict(plan.steps), new.deadline, plan.extensions, plan.sample_max),
        EventRecord("reconnect", f"{len(accepted)} of {len(plan.steps)} updates held; plan re-published for re-sends",
                    plan.round, now),
    ]  # fmt: skip
