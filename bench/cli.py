"""`meerkat bench <name>`, `meerkat tiny-model` and `meerkat demo`.

Each benchmark is one module (`bench/wire.py`) or a folder's main module (`bench/learning/learning.py`),
and exposes `add_parser(sub)`.
"""

from __future__ import annotations

import argparse
import importlib
import json
from typing import Any

BENCHES = ("bench.wire", "bench.prng", "bench.step", "bench.learning.learning", "bench.fleet.fleet", "bench.chaos",
           "bench.privacy", "bench.guest.guest", "bench.attacks.cli")
TOP_LEVEL = ("bench.tinylm.cli", "bench.demo.demo")


def register(sub: Any) -> None:
    bench = sub.add_parser("bench", help="benchmarks (print a JSON line last with --json)")
    bench_sub = bench.add_subparsers(dest="bench", metavar="NAME")
    bench.set_defaults(func=lambda args: (bench.print_help(), 2)[1])
    for name in BENCHES:
        importlib.import_module(name).add_parser(bench_sub)
    for name in TOP_LEVEL:
        importlib.import_module(name).add_parser(sub)


def add_defaults(p: argparse.ArgumentParser, defaults: object, *flags: tuple[str, str, str]) -> None:
    """One option per (flag, field, help): its default and type come from `field` of the benchmark's
    frozen config (`defaults`), and the help ends with "(default X)", so no block repeats default=d.x."""
    for flag, name, text in flags:
        value = getattr(defaults, name)
        p.add_argument(flag, type=type(value), default=value, help=f"{text} (default {value})")


def add_json_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the JSON result as the last line")


def print_json_last(result: dict[str, Any]) -> None:
    """Benchmarks print human lines first and the JSON result as the very last line."""
    print(json.dumps(result, sort_keys=True))
