"""`meerkat bench <name>`, `meerkat tiny-model` and `meerkat demo`.

Each benchmark lives in its own module under `bench/` and exposes `add_parser(sub)`.
"""

from __future__ import annotations

import importlib
import json
from typing import Any

BENCHES = ("bench.wire", "bench.prng", "bench.step", "bench.learning", "bench.fleet", "bench.chaos")
TOP_LEVEL = ("bench.tinylm.cli", "bench.demo")


def register(sub: Any) -> None:
    bench = sub.add_parser("bench", help="benchmarks (print a JSON line last with --json)")
    bench_sub = bench.add_subparsers(dest="bench", metavar="NAME")
    bench.set_defaults(func=lambda args: (bench.print_help(), 2)[1])
    for name in BENCHES:
        importlib.import_module(name).add_parser(bench_sub)
    for name in TOP_LEVEL:
        importlib.import_module(name).add_parser(sub)


def print_json_last(result: dict[str, Any]) -> None:
    """Benchmarks print human lines first and the JSON result as the very last line."""
    print(json.dumps(result, sort_keys=True))
