"""Sparse checkpoints: the side-car values after a round, as one small safetensors file.

    {state_dir}/checkpoints/values-r{round:08d}.safetensors
        tensor  values  float32 (nnz,)
        metadata meerkat.round, meerkat.values_checksum, meerkat.mask_id, meerkat.fingerprint

Written atomically (tmp file, fsync, rename, fsync dir) so a kill -9 leaves either the old set or the
new file complete. On restart the newest checkpoint whose checksum verifies is the starting point;
the logged results after it are replayed with `shared.apply.apply_round`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save as st_save

from coordinator.eventlog import EventLog
from shared.apply import apply_round, values_checksum
from shared.fsio import atomic_write, private_dir

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable, for another mask/model, or fails its checksum."""


@dataclass(frozen=True)
class Checkpoint:
    round: int
    values: torch.Tensor  # float32 (nnz,)
    checksum: str


def checkpoint_path(state_dir: Path, round: int) -> Path:
    return state_dir / "checkpoints" / f"values-r{round:08d}.safetensors"


def write_checkpoint(path: Path, round: int, values: torch.Tensor, mask_id: str, fingerprint: str) -> str:
    """Atomically write `values` (after `round`); returns its checksum."""
    checksum = values_checksum(values)
    data = st_save(
        {"values": values.detach().to("cpu").contiguous()},
        metadata={
            "meerkat.round": str(round),
            "meerkat.values_checksum": checksum,
            "meerkat.mask_id": mask_id,
            "meerkat.fingerprint": fingerprint,
        },
    )
    private_dir(path.parent)
    atomic_write(path, data)
    return checksum


def read_checkpoint(path: Path, mask_id: str, fingerprint: str, nnz: int) -> Checkpoint:
    """Read and verify a checkpoint; raises CheckpointError saying what is wrong."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            values = f.get_tensor("values")
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise CheckpointError(f"checkpoint {path} is unreadable: {exc}") from exc
    for key, want in (("meerkat.mask_id", mask_id), ("meerkat.fingerprint", fingerprint)):
        if meta.get(key) != want:
            raise CheckpointError(f"checkpoint {path}: {key} is {meta.get(key)!r}, expected {want!r}")
    if values.dtype != torch.float32 or tuple(values.shape) != (nnz,):
        raise CheckpointError(
            f"checkpoint {path}: values are {values.dtype} {tuple(values.shape)}, expected float32 ({nnz},)"
        )
    checksum = values_checksum(values)
    if checksum != meta.get("meerkat.values_checksum"):
        raise CheckpointError(f"checkpoint {path}: checksum mismatch (file corrupt)")
    try:
        round = int(meta["meerkat.round"])
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path}: metadata meerkat.round missing or not an int") from exc
    return Checkpoint(round, values, checksum)


def value_chunks(values: torch.Tensor, chunk_bytes: int) -> list[bytes]:
    """The little-endian fp32 bytes of `values` cut into pieces of at most chunk_bytes (>= 1 piece)."""
    raw = values.detach().to("cpu").contiguous().numpy().astype("<f4", copy=False).tobytes()
    step = max(4, chunk_bytes - chunk_bytes % 4)
    return [raw[i : i + step] for i in range(0, len(raw), step)] or [b""]


def rebuild_values(
    events: EventLog, v0: torch.Tensor, mask_id: str, fingerprint: str
) -> tuple[torch.Tensor, int]:
    """(values, round) after the last logged result: newest verified checkpoint + replay of later results.

    Every replayed round's checksum is compared with the logged one: a mismatch means the log or the
    apply function changed, and is an error rather than a silent fork of the fleet.
    """
    values, start = v0.clone(), -1
    for round, path, _ in events.checkpoints():
        try:
            ck = read_checkpoint(Path(path), mask_id, fingerprint, int(v0.numel()))
        except CheckpointError as exc:
            log.warning("skipping checkpoint of round %d: %s", round, exc)
            continue
        values, start = ck.values, ck.round
        break
    results = events.results(after=start)
    if results and results[0].round != start + 1:
        raise RuntimeError(
            f"the log's results start at round {results[0].round} (older ones were pruned by retain_rounds) but "
            f"no checkpoint of round {results[0].round - 1} or later verifies: restore one of the checkpoint "
            f"files listed by the log, or start a fresh state_dir"
        )
    for r in results:
        values = apply_round(values, r.seeds, r.scalars, r.lr, r.dist)
        if values_checksum(values) != r.values_checksum:
            raise RuntimeError(f"replaying round {r.round} from the log gives another checksum: log corrupt")
    last = results[-1].round if results else start
    if results or start >= 0:
        log.info("values at round %d rebuilt (checkpoint %d + %d logged results)", last, start, len(results))
    return values, last


def keep_checkpoint(
    events: EventLog, state_dir: Path, round: int, values: torch.Tensor, mask_id: str, fingerprint: str, keep: int,
    now: float,
) -> Path:
    """Write the checkpoint of `round`, log it, and delete all but the newest `keep` (log rows, then files)."""
    path = checkpoint_path(state_dir, round)
    checksum = write_checkpoint(path, round, values, mask_id, fingerprint)
    with events.transaction():
        events.add_checkpoint(round, str(path), checksum, now)
        old = events.checkpoints()[keep:]
        for r, _p, _ in old:
            events.remove_checkpoint(r)
    for _, p, _ in old:
        Path(p).unlink(missing_ok=True)
    log.info("checkpoint of round %d written: %s", round, path)
    return path
