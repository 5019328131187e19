"""Client data: JSONL examples -> token ids, masked loss, accuracy, and a resumable shuffled stream.

Row formats (one JSON object per line; the kind is decided per row):
    {"text": "..."}                         language modelling: loss on every token after the first
    {"prompt": "...", "completion": "..."}  loss on the completion tokens only
    {"text": "...", "label": 1}             classification: prompt = template(text), completion =
                                            verbalizer[str(label)]; loss on those tokens only

Task file `task.json` (written by bench/tasks.py; only `verbalizer` is required for labelled rows):
    {"name": "sst2-synth",                              free text
     "verbalizer": {"0": " negative", "1": " positive"}, label (as str) -> label word(s), with its space
     "template": "{text} Sentiment:",                   optional, default "{text}"; {text} is the row's text
     "max_length": 128}                                  optional, default 256 tokens; longer rows lose
                                                         prompt tokens from the left
Other keys are ignored.

Loss of a batch of B examples: each example's loss is the mean cross-entropy over its target tokens;
the batch loss is the mean over the B examples, computed as a SUM over micro-batches of
(sum of the micro-batch's example losses) / B -- so any micro-batch split gives the same number.
Accuracy (labelled rows): argmax over the first token of each verbalizer word at the answer position.

Batches are LEFT-padded (position ids follow the attention mask), so every target sits at the end and
the model computes logits only for the last max(n_target)+1 positions (`logits_to_keep`). For the
common families (FUSED_MODEL_TYPES) `batch_loss` goes further: it runs the decoder, then the LM head
and a float32 log-softmax on the target rows only, a chunk of rows at a time -- no (B, T, V) logits
tensor ever exists, so a step's peak memory stays below an inference forward's.
"""

from __future__ import annotations

import inspect
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from shared.prng import derive_seed, raw_u64

log = logging.getLogger(__name__)

IGNORE = -100
CE_CHUNK_ELEMS = 1 << 20  # rows x vocab per cross-entropy chunk: keeps the fp32 log-softmax temporary small
# rows x vocab of one fused LM-head + cross-entropy chunk (CPU, CUDA): never all logits at once
HEAD_CHUNK_ELEMS = {"cpu": 1 << 22, "cuda": 1 << 25}
LOGSOFTMAX_ROWS_ELEMS = 1 << 19  # CPU: rows x vocab per log-softmax slice (2 MiB fp32 stays in cache)
# families whose CausalLM forward is exactly `lm_head(decoder(...).last_hidden_state)` (+ Gemma-2's
# final logit soft-capping): for these the loss runs the head on target rows only, chunk by chunk
FUSED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2"})


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
    rows: list[dict[str, Any]] = []
    with p.open() as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{p}:{lineno}: not JSON: {exc}") from None
            if not isinstance(row, dict):
                raise DataError(f"{p}:{lineno}: expected a JSON object")
            rows.append(row)
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


# --- loss and accuracy -------------------------------------------------------------------------------


def collate(examples: Sequence[Example], pad_id: int, device: torch.device) -> dict[str, Tensor]:
    """Left-padded input_ids/attention_mask/position_ids (B, L) and per-example n_target (B,)."""
    length = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    attn = torch.zeros((len(examples), length), dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, length - len(e.input_ids) :] = torch.tensor(e.input_ids)
        attn[i, length - len(e.input_ids) :] = 1
    pos = (attn.cumsum(1) - 1).clamp(min=0)
    n_target = torch.tensor([e.n_target for e in examples])
    return {"input_ids": ids.to(device), "attention_mask": attn.to(device), "position_ids": pos.to(device), "n_target": n_target.to(device)}


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


_KEEP_CACHE: dict[type, bool] = {}


def _accepts_logits_to_keep(model: nn.Module) -> bool:
    cls = type(model)
    if cls not in _KEEP_CACHE:
        _KEEP_CACHE[cls] = "logits_to_keep" in inspect.signature(model.forward).parameters
    return _KEEP_CACHE[cls]


