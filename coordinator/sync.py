"""What a SyncRequest is answered: a Replay of the missed results, or the values in checkpoint chunks.

Pure: the round book (`RoundBook.sync_reply`) passes its values, last round and kept results; the
admission budget (coordinator/admission.py) decides whether the answer is sent.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch

from coordinator.actions import Publish, result_message
from coordinator.checkpoint import value_chunks
from coordinator.records import ResultRow
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
