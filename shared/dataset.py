"""Client data: task config, JSONL rows -> tokenized examples, and a resumable shuffled stream.

Row formats (one JSON object per line; the kind is decided per row):
    {"text": "..."}                         language modelling: loss on every token after the first
    {"prompt": "...", "completion": "..."}  loss on the completion tokens only
    {"text": "...", "label": 1}             classification: prompt = template(text), completion =
                                            verbalizer[str(label)]; loss on those tokens only

Task file `task.json` (written by bench/tinylm/tasks.py; only `verbalizer` is required for labelled rows):
    {"name": "sst2-synth",                              free text
     "verbalizer": {"0": " negative", "1": " positive"}, label (as str) -> label word(s), with its space
     "template": "{text} Sentiment:",                   optional, default "{text}"; {text} is the row's text
     "max_length": 128}                                  optional, default 256 tokens; longer rows lose
                                                         prompt tokens from the left
Other keys are ignored.

Loss and accuracy over these examples live in shared.loss (moved from edge_client.engine so the
coordinator can evaluate its own values with the same code).

The stream: epoch e visits the examples in the permutation argsort(raw_u64(derive_seed(seed, e), n)),
so a client's whole position in its data is one (epoch, index) pair it can persist as a single int.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from shared.jsonl import JsonlError, read_jsonl
from shared.prng import derive_seed, raw_u64

log = logging.getLogger(__name__)


class DataError(ValueError):
    """Bad task config or data row; the message names the file, line and key."""


@dataclass(frozen=True)
class TaskConfig:
    """How labelled rows become prompt + completion (see module docstring for task.json)."""

    name: str = ""
    verbalizer: dict[str, str] | None = None
    template: str = "{text}"
    max_length: int = 256

    def __post_init__(self) -> None:
        if self.verbalizer is not None:
            if not isinstance(self.verbalizer, dict) or not self.verbalizer:
                raise DataError("task config 'verbalizer' must be a non-empty {label: word} object")
            for k, v in self.verbalizer.items():
                if not isinstance(k, str) or not isinstance(v, str) or not v:
                    raise DataError(f"task config 'verbalizer'[{k!r}] must map a str label to a non-empty str")
        if not isinstance(self.template, str) or "{text}" not in self.template:
            raise DataError(f"task config 'template' must be a str containing {{text}}, got {self.template!r}")
        if isinstance(self.max_length, bool) or not isinstance(self.max_length, int) or self.max_length < 2:
            raise DataError(f"task config 'max_length' must be an int >= 2, got {self.max_length!r}")


def load_task_config(path: str | Path) -> TaskConfig:
    """Read task.json (see module docstring); DataError names the bad key."""
    p = Path(path)
    try:
        raw = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{p}: cannot read task config: {exc}") from exc
    if not isinstance(raw, dict):
        raise DataError(f"{p}: task config must be a JSON object")
    known = {k: raw[k] for k in ("name", "verbalizer", "template", "max_length") if k in raw}
    try:
        return TaskConfig(**known)
    except DataError as exc:
        raise DataError(f"{p}: {exc}") from None


@dataclass(frozen=True)
class Example:
    """Token ids of prompt + completion; the last `n_target` ids are the loss targets."""

    input_ids: tuple[int, ...]
    n_target: int
    label: int | None = None  # index into Dataset.classes


@dataclass
class Dataset:
    examples: list[Example]
    pad_id: int
    classes: tuple[str, ...] | None = None  # verbalizer labels, in task order
    class_token_ids: tuple[int, ...] | None = None  # first token of each label word

    def __len__(self) -> int:
        return len(self.examples)

    def batch(self, indices: Sequence[int]) -> Batch:
        return Batch([self.examples[i] for i in indices], self)


@dataclass
class Batch:
    examples: list[Example]
    dataset: Dataset = field(repr=False)

    def __len__(self) -> int:
        return len(self.examples)


def load_jsonl(path: str | Path, tokenizer: Any, task_config: TaskConfig | None = None) -> Dataset:
    """Tokenize every row of a JSONL file (formats in the module docstring)."""
    task = task_config or TaskConfig()
    p = Path(path)
    try:
        rows = [row for _, row in read_jsonl(p)]
    except JsonlError as exc:
        raise DataError(str(exc)) from None
    return encode_rows(rows, tokenizer, task, source=str(p))


def encode_rows(rows: Sequence[dict[str, Any]], tokenizer: Any, task: TaskConfig, source: str = "<rows>") -> Dataset:
    classes = tuple(task.verbalizer) if task.verbalizer else None
    class_ids: tuple[int, ...] | None = None
    if task.verbalizer:
        class_ids = tuple(_ids(tokenizer, w, special=False)[0] for w in task.verbalizer.values())
        if len(set(class_ids)) != len(class_ids):
            raise DataError(f"verbalizer words {list(task.verbalizer.values())} share a first token: accuracy undefined")
    examples = [_encode(row, i + 1, tokenizer, task, classes, source) for i, row in enumerate(rows)]
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    log.info("%s: %d examples", source, len(examples))
    return Dataset(examples, int(pad), classes, class_ids)


def _ids(tokenizer: Any, text: str, special: bool) -> list[int]:
    ids = list(tokenizer(text, add_special_tokens=special)["input_ids"])
    if not special and not ids:
        raise DataError(f"{text!r} tokenizes to nothing")
    return ids


def _encode(
    row: dict[str, Any], line: int, tok: Any, task: TaskConfig, classes: tuple[str, ...] | None, source: str
) -> Example:
    where = f"{source}:{line}"
    label: int | None = None
    if "label" in row:
        if task.verbalizer is None or classes is None:
            raise DataError(f"{where}: row has 'label' but the task config has no verbalizer")
        key = str(row["label"])
        if key not in task.verbalizer:
            raise DataError(f"{where}: label {row['label']!r} not in verbalizer {list(task.verbalizer)}")
        prompt, completion, label = task.template.format(text=_str(row, "text", where)), task.verbalizer[key], classes.index(key)
    elif "prompt" in row or "completion" in row:
        prompt, completion = _str(row, "prompt", where), _str(row, "completion", where)
    elif "text" in row:
        prompt, completion = "", _str(row, "text", where)
    else:
        raise DataError(f"{where}: row needs 'text', 'prompt'+'completion' or 'text'+'label'; has {sorted(row)}")
    head = _ids(tok, prompt, special=True)
    tail = _ids(tok, completion, special=False) if completion else []
    tail = tail[: task.max_length - 1]
    head = head[max(0, len(head) + len(tail) - task.max_length) :]
    ids = head + tail
    n_target = min(len(tail), len(ids) - 1)
    if n_target < 1:
        raise DataError(f"{where}: nothing to predict (prompt {len(head)} + completion {len(tail)} tokens)")
    return Example(tuple(ids), n_target, label)


def _str(row: dict[str, Any], key: str, where: str) -> str:
    value = row.get(key)
    if not isinstance(value, str):
        raise DataError(f"{where}: {key!r} must be a string, got {type(value).__name__}")
    return value


# --- resumable shuffled stream -----------------------------------------------------------------------


@dataclass
class DataPointer:
    """Where a client is in its data: epoch and position inside that epoch's permutation."""

    epoch: int = 0
    index: int = 0


