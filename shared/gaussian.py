"""The shipped table of 65536 float32 standard-normal quantiles behind Gaussian directions.

    GAUSS_TABLE[j] = float32( Phi^-1((j + 0.5) / 65536) ),  j = 0..65535

computed once in float64 with Python's statistics.NormalDist and cast to float32 (round to nearest
even), stored little-endian in shared/data/gauss_table_v1.bin (262144 bytes). The file, not the
formula, is normative: every implementation loads these exact bytes. Its sha256 is pinned below and
checked on load; `build_table()` regenerates it (tests check it still matches).
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from statistics import NormalDist

import numpy as np
import torch

TABLE_SIZE = 65536
TABLE_FILE = Path(__file__).resolve().parent / "data" / "gauss_table_v1.bin"
TABLE_SHA256 = "1cfbba1e07e34386a57626f82aeb43e6ed54ba70a3ea6b7d964dc66a841074a8"


class GaussTableError(RuntimeError):
    """The shipped table file is missing or does not match its pinned checksum."""


def build_table() -> np.ndarray:
    """Recompute the table (float64 quantiles cast to float32); ~0.1 s."""
    nd = NormalDist()
    q = [nd.inv_cdf((j + 0.5) / TABLE_SIZE) for j in range(TABLE_SIZE)]
    return np.asarray(q, dtype=np.float64).astype("<f4")


def table_bytes(table: np.ndarray) -> bytes:
    return np.ascontiguousarray(table, dtype="<f4").tobytes()


@functools.lru_cache(maxsize=1)
def gauss_table() -> np.ndarray:
    """The shipped table as a read-only float32 numpy array (65536,), checksum-verified once."""
    try:
        raw = TABLE_FILE.read_bytes()
    except OSError as exc:
        raise GaussTableError(f"Gaussian table {TABLE_FILE} cannot be read: {exc}") from exc
    digest = hashlib.sha256(raw).hexdigest()
    if digest != TABLE_SHA256:
        raise GaussTableError(
            f"{TABLE_FILE}: sha256 {digest} != pinned {TABLE_SHA256}; reinstall the package"
        )
    table = np.frombuffer(raw, dtype="<f4").astype(np.float32)
    table.setflags(write=False)
    return table


@functools.lru_cache(maxsize=8)
def gauss_table_torch(device: str) -> torch.Tensor:
    """The table as a float32 tensor on `device` (cached per device string)."""
    return torch.from_numpy(gauss_table().copy()).to(device)


__all__ = [
    "TABLE_FILE",
    "TABLE_SHA256",
    "TABLE_SIZE",
    "GaussTableError",
    "build_table",
    "gauss_table",
    "gauss_table_torch",
]
