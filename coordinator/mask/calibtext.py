"""Calibration text for the mask builder: read .txt / JSONL files, pack their tokens into sequences.

    read_calibration(files)          -> documents per file + sha256          (raw text / JSONL)
    pack_sequences(tokenizer, ...)   -> (n_seqs, seq_len) int64 token ids     (round-robin over files)
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from coordinator.mask.select import MaskBuildError
from shared.jsonl import JsonlError, parse_jsonl

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CalibFile:
    """One calibration file: its documents in order and the sha256 of its bytes."""

    path: Path
    sha256: str
    documents: tuple[str, ...]


def _jsonl_document(path: Path, lineno: int, record: dict[str, Any]) -> str:
    if isinstance(record.get("text"), str):
        return str(record["text"])
    prompt, completion = record.get("prompt"), record.get("completion")
    if isinstance(prompt, str) and isinstance(completion, str):
        return prompt + completion
    raise MaskBuildError(f"{path}:{lineno}: needs a string 'text' field or string 'prompt' + 'completion'")


def read_calibration(path: str | Path) -> CalibFile:
    """Documents of one file: JSONL (`.jsonl`): one per record; text: paragraphs split on blank lines."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise MaskBuildError(f"calibration file {p}: cannot read ({exc.strerror})") from exc
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MaskBuildError(f"calibration file {p}: not UTF-8 text (byte {exc.start})") from exc
    if p.suffix.lower() in (".jsonl", ".ndjson"):
        try:
            docs = [_jsonl_document(p, i, row) for i, row in parse_jsonl(text, str(p))]
        except JsonlError as exc:
            raise MaskBuildError(str(exc)) from exc
    else:
        docs = [para.strip() for para in text.replace("\r\n", "\n").split("\n\n") if para.strip()]
    if not docs:
        raise MaskBuildError(f"calibration file {p}: contains no text")
    return CalibFile(p, hashlib.sha256(data).hexdigest(), tuple(docs))


@dataclass(frozen=True)
class Packed:
    """Token ids packed into fixed-length sequences and how many tokens each file contributed."""

    ids: torch.Tensor  # (n_seqs, seq_len) int64
    tokens_per_file: tuple[int, ...]


def _round_robin(files: Sequence[CalibFile]) -> Iterator[tuple[int, str]]:
    longest = max(len(f.documents) for f in files)
    for j in range(longest):
        for i, f in enumerate(files):
            if j < len(f.documents):
                yield i, f.documents[j]


def pack_sequences(
    encode: Callable[[str], list[int]],
    files: Sequence[CalibFile],
    n_seqs: int,
    seq_len: int,
    eos_id: int | None,
) -> Packed:
    """Documents (round-robin over files, eos between them) concatenated and cut into (n_seqs, seq_len)."""
    if n_seqs < 1 or seq_len < 2:
        raise MaskBuildError(f"need seqs >= 1 and seq-len >= 2, got seqs={n_seqs} seq-len={seq_len}")
    budget = n_seqs * seq_len
    stream: list[int] = []
    per_file = [0] * len(files)
    for i, doc in _round_robin(files):
        doc_ids = list(encode(doc)) + ([eos_id] if eos_id is not None else [])
        take = doc_ids[: budget - len(stream)]
        stream.extend(take)
        per_file[i] += len(take)
        if len(stream) >= budget:
            break
    n_full = len(stream) // seq_len
    if n_full == 0:
        names = ", ".join(str(f.path) for f in files)
        raise MaskBuildError(
            f"calibration text ({names}) has {len(stream)} tokens, fewer than one sequence of {seq_len}"
        )
    if n_full < n_seqs:
        log.warning(
            "calibration text gives only %d full sequences of %d tokens (asked for %d)",
            n_full,
            seq_len,
            n_seqs,
        )
        # the tokens of the dropped partial sequence came from the last files read; attribute them exactly
        extra = len(stream) - n_full * seq_len
        for i in reversed(range(len(files))):
            cut = min(extra, per_file[i])
            per_file[i] -= cut
            extra -= cut
    ids = torch.tensor(stream[: n_full * seq_len], dtype=torch.int64).view(n_full, seq_len)  # (N, L)
    return Packed(ids, tuple(per_file))


__all__ = ["CalibFile", "Packed", "pack_sequences", "read_calibration"]
