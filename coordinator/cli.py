"""Subcommands owned by `coordinator/`: each module listed in SUBCOMMANDS exposes `register(subparsers)`."""

from __future__ import annotations

import importlib
from typing import Any

SUBCOMMANDS: tuple[str, ...] = (
    "coordinator.server_cli", "coordinator.mask.cli", "coordinator.provision", "coordinator.evaluate_cli",
    "coordinator.run_cli",
)


def register(sub: Any) -> None:
    for name in SUBCOMMANDS:
        importlib.import_module(name).register(sub)
