"""Subcommands owned by `edge_client/`: each module listed in SUBCOMMANDS exposes `register(subparsers)`."""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

SUBCOMMANDS: tuple[str, ...] = ("edge_client.service.cli",)


def register(sub: Any) -> None:
    for name in SUBCOMMANDS:
        try:
            found = importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:
            found = False
        if found:  # modules land one by one while the project grows; --help lists only what exists
            importlib.import_module(name).register(sub)
