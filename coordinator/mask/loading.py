"""The model the mask builder backprops through: full precision (no quantization), on a chosen device."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from coordinator.mask.select import MaskBuildError

log = logging.getLogger(__name__)


def pick_device(device: str) -> torch.device:
    """'auto' -> cuda when available, else cpu; anything else must be a valid torch device string."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise MaskBuildError(f"--device {device!r} is not a torch device") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise MaskBuildError(f"--device {device}: CUDA is not available on this machine")
    return dev


def checkpoint_float_dtype(model_dir: Path) -> torch.dtype:
    """The checkpoint's weight dtype (fp16 is widened to fp32: fp16 gradients overflow), fp32 when unknown."""
    from coordinator.export import ExportError, checkpoint_dtype

    try:
        found = checkpoint_dtype(model_dir)
    except (ExportError, OSError, ValueError):
        return torch.float32
    return torch.bfloat16 if found == torch.bfloat16 else torch.float32


def check_supported(model_dir: str | Path) -> None:
    """The architecture check of shared/architectures.py, as a MaskBuildError (one line, exit 2)."""
    from shared.architectures import UnsupportedModelError, check_model_dir

    try:
        check_model_dir(model_dir)
    except UnsupportedModelError as exc:
        raise MaskBuildError(str(exc)) from exc


def load_for_mask(
    model_dir: str | Path,
    *,
    device: str = "auto",
    dtype: str = "auto",
    checkpointing: bool = False,
    tokenizer_dir: str | Path | None = None,
    widen: bool | None = None,
) -> tuple[nn.Module, Any]:
    """The unquantized model (the mask needs true gradients) in the checkpoint's dtype, and its tokenizer.

    `dtype` "auto": the checkpoint's (bf16 stays bf16: half the memory of an fp32 copy; fp16 is
    widened to fp32), or "float32" / "bfloat16".

    `checkpointing` turns on HF activation checkpointing (see `accumulate_gradients` for the mode).
    `widen` (None: a bf16 model on a CPU without AVX512-BF16) computes the bf16 Linear layers in fp32
    with their weights left bf16 (coordinator/mask/widelinear.py).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = Path(model_dir)
    if not (root / "config.json").is_file():
        raise MaskBuildError(f"--model {root}: no config.json (expected a Hugging Face model directory)")
    check_supported(root)
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16}
    if dtype != "auto" and dtype not in dtypes:
        raise MaskBuildError(f"--dtype must be auto or one of {', '.join(dtypes)}, got {dtype!r}")
    torch_dtype = checkpoint_float_dtype(root) if dtype == "auto" else dtypes[dtype]
    dev = pick_device(device)
    tok_root = Path(tokenizer_dir) if tokenizer_dir is not None else root
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(tok_root))
    except (OSError, ValueError) as exc:
        raise MaskBuildError(f"cannot load a tokenizer from {tok_root} (use --tokenizer DIR): {exc}") from exc
    model: Any = AutoModelForCausalLM.from_pretrained(str(root), dtype=torch_dtype)  # a PreTrainedModel
    model.to(dev)
    model.config.use_cache = False  # no KV cache during backprop
    model.eval()  # no dropout: the gradient of the model as it is
    if widen is None:
        from shared.modelload import cpu_has_bf16

        widen = dev.type == "cpu" and torch_dtype == torch.bfloat16 and not cpu_has_bf16()
    if widen:
        from coordinator.mask.widelinear import widen_linears

        n = widen_linears(model)
        log.info("mask: %d bf16 Linear layers compute in fp32 (no native bf16 on this CPU; weights stay bf16)", n)
    if checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5 name
        if callable(enable):
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if not any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules()):
            raise MaskBuildError(f"{type(model).__name__} does not support gradient checkpointing")
    return model, tokenizer


def tokenizer_encoder(tokenizer: Any) -> tuple[Callable[[str], list[int]], int | None]:
    """(text -> ids without special tokens, eos id or None) for a transformers tokenizer."""

    def encode(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    eos = getattr(tokenizer, "eos_token_id", None)
    return encode, int(eos) if eos is not None else None


__all__ = [
    "check_supported",
    "checkpoint_float_dtype", "load_for_mask", "pick_device", "tokenizer_encoder"]
