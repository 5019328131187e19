"""The one `meerkat` command.

Each room (edge_client, coordinator, bench) owns its subcommands in its own `cli.py`, which exposes
`register(subparsers)`. This module only collects them; it imports the rooms by name at run time so
`shared/` never depends on either side, and a device that installs only the client still gets a
working `meerkat` with just the client's subcommands.

What every subcommand gets from here: `-v/-q` before or after the subcommand (INFO progress by default,
`-v` debug, `-q` warnings only, `-qq` errors only), `--version`, a quiet exit on a closed pipe
(`meerkat status | head -3`) and known third-party start-up noise filtered (see NOISE).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence
from importlib import metadata

ROOMS = ("edge_client.cli", "coordinator.cli", "bench.cli")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for a writer whose reader went away

# (logger, text in the message): third-party lines that are expected here and tell an operator nothing;
# dropped unless -v (DEBUG). Matched by logger and text so any other warning of these libraries still shows.
NOISE: tuple[tuple[str, str], ...] = (
    # bitsandbytes on CPU tries an optional Hub kernel package at import and logs its absence every start
    ("bitsandbytes.backends.cpu.ops", "kernels-community"),
    # int8 matmul on float32 activations: the cast is what we want, logged on every forward
    ("bitsandbytes.autograd._functions", "inputs will be cast"),
)


def version() -> str:
    try:
        return metadata.version("meerkat-edge")
    except metadata.PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown (not installed)"


def _log_flags(p: argparse.ArgumentParser, suffix: str, default: object) -> None:
    p.add_argument("-v", "--verbose", action="count", dest=f"verbose{suffix}", default=default,
                   help="more log output (debug)")
    p.add_argument("-q", "--quiet", action="count", dest=f"quiet{suffix}", default=default,
                   help="less log output (-q: warnings, -qq: errors only)")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """Every room's subcommands; with `command` (the one about to run) the rooms are imported in ROOMS order
    only until one registered it: a name is registered once (argparse refuses a second), so the rooms after
    it cannot change how it parses, and `meerkat coordinator` does not import the benchmarks (~0.15 s of
    CPU at each start, ~0.5 % of a 10,000-device bench fleet run's coordinator CPU)."""
    parser = argparse.ArgumentParser(
        prog="meerkat",
        description="Federated sparse zeroth-order fine-tuning of quantized LLMs on edge devices.",
    )
    parser.add_argument("--version", action="version", version=f"meerkat-edge {version()}")
    _log_flags(parser, "", 0)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in ROOMS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # the room is not installed on this machine: skip its commands
                continue
            raise
        module.register(sub)
        if command is not None and command in sub.choices:
            break
    for p in sub.choices.values():  # the same flags after the subcommand: `meerkat coordinator -v ...`
        _log_flags(p, "_sub", 0)
    return parser


def log_level(args: argparse.Namespace) -> int:
    v = args.verbose + getattr(args, "verbose_sub", 0)
    q = args.quiet + getattr(args, "quiet_sub", 0)
    if v > 0:
        return logging.DEBUG
    return {0: logging.INFO, 1: logging.WARNING}.get(q, logging.ERROR)


def log_level_given(args: argparse.Namespace) -> bool:
    """True when -v/-q was given: it then wins over a config file's log_level."""
    return any(getattr(args, k, 0) for k in ("verbose", "verbose_sub", "quiet", "quiet_sub"))


class _NoiseFilter(logging.Filter):
    def __init__(self, needle: str) -> None:
        super().__init__()
        self.needle = needle

    def filter(self, record: logging.LogRecord) -> bool:
        return self.needle not in record.getMessage() or logging.getLogger().isEnabledFor(logging.DEBUG)


def filter_known_noise() -> None:
    for logger, needle in NOISE:
        lg = logging.getLogger(logger)
        if not any(isinstance(f, _NoiseFilter) and f.needle == needle for f in lg.filters):
            lg.addFilter(_NoiseFilter(needle))


def setup_logging(level: int) -> None:
    logging.basicConfig(level=level, format=LOG_FORMAT)
    logging.getLogger().setLevel(level)
    filter_known_noise()


def command_of(argv: Sequence[str]) -> str | None:
    """The subcommand `argv` names: its first word that is not an option (the top-level options take no
    value); None without one (`meerkat --help` lists them all)."""
    return next((a for a in argv if not a.startswith("-")), None)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser(command_of(sys.argv[1:] if argv is None else argv))
    args = parser.parse_args(argv)
    setup_logging(log_level(args))
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        rc = func(args)
        sys.stdout.flush()  # a closed pipe shows up here at the latest, inside the handler below
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # the reader went away (`| head`): stop quietly; stdout goes to devnull so the interpreter's own
        # flush at exit does not raise a second time
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