def tail_logits(model: nn.Module, inputs: dict[str, Tensor], keep: int) -> Tensor:
    """Logits of the last `keep` positions, (B, keep, V).

    Fused families: decoder, then the head on the kept rows as one contiguous 2-D matmul (HF's own
    `logits_to_keep` slice hands F.linear a strided 3-D input, which CPU torch turns into a bmm over a
    copied weight: 8x slower for keep=1).
    """
    kwargs: dict[str, Any] = {k: inputs[k] for k in ("input_ids", "attention_mask", "position_ids")}
    kwargs["use_cache"] = False
    parts = fused_parts(model)
    if parts is not None:
        decoder, head, softcap = parts
        hidden: Tensor = decoder(**kwargs).last_hidden_state[:, -keep:]  # (B, keep, H)
        logits: Tensor = head(hidden.reshape(-1, hidden.shape[-1]))  # (B*keep, V)
        return _softcap(logits, softcap).view(hidden.shape[0], keep, -1)
    if _accepts_logits_to_keep(model):
        kwargs["logits_to_keep"] = keep
    out: Tensor = model(**kwargs).logits
    return out[:, -keep:]


def _is_target(n_target: Tensor, k: int) -> Tensor:
    """(B, K) True where position j of the last K is a target of its example (targets sit at the end)."""
    return torch.arange(k, device=n_target.device)[None, :] >= (k - n_target)[:, None]


