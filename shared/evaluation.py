"""Evaluation both sides agree on: which examples a device holds out, which file an eval set is, and
the loss/accuracy of a side-car model at given values.

A device evaluates on a held-out slice of its own data every `eval_every` rounds (reported on its
Heartbeat, docs/PROTOCOL.md); the coordinator may evaluate its own values on `eval_data` between rounds;
`meerkat evaluate` prints the same numbers for any model. All three call `evaluate_model` (the loss of
`shared.loss`, the one SPSA uses), so the same data and the same values give the same loss.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from shared.dataset import DataError, Dataset, TaskConfig, load_jsonl
from shared.loss import evaluate
from shared.prng import raw_u64

EVAL_BATCH = 16  # examples per forward when evaluating (memory: one micro-batch of an inference forward)


@dataclass(frozen=True)
class EvalResult:
    loss: float  # mean per-example target loss
    accuracy: float | None  # labelled data only
    n: int  # examples evaluated


def evaluate_model(model: nn.Module, dataset: Dataset, batch_size: int = EVAL_BATCH, limit: int | None = None) -> EvalResult:
    """Loss (and accuracy on labelled rows) of `model` on the first `limit` examples of `dataset`."""
    r = evaluate(model, dataset, batch_size=batch_size, limit=limit)
    loss, acc = r["loss"], r["accuracy"]
    if loss is None or not math.isfinite(loss):
        raise DataError(f"evaluation loss is not finite ({loss})")
    return EvalResult(float(loss), None if acc is None else float(acc), int(r["n"] or 0))


def holdout_split(n: int, fraction: float, max_n: int, seed: int) -> tuple[list[int], list[int]]:
    """(train indices, held-out indices) of n examples: k = min(max_n, floor(n * fraction)) examples,
    chosen by the permutation argsort(raw_u64(seed, n)), are held out; at least one stays for training."""
    k = min(max_n, int(n * fraction), n - 1) if fraction > 0 else 0
    k = max(k, 0)
    order = np.argsort(raw_u64(seed, n), kind="stable")
    held = sorted(int(i) for i in order[:k])
    keep = sorted(int(i) for i in order[k:])
    return keep, held


def subset(dataset: Dataset, indices: list[int]) -> Dataset:
    return Dataset([dataset.examples[i] for i in indices], dataset.pad_id, dataset.classes, dataset.class_token_ids)


def task_from_meta(meta: dict[str, Any] | None, seq_len: int) -> TaskConfig:
    """TaskConfig from a task.json object (`verbalizer`, or `labels` as bench/tinylm/tasks.py writes it)."""
    if meta is None:
        return TaskConfig(max_length=seq_len)
    return TaskConfig(
        name=str(meta.get("name", "")),
        verbalizer=meta.get("verbalizer", meta.get("labels")),
        template=meta.get("template") or "{text}",
        max_length=seq_len,
    )


def load_eval_data(path: Path, tokenizer: Any, seq_len: int) -> Dataset:
    """An eval set: a task.json naming its file in `eval`, or a JSONL file (task.json beside it, if any)."""
    path = Path(path)
    meta: dict[str, Any] | None
    if path.suffix == ".json":
        meta = read_json_object(path, "eval data")
        name = meta.get("eval")
        if not isinstance(name, str):
            raise DataError(f"eval data: {path} has no 'eval' file name")
        jsonl = path.parent / name
    else:
        jsonl = path
        beside = path.parent / "task.json"
        meta = read_json_object(beside, "eval data") if beside.is_file() else None
    if not jsonl.is_file():
        raise DataError(f"eval data: {jsonl} does not exist")
    try:
        task = task_from_meta(meta, seq_len)
    except DataError as exc:
        raise DataError(f"eval data: task config: {exc}") from None
    ds = load_jsonl(jsonl, tokenizer, task)
    if len(ds) == 0:
        raise DataError(f"eval data: {jsonl} has no examples")
    return ds


def read_json_object(path: Path, what: str) -> dict[str, Any]:
    """A JSON file that must hold an object (task.json); DataError naming `what` (the config key) otherwise."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{what}: cannot read {path}: {exc}") from None
    if not isinstance(raw, dict):
        raise DataError(f"{what}: {path} must hold a JSON object")
    return raw


__all__ = ["EVAL_BATCH", "EvalResult", "evaluate_model", "holdout_split", "load_eval_data", "read_json_object", "subset",
           "task_from_meta"]
