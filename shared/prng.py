"""Counter-based direction stream: value i of seed s is a pure function of (s, i), identical on every device.

Algorithm (normative text and a worked example in docs/PROTOCOL.md):
    key   = mix64(seed)
    u_i   = mix64(key + (i + 1) * GOLDEN)          (all arithmetic mod 2**64)
    mix64 = the splitmix64 finaliser (xor-shift 30, mul, xor-shift 27, mul, xor-shift 31)
    rademacher: z_i = +1 if the top bit of u_i is 0 else -1
    gaussian:   z_i = GAUSS_TABLE[u_i >> 48]  (65536 float32 normal quantiles, see shared/gaussian.py)

The last xor-shift of mix64 (by 31) never changes the top 31 bits, so the fast paths stop before it:
both distributions read only the top 16 bits. Three implementations give the same bits:
  - `u64_at` (pure Python, the reference), `raw_u64` (numpy, whole array, full mix64),
  - the CPU fast path (numpy, cache-sized chunks, in-place), used by `directions(device="cpu")`,
  - the torch path (int64 with logical shifts emulated by masking; wraps mod 2**64 like uint64),
    used for any other device so CUDA generates on the GPU.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Literal

import numpy as np

if TYPE_CHECKING:  # torch is imported where a tensor is made: what only draws numbers (the fleet simulator,
    import torch  # the codec's DISTS) does not pay its ~2 s and ~250 MiB

Dist = Literal["rademacher", "gaussian"]
DISTS: tuple[Dist, ...] = ("rademacher", "gaussian")

MASK64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15
MUL1 = 0xBF58476D1CE4E5B9
MUL2 = 0x94D049BB133111EB
_CHUNK = 1 << 15  # values per chunk of the CPU fast path: 256 KiB of uint64, stays in L2


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


def u64_at(seed: int, i: int) -> int:
    """u_i of stream `seed` as a Python int: the one-value reference implementation."""
    _check(seed, 1, i)
    return mix64((mix64(seed) + (i + 1) * GOLDEN) & MASK64)


def _check(seed: int, n: int, offset: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed <= MASK64:
        raise ValueError(f"seed must be an int in [0, 2**64), got {seed!r}")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n must be an int >= 0, got {n!r}")
    if isinstance(offset, bool) or not isinstance(offset, (int, np.integer)) or offset < 0:
        raise ValueError(f"offset must be an int >= 0, got {offset!r}")
    if offset + n > MASK64:
        raise ValueError(f"offset + n must be <= 2**64 - 1, got {offset} + {n}")


def raw_u64(seed: int, n: int, offset: int = 0) -> np.ndarray:
    """u_i for i in [offset, offset+n) as numpy uint64 (whole-array reference path, full mix64)."""
    _check(seed, n, offset)
    key = np.uint64(mix64(seed))
    i = np.arange(n, dtype=np.uint64) + np.uint64((offset + 1) & MASK64)
    x = key + i * np.uint64(GOLDEN)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(MUL1)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(MUL2)
    return x ^ (x >> np.uint64(31))


@functools.lru_cache(maxsize=1)
def _ramp() -> np.ndarray:
    r = np.arange(_CHUNK, dtype=np.uint64) * np.uint64(GOLDEN)
    r.setflags(write=False)
    return r


def _cpu_directions(seed: int, n: int, dist: Dist, offset: int) -> np.ndarray:
    """Fast CPU path: chunks of _CHUNK values, all ops in place on two scratch buffers."""
    from shared.gaussian import gauss_table

    key = mix64(seed)
    out = np.empty(n, dtype=np.float32)
    out_bits = out.view(np.uint32)
    table = gauss_table() if dist == "gaussian" else None
    ramp = _ramp()
    x = np.empty(min(n, _CHUNK), dtype=np.uint64)
    tmp = np.empty_like(x)
    m1, m2 = np.uint64(MUL1), np.uint64(MUL2)
    s30, s27 = np.uint64(30), np.uint64(27)
    sign, one = np.uint32(0x80000000), np.uint32(0x3F800000)
    for start in range(0, n, _CHUNK):
        c = min(_CHUNK, n - start)
        xs, ts = x[:c], tmp[:c]
        np.add(ramp[:c], np.uint64((key + (offset + 1 + start) * GOLDEN) & MASK64), out=xs)
        np.right_shift(xs, s30, out=ts)
        np.bitwise_xor(xs, ts, out=xs)
        np.multiply(xs, m1, out=xs)
        np.right_shift(xs, s27, out=ts)
        np.bitwise_xor(xs, ts, out=xs)
        np.multiply(xs, m2, out=xs)  # top 31 bits now equal those of u_i
        if table is None:  # float32 +-1.0 = 0x3F800000 with the sign bit of u_i
            hi = xs.view(np.uint32)[1::2] if _LITTLE else xs.view(np.uint32)[0::2]
            o = out_bits[start : start + c]
            np.bitwise_and(hi, sign, out=o)
            np.bitwise_or(o, one, out=o)
        else:
            top16 = xs.view(np.uint16)[3::4] if _LITTLE else xs.view(np.uint16)[0::4]
            np.take(table, top16, out=out[start : start + c])
    return out


_LITTLE = np.little_endian


def _signed(v: int) -> int:
    """The int64 with the same bit pattern as uint64 `v`."""
    return v - (1 << 64) if v >= 1 << 63 else v


def _srl(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns: arithmetic shift, then clear the copied sign bits."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def _torch_directions(seed: int, n: int, dist: Dist, offset: int, device: torch.device) -> torch.Tensor:
    """Same bits as the CPU path, computed with int64 torch ops on `device` (wrapping multiply)."""
    import torch

    key = mix64(seed)
    x = torch.arange(n, dtype=torch.int64, device=device)
    x.mul_(_signed(GOLDEN)).add_(_signed((key + (offset + 1) * GOLDEN) & MASK64))
    x.bitwise_xor_(_srl(x, 30)).mul_(_signed(MUL1))
    x.bitwise_xor_(_srl(x, 27)).mul_(_signed(MUL2))
    if dist == "rademacher":
        return (x >> 63).to(torch.float32).mul_(2.0).add_(1.0)  # sign bit set: -1*2+1 = -1, else +1
    from shared.gaussian import gauss_table_torch

    table = gauss_table_torch(str(device))
    return table[_srl(x, 48)]


def directions(
    seed: int, n: int, dist: Dist = "rademacher", *, device: str | torch.device = "cpu", offset: int = 0
) -> torch.Tensor:
    """float32 (n,) direction for `seed` on `device`; element i depends only on (seed, offset + i)."""
    if dist not in DISTS:
        raise ValueError(f"dist must be one of {DISTS}, got {dist!r}")
    import torch

    _check(seed, n, offset)
    dev = torch.device(device)
    if dev.type == "cpu":
        return torch.from_numpy(_cpu_directions(int(seed), int(n), dist, int(offset)))
    return _torch_directions(int(seed), int(n), dist, int(offset), dev)


__all__ = ["DISTS", "Dist", "GOLDEN", "MASK64", "derive_seed", "directions", "mix64", "raw_u64", "u64_at"]
