"""shared/jsonl.py: the one JSONL reader (client data, calibration text, bench task files)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shared.jsonl import JsonlError, parse_jsonl, read_jsonl


def test_rows_with_their_line_numbers_blank_lines_skipped(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a"}\n\n   \n{"text": "b", "label": 1}\r\n', encoding="utf-8")
    assert list(read_jsonl(path)) == [(1, {"text": "a"}), (4, {"text": "b", "label": 1})]


def test_a_line_separator_inside_a_string_is_not_a_line_break() -> None:
    row = {"text": "one\u2028two\x1cthree"}
    line = json.dumps(row, ensure_ascii=False)
    assert list(parse_jsonl(line + "\n" + line, "x.jsonl")) == [(1, row), (2, row)]


@pytest.mark.parametrize(
    "line, match",
    [("{not json", r"d.jsonl:2: not valid JSON"), ("[1, 2]", r"d.jsonl:2: expected a JSON object, got list"),
     ('"text"', r"d.jsonl:2: expected a JSON object, got str")],
)
def test_errors_name_file_and_line(tmp_path: Path, line: str, match: str) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"ok": 1}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(JsonlError, match=match):
        list(read_jsonl(path))


def test_a_missing_file_is_an_os_error(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        list(read_jsonl(tmp_path / "absent.jsonl"))