class DataStream:
    """Endless epochs over n examples; epoch e is the permutation argsort(raw_u64(derive_seed(seed, e), n)).

    The state is just `pointer` (epoch, index): persist it, rebuild with the same (n, seed), go on.
    """

    def __init__(self, n: int, seed: int, pointer: DataPointer | None = None, shuffle: bool = True) -> None:
        if n <= 0:
            raise DataError(f"DataStream needs at least one example, got n={n}")
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self.pointer = pointer or DataPointer()
        if self.pointer.epoch < 0 or self.pointer.index < 0:
            raise DataError(f"data pointer must be >= 0, got epoch {self.pointer.epoch} index {self.pointer.index}")
        if self.pointer.index > n:
            raise DataError(f"data pointer index {self.pointer.index} > dataset size {n}")
        self._order_epoch = -1
        self._order: np.ndarray = np.arange(n)

    def order(self, epoch: int) -> np.ndarray:
        """The permutation of epoch `epoch` (int64 (n,))."""
        if not self.shuffle:
            return np.arange(self.n)
        if epoch != self._order_epoch:
            keys = raw_u64(derive_seed(self.seed, epoch), self.n)
            self._order, self._order_epoch = np.argsort(keys, kind="stable"), epoch
        return self._order

    def take(self, k: int) -> list[int]:
        """Next k example indices (crossing epochs as needed); advances the pointer."""
        out: list[int] = []
        while len(out) < k:
            if self.pointer.index >= self.n:
                self.pointer = DataPointer(self.pointer.epoch + 1, 0)
            order = self.order(self.pointer.epoch)
            stop = min(self.n, self.pointer.index + k - len(out))
            out.extend(int(i) for i in order[self.pointer.index : stop])
            self.pointer = DataPointer(self.pointer.epoch, stop)
        return out

    def __iter__(self) -> Iterator[int]:
        while True:
            yield self.take(1)[0]


__all__ = [
    "Batch",
    "DataError",
    "DataPointer",
    "DataStream",
    "Dataset",
    "Example",
    "TaskConfig",
    "encode_rows",
    "load_jsonl",
    "load_task_config",
]
