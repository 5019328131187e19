"""Subcommands owned by `edge_client/`: each module listed in SUBCOMMANDS exposes `register(subparsers)`."""

from __future__ import annotations

import importlib
from typing import Any

SUBCOMMANDS: tuple[str, ...] = ("edge_client.service.cli",)


def register(sub: Any) -> None:
    for name in SUBCOMMANDS:
        importlib.import_module(name).register(sub)
