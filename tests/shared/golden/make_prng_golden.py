"""Regenerate prng_v1.json from the pure-Python reference (`u64_at`) and the shipped Gaussian table.

Run only when the algorithm is changed on purpose (it never should be: clients in the field depend on
it): `.venv/bin/python tests/shared/golden/make_prng_golden.py`. The tests compare every fast path to
the committed file, not to this script.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from shared.gaussian import gauss_table
from shared.prng import derive_seed, mix64, u64_at

SEEDS = [0, 1, 42, 0x0123456789ABCDEF, 1 << 63, (1 << 64) - 1]
OFFSETS = [0, 7, 1 << 32, (1 << 40) + 12345, (1 << 64) - 9]
N = 8


def f32_hex(x: float) -> str:
    return struct.pack("<f", x).hex()


def main() -> None:
    table = gauss_table()
    cases = []
    for seed in SEEDS:
        for offset in OFFSETS:
            us = [u64_at(seed, offset + j) for j in range(N)]
            cases.append(
                {
                    "seed": str(seed),
                    "offset": str(offset),
                    "u64": [f"{u:016x}" for u in us],
                    "rademacher": [1.0 if u >> 63 == 0 else -1.0 for u in us],
                    "gaussian_f32_hex": [f32_hex(float(table[u >> 48])) for u in us],
                }
            )
    derived = [
        {"master": str(m), "path": [str(p) for p in path], "seed": str(derive_seed(m, *path))}
        for m, path in [(0, ()), (42, (0,)), (42, (0, 1)), (42, (3, 9)), ((1 << 64) - 1, (1 << 32, 5))]
    ]
    mixes = {str(x): f"{mix64(x):016x}" for x in (0, 1, 42, (1 << 64) - 1)}
    out = {"version": 1, "n": N, "cases": cases, "derive_seed": derived, "mix64": mixes}
    path = Path(__file__).with_name("prng_v1.json")
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
