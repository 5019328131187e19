"""`meerkat bench prng`: time to generate n directions (default 1M) and to apply a T-step round.

Target (issue 4): 1M directions on CPU in <= 20 ms on 2 cores. Reports best and median of --repeats.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from bench.cli import print_json_last
from shared.apply import apply_round
from shared.prng import DISTS, Dist, derive_seed, directions


def _times_ms(fn: Callable[[], Any], repeats: int, sync: Callable[[], None]) -> tuple[float, float]:
    fn()
    sync()
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        out.append((time.perf_counter() - start) * 1e3)
    return min(out), statistics.median(out)


def _generator(n: int, dist: Dist, device: torch.device) -> Callable[[], torch.Tensor]:
    """A fresh seed on every call, so no cache can help."""
    seeds = iter(range(1 << 62))
    return lambda: directions(next(seeds), n, dist, device=device)


def run(args: argparse.Namespace) -> int:
    device = torch.device(args.device)
    sync: Callable[[], None] = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    result: dict[str, Any] = {"n": args.n, "device": str(device), "torch_threads": torch.get_num_threads()}
    for dist in DISTS:
        best, med = _times_ms(_generator(args.n, dist, device), args.repeats, sync)
        result[f"{dist}_ms_best"] = round(best, 3)
        result[f"{dist}_ms_median"] = round(med, 3)
        print(f"{dist:10s} n={args.n}: best {best:.2f} ms, median {med:.2f} ms on {device}")
    values = torch.zeros(args.n, dtype=torch.float32)
    seeds_T = [derive_seed(1, t) for t in range(args.steps)]
    scalars = [0.1 * (t + 1) for t in range(args.steps)]
    best, med = _times_ms(
        lambda: apply_round(values, seeds_T, scalars, 1e-3, "gaussian"), max(1, args.repeats // 4), sync
    )
    result["apply_round_ms_best"] = round(best, 3)
    result["apply_round_steps"] = args.steps
    print(f"apply_round T={args.steps} n={args.n}: best {best:.1f} ms, median {med:.1f} ms (CPU, float64)")
    result["target_met"] = device.type != "cpu" or args.n != 1_000_000 or result["rademacher_ms_best"] <= 20
    if args.json:
        print_json_last(result)
    return 0


def add_parser(sub: Any) -> None:
    p = sub.add_parser("prng", help="direction generation speed (1M on CPU: target <= 20 ms)")
    p.add_argument("--n", type=int, default=1_000_000, help="directions per call")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--steps", type=int, default=10, help="T for the apply_round timing")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i] (generation runs on that device)")
    p.add_argument("--json", action="store_true", help="print the JSON result as the last line")
    p.set_defaults(func=run)


__all__ = ["add_parser", "run"]
