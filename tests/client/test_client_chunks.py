"""ChunkAssembler (edge_client/service/chunks.py): a checkpoint's chunks in any order -> its values, once
whole and valid; anything bad is rejected by name and dropped."""

from __future__ import annotations

import hashlib

import torch

from edge_client.service.chunks import MAX_CHECKPOINTS, ChunkAssembler, values_from_bytes
from shared.messages import CheckpointChunk

from roundkit import V0, chunks_of  # isort: skip


def assembler() -> tuple[ChunkAssembler, list[str]]:
    rejected: list[str] = []
    return ChunkAssembler(V0.numel(), lambda reason, detail: rejected.append(reason)), rejected


def test_chunks_in_any_order_give_the_values_once_whole() -> None:
    a, rejected = assembler()
    target = V0 * 3.0
    parts = chunks_of(target, 7, 100)
    assert len(parts) == 3 and all(a.add(ch) is None for ch in reversed(parts[1:]))
    got = a.add(parts[0])
    assert got is not None and torch.equal(got, target) and rejected == []
    assert a.add(parts[1]) is None  # done with round 7: a stray copy starts a new (incomplete) assembly


def test_a_bad_sha_a_wrong_size_or_nan_is_rejected() -> None:
    a, rejected = assembler()
    (one,) = chunks_of(V0 * 2.0, 3, 4096)
    assert a.add(CheckpointChunk(3, 0, 1, "0" * 64, one.data)) is None
    short = CheckpointChunk(3, 0, 1, hashlib.sha256(b"abcd").hexdigest(), b"abcd")  # right sha, wrong size
    assert a.add(short) is None
    nan = torch.full_like(V0, float("nan")).numpy().astype("<f4").tobytes()
    assert a.add(CheckpointChunk(3, 0, 1, hashlib.sha256(nan).hexdigest(), nan)) is None
    assert rejected == ["checkpoint_bad"] * 3


def test_too_many_chunks_or_checkpoints_at_once_is_rejected() -> None:
    a, rejected = assembler()
    assert a.add(CheckpointChunk(3, 0, 5000, "ab" * 32, b"x")) is None and rejected == ["checkpoint_too_big"]
    for r in range(MAX_CHECKPOINTS + 1):  # first chunks of many different checkpoints: memory stays bounded
        a.add(chunks_of(V0 + r, r, 100)[0])
    assert rejected == ["checkpoint_too_big"] * 2


def test_values_from_bytes_reads_little_endian_fp32() -> None:
    raw = V0.numpy().astype("<f4").tobytes()
    got = values_from_bytes(raw)
    assert got.dtype == torch.float32 and torch.equal(got, V0)
