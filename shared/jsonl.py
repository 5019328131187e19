"""The one JSONL reader: one JSON object per line, blank lines skipped, errors naming `file:line`.

Used for client data (shared/dataset.py), calibration text (coordinator/mask/builder.py) and the bench
task files (bench/tinylm/tasks.py). What a row must contain is the caller's rule: this module only
guarantees that each yielded row is a JSON object and says where it came from.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class JsonlError(ValueError):
    """A line that is not one JSON object; the message starts with `file:line:`."""


def parse_jsonl(text: str, source: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, row) for every non-blank line of `text`; `source` names it in errors (a path)."""
    # "\n" only: str.splitlines would also split at U+2028 and friends, which JSON allows unescaped in strings
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise JsonlError(f"{source}:{lineno}: not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise JsonlError(f"{source}:{lineno}: expected a JSON object, got {type(row).__name__}")
        yield lineno, row


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, row) for every non-blank line of the UTF-8 file at `path` (OSError if unreadable)."""
    p = Path(path)
    return parse_jsonl(p.read_text(encoding="utf-8"), str(p))
