"""Loss and accuracy of tokenized examples (shared.dataset): the function SPSA evaluates twice a step.

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
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from shared.dataset import Batch, DataError, Dataset, Example

IGNORE = -100
CE_CHUNK_ELEMS = 1 << 20  # rows x vocab per cross-entropy chunk: keeps the fp32 log-softmax temporary small
# rows x vocab of one fused LM-head + cross-entropy chunk (CPU, CUDA): never all logits at once
HEAD_CHUNK_ELEMS = {"cpu": 1 << 22, "cuda": 1 << 25}
# CPU: every chunk streams the whole head weight from memory once it is larger than the caches (136 M
# weights at 0.5B), and a narrow head (bf16 on an fp32 CPU) widens it too (modelload._chunked_head_forward:
# ~0.8 ns per weight vs ~0.06 ns per MAC). At 2^22 the 0.5B loss of one 128-token sequence took 5 chunks of
# 27 rows: 1.15x a forward with a narrow head (step 2.58x the plain forward), and a bf16 head on a bf16 CPU
# read its 272 MB 5 times (step 2.18x; 2.02x in one chunk). So such heads take CPU_HEAD_ROWS rows at least,
# within CPU_HEAD_CHUNK_ELEMS (128 MiB of fp32 logits). A head under CPU_BIG_HEAD_BYTES stays in the caches
# and the larger chunk's logits do not: the tiny default (32,000 x 512 bf16) stepped 2.01-2.05x with
# 131-row chunks, 2.11-2.13x with 256 (BENCHMARKS.md "Real sizes on CPU").
CPU_HEAD_ROWS = 256
CPU_HEAD_CHUNK_ELEMS = 1 << 25
CPU_BIG_HEAD_BYTES = 1 << 26


def head_chunk_rows(device: str, vocab: int, head_bytes: int, narrow_head: bool) -> int:
    """Rows of one LM-head chunk of the loss on `device`: CPU_HEAD_ROWS at least for a CPU head that is
    narrow or holds CPU_BIG_HEAD_BYTES or more, within CPU_HEAD_CHUNK_ELEMS."""
    rows = max(1, HEAD_CHUNK_ELEMS.get(device, 1 << 22) // vocab)
    if device == "cpu" and (narrow_head or head_bytes >= CPU_BIG_HEAD_BYTES):
        rows = max(rows, min(CPU_HEAD_ROWS, CPU_HEAD_CHUNK_ELEMS // vocab))
    return rows
LOGSOFTMAX_ROWS_ELEMS = 1 << 19  # CPU: rows x vocab per log-softmax slice (2 MiB fp32 stays in cache)
# families whose CausalLM forward is exactly `lm_head(decoder(...).last_hidden_state)` (+ Gemma-2's
# final logit soft-capping): for these the loss runs the head on target rows only, chunk by chunk
FUSED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2"})


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
    head_w = getattr(head, "weight", None)
    big, narrow = 0, False
    if isinstance(head_w, Tensor):
        big, narrow = head_w.numel() * head_w.element_size(), head_w.dtype != hidden.dtype
    chunk = head_chunk_rows(hidden.device.type, vocab, big, narrow)
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


__all__ = [
    "FUSED_MODEL_TYPES",
    "batch_loss",
    "head_chunk_rows",
    "collate",
    "evaluate",
    "example_losses",
    "fused_parts",
    "model_device",
    "tail_logits",
    "target_losses",
]
