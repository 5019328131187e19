"""Checkpoint reassembly: CheckpointChunks (answers to a SyncRequest, any order) in, whole values out.

`ChunkAssembler.add(chunk)` returns the checkpoint's values once its last chunk arrived and the whole
passed the checks (size = 4 * nnz bytes, its sha256, finite), else None. A bad or oversized checkpoint is
handed to `reject(reason, detail)` (the round core counts and logs it) and dropped; the device then asks
again at its next SyncRequest.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import numpy as np
import torch

from shared.messages import CheckpointChunk

MAX_CHUNKS = 4096  # chunks of one checkpoint (coordinator chunk_bytes >= 1 KiB: a 4 MiB buffer at least)
MAX_CHECKPOINTS = 4  # checkpoints being reassembled at once (e.g. answers to repeated SyncRequests)


def values_from_bytes(raw: bytes) -> torch.Tensor:
    """Raw little-endian fp32 bytes (a checkpoint, a values file) -> CPU fp32 tensor (nnz,)."""
    return torch.from_numpy(np.frombuffer(raw, dtype="<f4").astype(np.float32))


class ChunkAssembler:
    """The chunks of the checkpoints being received, keyed by (round, sha256)."""

    def __init__(self, nnz: int, reject: Callable[[str, str], None]) -> None:
        self.nnz = nnz
        self._reject = reject
        self._parts: dict[tuple[int, str], dict[int, bytes]] = {}

    def add(self, ch: CheckpointChunk) -> torch.Tensor | None:
        """Keep `ch`; the values (CPU fp32 (nnz,)) when it completes a valid checkpoint, else None."""
        parts = self._parts.setdefault((ch.round, ch.sha256), {})
        if ch.total > MAX_CHUNKS or len(self._parts) > MAX_CHECKPOINTS:
            self._parts.clear()
            self._reject("checkpoint_too_big", f"round {ch.round}: {ch.total} chunks")
            return None
        parts[ch.index] = ch.data
        if len(parts) < ch.total:
            return None
        data = b"".join(parts[i] for i in range(ch.total))
        del self._parts[(ch.round, ch.sha256)]
        if len(data) != 4 * self.nnz or hashlib.sha256(data).hexdigest() != ch.sha256:
            self._reject("checkpoint_bad", f"round {ch.round}: {len(data)} bytes, sha256 mismatch or wrong size")
            return None
        values = values_from_bytes(data)
        if not bool(torch.isfinite(values).all()):
            self._reject("checkpoint_bad", f"round {ch.round}: non-finite values")
            return None
        return values


__all__ = ["MAX_CHECKPOINTS", "MAX_CHUNKS", "ChunkAssembler", "values_from_bytes"]
