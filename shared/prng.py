"""Counter-based direction stream: value i of seed s is a pure function of (s, i), identical on every device.

Algorithm (normative text in docs/PROTOCOL.md):
    key   = mix64(seed)
    u_i   = mix64(key + (i + 1) * GOLDEN)          (all arithmetic mod 2**64)
    mix64 = the splitmix64 finaliser (xor-shift 30, mul, xor-shift 27, mul, xor-shift 31)
    rademacher: z_i = +1 if the top bit of u_i is 0 else -1
    gaussian:   z_i = GAUSS_TABLE[u_i >> 48]  (65536 float32 normal quantiles, see shared/gaussian.py)
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

Dist = Literal["rademacher", "gaussian"]
DISTS: tuple[str, ...] = ("rademacher", "gaussian")

MASK64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15
MUL1 = 0xBF58476D1CE4E5B9
MUL2 = 0x94D049BB133111EB


def mix64(x: int) -> int:
    """splitmix64 finaliser on one Python int (reference implementation, used for keys)."""
    x &= MASK64
    x = ((x ^ (x >> 30)) * MUL1) & MASK64
    x = ((x ^ (x >> 27)) * MUL2) & MASK64
    return x ^ (x >> 31)


def derive_seed(master: int, *path: int) -> int:
    """A seed for (master, path...), e.g. derive_seed(master, round, step): a tree of independent streams."""
    s = mix64(master)
    for p in path:
        s = mix64(s ^ mix64(p + GOLDEN))
    return s


def _check(seed: int, n: int, offset: int) -> None:
    if not 0 <= seed <= MASK64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if offset < 0:
        raise ValueError(f"offset must be >= 0, got {offset}")


def raw_u64(seed: int, n: int, offset: int = 0) -> np.ndarray:
    """u_i for i in [offset, offset+n) as numpy uint64 (CPU reference path)."""
    _check(seed, n, offset)
    key = np.uint64(mix64(seed))
    i = np.arange(offset + 1, offset + n + 1, dtype=np.uint64)
    x = key + i * np.uint64(GOLDEN)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(MUL1)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(MUL2)
    return x ^ (x >> np.uint64(31))


def directions(
    seed: int, n: int, dist: Dist = "rademacher", *, device: str | torch.device = "cpu", offset: int = 0
) -> torch.Tensor:
    """float32 (n,) direction for `seed`; element i depends only on (seed, offset + i)."""
    if dist not in DISTS:
        raise ValueError(f"dist must be one of {DISTS}, got {dist!r}")
    u = raw_u64(seed, n, offset)
    if dist == "rademacher":
        z = 1.0 - 2.0 * (u >> np.uint64(63)).astype(np.float32)
    else:
        from shared.gaussian import gauss_table

        z = gauss_table()[(u >> np.uint64(48)).astype(np.int64)]
    return torch.from_numpy(np.ascontiguousarray(z, dtype=np.float32)).to(device)
