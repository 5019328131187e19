"""Arithmetic memory estimate from a model's config alone: "will it fit?" before any device runs it.

The planner (planner.py) measures fixed and per-sequence memory with calibration forwards on the
device itself; this module predicts the same four components from config.json without weights, for
a device that is not at hand (docs/DEPLOY.md "Will it fit?"):

    need(b) = weights + side-car + fixed + b * per_sequence

- weights: parameter shapes from the config (the model built on the meta device: nothing allocated).
  Decoder Linear layers quantized: nf4 0.5 B + 1/64 B (8-bit absmax per 64-block, double quantization)
  + 4/(64*256) B per weight + 1088 B of code tables per layer; int8 1 B per weight + 4 B per output row; none: the compute dtype. The
  embeddings (and an untied LM head, which is never quantized) stay in the checkpoint dtype when it is
  narrower than the compute dtype (quant none: the compute dtype), the rest (norms, biases) in the compute dtype;
- side-car: `fraction` of the decoder Linear weights, 56 B each at most (planner.step_sidecar_bytes:
  value 4 + index 8 + v_0 copy 4 + backup 4 + z 4 + the correction plan's row, column, touched row and
  count 4 x 8);
- fixed: one LM-head chunk of logits in the compute dtype plus its fp32 log-softmax slice (shared.loss
  head_chunk_rows, LOGSOFTMAX_ROWS_ELEMS) and the largest Linear dequantized in the compute dtype
  (the side-car's tile / bitsandbytes' own dequantization);
- per_sequence: the live activations of one decoder layer in a no-grad forward, per token: the
  residual and its normed copy (2 x hidden), the MLP's three intermediate-width tensors (act(gate), up,
  their product), q/k/v/attention output (2 x hidden + 2 x kv width), all in the compute dtype, plus the
  attention scores of the math path (heads x seq x seq fp32: an upper bound, the fused kernels keep none).
The planner's safety factor (1.15) is applied to per_sequence, as the planner does.

Allocator overhead is not modelled: a measured CPU peak RSS reads higher (BENCHMARKS.md "Real sizes on
CPU" states the error against measured rows).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from shared.loss import LOGSOFTMAX_ROWS_ELEMS, head_chunk_rows

GIB = float(1 << 30)
_QUANT_BYTES = {"nf4": 0.5 + 1 / 64 + 4 / (64 * 256), "int8": 1.0}
_NF4_CODES = 4 * (16 + 256)  # per quantized layer: the NF4 code table and the double quantization's code
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
SIDECAR_BYTES_PER_ENTRY = 56


@dataclass(frozen=True)
class Estimate:
    """Predicted bytes of each planner component, and the micro-batch that fits `budget_bytes`."""

    weights_bytes: int
    sidecar_bytes: int
    fixed_bytes: int
    per_seq_bytes: int  # safety factor included, as the planner's
    budget_bytes: int
    micro_batch: int  # 0: not even one sequence fits
    params: int
    linear_params: int

    def need_bytes(self, micro_batch: int) -> int:
        return self.weights_bytes + self.sidecar_bytes + self.fixed_bytes + micro_batch * self.per_seq_bytes

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _shapes(config: dict[str, Any]) -> tuple[Any, Any]:
    from transformers import AutoConfig, AutoModelForCausalLM

    values = dict(config)
    values.pop("architectures", None)
    for key in ("torch_dtype", "dtype", "transformers_version"):
        values.pop(key, None)
    cfg = AutoConfig.for_model(values.pop("model_type"), **values)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)  # type: ignore[no-untyped-call]
    return model, cfg


def estimate_memory(
    config: dict[str, Any] | str | Path,
    quant: str,
    seq_len: int,
    budget_gib: float,
    *,
    compute_dtype: str = "bfloat16",
    device: str = "cuda",
    fraction: float = 1e-3,
    max_micro_batch: int = 64,
    safety: float = 1.15,
) -> Estimate:
    """Predict the planner's components for `config` (a dict or a config.json path); see module doc."""
    if quant not in ("nf4", "int8", "none"):
        raise ValueError(f"quant must be nf4, int8 or none, got {quant!r}")
    if compute_dtype not in _DTYPE_BYTES:
        raise ValueError(f"compute_dtype must be one of {sorted(_DTYPE_BYTES)}, got {compute_dtype!r}")
    if seq_len < 2 or not budget_gib > 0 or not 0 < fraction <= 1:
        raise ValueError(f"need seq_len >= 2, budget_gib > 0, 0 < fraction <= 1 (got {seq_len}, {budget_gib}, {fraction})")
    values: dict[str, Any] = config if isinstance(config, dict) else json.loads(Path(config).read_text())
    ckpt = str(values.get("torch_dtype") or values.get("dtype") or "float32")
    model, cfg = _shapes(values)
    cd, kd = _DTYPE_BYTES[compute_dtype], _DTYPE_BYTES.get(ckpt, 4)
    narrow = cd if quant == "none" else min(cd, kd)
    head: Any = model.get_output_embeddings()
    linear = other = 0
    largest = 0
    counted: set[int] = set()
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if id(p) in counted:
                continue  # a tied head shares the embedding
            counted.add(id(p))
            n = p.numel()
            if isinstance(module, nn.Linear) and module is not head and p.dim() == 2:
                linear += n
                largest = max(largest, n)
            elif isinstance(module, nn.Embedding) or module is head:
                other += n * narrow
            else:
                other += n * cd
    layers = [m for m in model.modules() if isinstance(m, nn.Linear) and m is not head]
    lin_bytes = linear * cd if quant == "none" else linear * _QUANT_BYTES[quant]
    if quant == "int8":
        lin_bytes += 4 * sum(m.out_features for m in layers)
    if quant == "nf4":
        lin_bytes += _NF4_CODES * len(layers)
    weights = int(lin_bytes + other)
    sidecar = int(SIDECAR_BYTES_PER_ENTRY * fraction * linear)
    vocab = int(cfg.vocab_size)
    head_w = getattr(head, "weight", None)
    head_bytes = int(head_w.numel()) * narrow if head_w is not None else 0
    chunk_rows = head_chunk_rows(device, vocab, head_bytes, narrow < cd)
    sub_rows = chunk_rows if device == "cuda" else max(1, LOGSOFTMAX_ROWS_ELEMS // vocab)
    fixed = chunk_rows * vocab * cd + sub_rows * vocab * 4 + (largest * cd if quant != "none" else 0)
    hidden = int(cfg.hidden_size)
    inter = int(getattr(cfg, "intermediate_size", None) or getattr(cfg, "ffn_dim", None) or 4 * hidden)
    heads = int(cfg.num_attention_heads)
    head_dim = int(getattr(cfg, "head_dim", None) or hidden // heads)
    kv = int(getattr(cfg, "num_key_value_heads", None) or heads) * head_dim
    per_token = cd * (2 * hidden + 3 * inter + 2 * heads * head_dim + 2 * kv)
    per_seq = int(safety * (seq_len * per_token + heads * seq_len * seq_len * 4))
    budget = int(budget_gib * GIB)
    room = budget - weights - sidecar - fixed
    micro = max(0, min(max_micro_batch, room // per_seq))
    params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    return Estimate(weights, sidecar, fixed, per_seq, budget, int(micro), int(params), int(linear))


__all__ = ["SIDECAR_BYTES_PER_ENTRY", "Estimate", "estimate_memory"]
