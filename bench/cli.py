"""`meerkat bench <name>`, `meerkat tiny-model` and `meerkat demo`.

Each benchmark lives in its own module under `bench/` and exposes `add_parser(sub)`; a module listed
here whose file does not exist is skipped, so `--help` lists only what works.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

BENCHES = ("bench.wire", "bench.prng", "bench.step", "bench.learning")
TOP_LEVEL = ("bench.tinylm.cli", "bench.demo")


def register(sub: Any) -> None:
    bench = sub.add_parser("bench", help="benchmarks (print a JSON line last with --json)")
    bench_sub = bench.add_subparsers(dest="bench", metavar="NAME")
    bench.set_defaults(func=lambda args: (bench.print_help(), 2)[1])
    for name in BENCHES:
        if _available(name):
            importlib.import_module(name).add_parser(bench_sub)
    for name in TOP_LEVEL:
        if _available(name):
            importlib.import_module(name).add_parser(sub)


def _available(name: str) -> bool:
    """True when the module exists; modules land one by one while the project grows."""
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def print_json_last(result: dict[str, Any]) -> None:
    """Benchmarks print human lines first and the JSON result as the very last line."""
    import json

    print(json.dumps(result, sort_keys=True))


__all__ = ["register", "print_json_last"]
