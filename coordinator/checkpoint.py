"""Sparse checkpoints: the side-car values after a round, as one small safetensors file.

    {state_dir}/checkpoints/values-r{round:08d}.safetensors
        tensor  values  float32 (nnz,)
        metadata meerkat.round, meerkat.values_checksum, meerkat.mask_id, meerkat.fingerprint

Written atomically (tmp file, fsync, rename, fsync dir) so a kill -9 leaves either the old set or the
new file complete. On restart the newest checkpoint whose checksum verifies is the starting point;
the logged results after it are replayed with `shared.apply.apply_round`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save as st_save

from shared.apply import values_checksum


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
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
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