def example_losses(model: nn.Module, examples: Sequence[Example], pad_id: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per-example mean target cross-entropy (B,) fp32, the kept logits (B, K+1, V) and n_target (B,)."""
    inputs = collate(examples, pad_id, model_device(model))
    n_target = inputs["n_target"]
    k = int(n_target.max())
    logits = tail_logits(model, inputs, k + 1)  # position j predicts token j+1
    targets = inputs["input_ids"][:, -k:]  # (B, K)
    targets = targets.masked_fill(~_is_target(n_target, k), IGNORE)
    flat_logits = logits[:, :-1].reshape(-1, logits.shape[-1])  # (B*K, V)
    flat_targets = targets.reshape(-1)
    rows = max(1, CE_CHUNK_ELEMS // logits.shape[-1])
    ce = torch.cat(
        [
            F.cross_entropy(flat_logits[i : i + rows].float(), flat_targets[i : i + rows], ignore_index=IGNORE, reduction="none")
            for i in range(0, flat_logits.shape[0], rows)
        ]
    ).view(len(examples), k)
    return ce.sum(1) / n_target.to(ce.dtype), logits, n_target


def fused_parts(model: nn.Module) -> tuple[nn.Module, nn.Module, float | None] | None:
    """(decoder, lm_head, final logit soft-cap) for families where that IS the forward, else None."""
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) not in FUSED_MODEL_TYPES:
        return None
    get_decoder, get_head = getattr(model, "get_decoder", None), getattr(model, "get_output_embeddings", None)
    if get_decoder is None or get_head is None:
        return None
    head = get_head()
    if head is None:
        return None
    softcap = getattr(config, "final_logit_softcapping", None)
    return get_decoder(), head, float(softcap) if softcap else None


def _softcap(logits: Tensor, softcap: float | None) -> Tensor:
    """Gemma-2's final logit soft-capping, softcap * tanh(logits / softcap); identity when None."""
    return logits if softcap is None else torch.tanh(logits / softcap) * softcap


def target_losses(model: nn.Module, examples: Sequence[Example], pad_id: int) -> Tensor:
    """Per-example mean target cross-entropy (B,) fp32; fused head + loss where supported."""
    parts = fused_parts(model)
    if parts is None:
        return example_losses(model, examples, pad_id)[0]
    decoder, head, softcap = parts
    inputs = collate(examples, pad_id, model_device(model))
    n_target = inputs["n_target"]
    k = int(n_target.max())
    kwargs = {key: inputs[key] for key in ("input_ids", "attention_mask", "position_ids")}
    hidden: Tensor = decoder(**kwargs, use_cache=False).last_hidden_state[:, -k - 1 : -1]  # (B, K, H)
    valid = _is_target(n_target, k)  # (B, K)
    rows = hidden[valid]  # (N, H): target rows only, padding skipped
    targets = inputs["input_ids"][:, -k:][valid]  # (N,)
    owner = torch.arange(len(examples), device=hidden.device)[:, None].expand(-1, k)[valid]  # (N,)
    vocab = int(getattr(head, "out_features", 0) or getattr(head, "weight").shape[0])  # noqa: B009
    chunk = max(1, HEAD_CHUNK_ELEMS.get(hidden.device.type, 1 << 22) // vocab)
    sub = chunk if hidden.device.type == "cuda" else max(1, LOGSOFTMAX_ROWS_ELEMS // vocab)
    ce = torch.empty(rows.shape[0], dtype=torch.float32, device=hidden.device)
    for i in range(0, rows.shape[0], chunk):
        logits = _softcap(head(rows[i : i + chunk]), softcap)  # (c, V) compute dtype
        # fp32 log-softmax (one kernel: 2x logsumexp's speed) on cache-sized slices of the chunk
        for j in range(0, logits.shape[0], sub):
            stop = min(j + sub, logits.shape[0])
            logp = torch.log_softmax(logits[j:stop], dim=-1, dtype=torch.float32)
            ce[i + j : i + stop] = -logp.gather(1, targets[i + j : i + stop, None])[:, 0]
    per_example = torch.zeros(len(examples), dtype=torch.float32, device=hidden.device).index_add_(0, owner, ce)
    return per_example / n_target.to(torch.float32)


def batch_loss(model: nn.Module, batch: Batch, micro_batch: int | None = None) -> float:
    """Mean over the batch of per-example losses, summed over micro-batches of `micro_batch` examples."""
    if len(batch) == 0:
        raise DataError("batch_loss of an empty batch")
    step = micro_batch or len(batch)
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(batch), step):
            losses = target_losses(model, batch.examples[i : i + step], batch.dataset.pad_id)
            total += float(losses.sum()) / len(batch)
    return total


def evaluate(model: nn.Module, dataset: Dataset, batch_size: int = 16, limit: int | None = None) -> dict[str, float | None]:
    """{"loss": mean per-example loss, "accuracy": for labelled data else None, "n": examples}."""
    n = len(dataset) if limit is None else min(limit, len(dataset))
    if n == 0:
        raise DataError("evaluate on an empty dataset")
    loss_sum, correct, labelled = 0.0, 0, 0
    cls_ids = torch.tensor(dataset.class_token_ids) if dataset.class_token_ids else None
    with torch.no_grad():
        for i in range(0, n, batch_size):
            chunk = dataset.examples[i : min(n, i + batch_size)]
            losses, logits, n_target = example_losses(model, chunk, dataset.pad_id)
            loss_sum += float(losses.sum())
            if cls_ids is None:
                continue
            k = logits.shape[1] - 1
            answer = logits[torch.arange(len(chunk)), k - n_target]  # (B, V): predicts the first label token
            pred = answer[:, cls_ids.to(answer.device)].argmax(-1).cpu()
            for e, p in zip(chunk, pred.tolist(), strict=True):
                if e.label is not None:
                    labelled += 1
                    correct += int(e.label == p)
    return {"loss": loss_sum / n, "accuracy": correct / labelled if labelled else None, "n": float(n)}


# --- resumable shuffled stream -----------------------------------------------------------------------


@dataclass
class DataPointer:
    """Where a client is in its data: epoch and position inside that epoch's permutation."""

    epoch: int = 0
    index: int = 0

    def to_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataPointer:
        for key in ("epoch", "index"):
            if isinstance(d.get(key), bool) or not isinstance(d.get(key), int) or d[key] < 0:
                raise DataError(f"data pointer {key!r} must be an int >= 0, got {d.get(key)!r}")
        return cls(d["epoch"], d["index"])


class DataStream:
    """Endless epochs over n examples; epoch e is the permutation argsort(raw_u64(derive_seed(seed, e), n)).

    The state is just `pointer` (epoch, index): persist it, rebuild with the same (n, seed), go on.
    """

    def __init__(self, n: int, seed: int, pointer: DataPointer | None = None, shuffle: bool = True) -> None:
        if n <= 0:
            raise DataError(f"DataStream needs at least one example, got n={n}")
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self.pointer = pointer or DataPointer()
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

    def epochs_done(self) -> float:
        return self.pointer.epoch + self.pointer.index / self.n


__all__ = [
    "Batch",
    "DataError",
    "DataPointer",
    "DataStream",
    "Dataset",
    "Example",
    "TaskConfig",
    "batch_loss",
    "collate",
    "encode_rows",
    "evaluate",
    "example_losses",
    "fused_parts",
    "target_losses",
    "load_jsonl",
    "load_task_config",
    "model_device",
]
