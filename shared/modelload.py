"""Load a local Hugging Face causal LM, quantize it layer by layer, and attach the exact side-car.

    loaded = load_model("path/to/llama", quant="nf4", device="cuda", mask=load_mask(...))
    loaded.sidecar.values      # (nnz,) fp32 on the device: what SPSA perturbs and updates

What happens (quant "nf4" / "int8"):
1. the model is built from the checkpoint in the checkpoint's own dtype on the CPU (no fp32 copy of a
   bf16 checkpoint is ever made);
2. one Linear at a time (all Linear layers except `skip_modules`, default the LM head): in the
   checkpoint dtype (so the quantized base is the same whatever the compute dtype), the masked positions
   are set to 0 (they are REMOVED from the quantized
   base; their exact values live in the side-car), it is quantized by bitsandbytes on `device`, and the
   dense weight is released. Peak host memory is therefore the checkpoint-dtype model plus one layer;
3. the other parameters are cast to the compute dtype and moved to `device`, except the input and
   output embeddings: they stay in the checkpoint's dtype when it is narrower (a bf16 table is never
   widened to fp32: 2.4 GB for Gemma-2's 256k vocabulary); the input embedding's output is cast to the
   compute dtype and the LM head widens its weight 8192 vocab rows at a time;
4. the side-car is filled from the safetensors files (`initial_values_from_dir`: the fp32 v_0 that the
   coordinator computes the same way) and every masked layer is wrapped in a `SideCarLinear`.

With quant "none" the model is loaded in the compute dtype and the masked layers are wrapped too; their
weight aliases the side-car at the masked positions (written in place before each forward).

int8 on CPU: bitsandbytes warns on every matmul that inputs are cast to fp16; wrapped layers never
call it (they dequantize and use F.linear) and the warning is filtered for unwrapped ones.
"""

from __future__ import annotations

import importlib
import logging
import types
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from shared.architectures import check_model_dir
from shared.sidecar import (
    SideCar,
    SideCarError,
    attach_sidecar,
    bnb_module,
    initial_values_from_dir,
    replace_module,
)

log = logging.getLogger(__name__)

Quant = Literal["nf4", "int8", "none"]
QUANTS: tuple[str, ...] = ("nf4", "int8", "none")
_INT8_WARNING = r".*inputs will be cast from .* to float16.*"


class MaskLike(Protocol):
    """What load_model needs from a mask (shared.maskfile.Mask fits)."""

    @property
    def layers(self) -> dict[str, Tensor]: ...

    @property
    def shapes(self) -> dict[str, tuple[int, int]]: ...


@dataclass
class LoadedModel:
    """A model ready for SPSA: `sidecar` is None when loaded without a mask."""

    model: nn.Module
    tokenizer: Any | None
    sidecar: SideCar | None
    fingerprint: str
    quant: str
    device: torch.device
    compute_dtype: torch.dtype


def default_compute_dtype(quant: str, device: torch.device) -> torch.dtype:
    """bf16 where the hardware has it for quantized models (bnb's fast path does the same), else fp32.

    CUDA: bf16 (fp16 on pre-Ampere). CPU: bf16 for nf4/int8 on CPUs with AVX512-BF16, fp32 otherwise
    and always for "none" (plain fp32 is the reference).
    """
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if quant != "none" and cpu_has_bf16():
        return torch.bfloat16
    return torch.float32


def cpu_has_bf16() -> bool:
    try:
        modules: Any = importlib.import_module("bitsandbytes.nn.modules")
    except ImportError:
        return False
    return bool(modules.has_avx512bf16())


def load_model(
    model_dir: str | Path,
    quant: Quant = "nf4",
    device: str | torch.device = "cpu",
    mask: MaskLike | Mapping[str, Tensor] | None = None,
    compute_dtype: torch.dtype | None = None,
    *,
    skip_modules: Sequence[str] = ("lm_head",),
    fingerprint: str | None = None,
) -> LoadedModel:
    """Load `model_dir` quantized as `quant` on `device`, with a side-car over `mask` (see module doc).

    `mask` is a shared.maskfile.Mask or a plain {layer: sorted int64 flat indices} dict. `fingerprint`
    skips hashing the checkpoint when the caller already has it.
    """
    from transformers import AutoModelForCausalLM

    root = Path(model_dir)
    if quant not in QUANTS:
        raise ValueError(f"quant must be one of {QUANTS}, got {quant!r}")
    if not (root / "config.json").is_file():
        raise FileNotFoundError(f"{root}: not a Hugging Face model directory (no config.json)")
    check_model_dir(root, quant)  # an unsupported family fails here, in one line
    dev = torch.device(device)
    dtype = compute_dtype or default_compute_dtype(quant, dev)
    layers, shapes = _mask_parts(mask)
    if fingerprint is None:
        from shared.fingerprint import fingerprint_model_dir

        fingerprint = fingerprint_model_dir(root)
    mask_fp = getattr(getattr(mask, "meta", None), "fingerprint", None)
    if mask_fp is not None and mask_fp != fingerprint:
        raise SideCarError(f"mask was built for model {mask_fp[:12]}..., this model is {fingerprint[:12]}...")

    load_dtype: Any = dtype if quant == "none" else "auto"
    model: Any = AutoModelForCausalLM.from_pretrained(str(root), dtype=load_dtype, device_map=None)
    model.eval()
    model.requires_grad_(False)
    _check_shapes(model, layers, shapes)
    if quant == "none":
        model.to(dev)
    else:
        n = _quantize_linears(model, quant, dev, dtype, layers, skip_modules)
        log.info("quantized %d Linear layers to %s on %s (compute %s)", n, quant, dev, dtype)
        if quant == "int8":
            warnings.filterwarnings("ignore", message=_INT8_WARNING, category=UserWarning)

    sidecar: SideCar | None = None
    if layers is not None:
        sidecar = SideCar(layers, initial_values_from_dir(root, layers), dev)
        attach_sidecar(model, sidecar, dtype)
        log.info("side-car: %d values over %d layers", sidecar.nnz, len(sidecar.layer_names))
    return LoadedModel(model, load_tokenizer(root), sidecar, fingerprint, quant, dev, dtype)


def _mask_parts(
    mask: MaskLike | Mapping[str, Tensor] | None,
) -> tuple[dict[str, Tensor] | None, dict[str, tuple[int, int]] | None]:
    if mask is None:
        return None, None
    if isinstance(mask, Mapping):
        return {str(k): v for k, v in mask.items()}, None
    return dict(mask.layers), dict(mask.shapes)


def _check_shapes(
    model: nn.Module, layers: dict[str, Tensor] | None, shapes: dict[str, tuple[int, int]] | None
) -> None:
    if layers is None:
        return
    modules = dict(model.named_modules())
    for name in sorted(layers):
        layer = modules.get(name)
        if not isinstance(layer, nn.Linear):
            kind = "missing" if layer is None else type(layer).__name__
            raise SideCarError(f"mask layer {name!r}: expected an nn.Linear in the model, found {kind}")
        have = (layer.out_features, layer.in_features)
        if shapes is not None and tuple(shapes[name]) != have:
            raise SideCarError(f"mask layer {name!r}: mask shape {tuple(shapes[name])} != model weight {have}")


def _quantize_linears(
    model: nn.Module,
    quant: str,
    device: torch.device,
    dtype: torch.dtype,
    layers: dict[str, Tensor] | None,
    skip_modules: Sequence[str],
) -> int:
    """Swap every Linear (not in skip_modules) for a bnb layer on `device`, one at a time."""
    bnb = bnb_module()

    targets = [
        name
        for name, m in model.named_modules()
        if type(m) is nn.Linear and name.rsplit(".", 1)[-1] not in skip_modules
    ]
    quantized: set[int] = set()
    for name in targets:  # names, not modules: a replaced Linear's dense weight is freed right away
        lin: Any = model.get_submodule(name)
        w = lin.weight.data.clone()  # (out, in) checkpoint dtype: the base does not depend on compute dtype
        if layers is not None and name in layers:
            w.view(-1).index_fill_(0, layers[name], 0.0)  # masked positions leave the quantized base
        has_bias = lin.bias is not None
        q: Any
        if quant == "nf4":
            q = bnb.nn.Linear4bit(
                lin.in_features, lin.out_features, bias=has_bias, compute_dtype=dtype, quant_type="nf4", device="meta"
            )
            q.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4", compress_statistics=True, module=q)
        else:
            q = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=has_bias, has_fp16_weights=False, device="meta")
            q.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)
        if has_bias:
            q.bias = nn.Parameter(lin.bias.data.to(dtype), requires_grad=False)
        q = q.to(device)  # bitsandbytes quantizes here
        q.requires_grad_(False)
        replace_module(model, name, q)
        quantized.update(id(p) for p in q.parameters())
        del lin, w
    narrow = _embedding_params(model, dtype)
    for p in model.parameters():  # embeddings, norms, skipped Linear layers
        if id(p) in narrow:
            p.data = p.data.to(device)  # the checkpoint's dtype: never a wider copy of a 256k-row table
        elif id(p) not in quantized:
            p.data = p.data.to(device, dtype if p.is_floating_point() else None)
    if narrow:
        _compute_in(model, dtype)
    for mod in model.modules():
        for key, buf in list(mod._buffers.items()):
            if buf is not None:
                mod._buffers[key] = buf.to(device)  # e.g. rotary inv_freq stays fp32
    return len(targets)


HEAD_CHUNK_ROWS = 8192  # vocab rows of a narrow LM head widened at a time (8192 x 4096 fp32 = 128 MiB)


def _embedding_params(model: nn.Module, dtype: torch.dtype) -> set[int]:
    """ids of the input/output embedding weights stored narrower than the compute dtype (bf16 vs fp32)."""
    found: set[int] = set()
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        fn = getattr(model, getter, None)
        module = fn() if callable(fn) else None
        w = getattr(module, "weight", None)
        if isinstance(w, Tensor) and w.is_floating_point() and w.element_size() < torch.finfo(dtype).bits // 8:
            found.add(id(w))
    return found


def _compute_in(model: nn.Module, dtype: torch.dtype) -> None:
    """Embeddings kept narrow still hand the compute dtype on: the input embedding's output is cast,
    and the LM head widens its weight one vocab chunk at a time (the same products as a wide copy)."""
    get_in, get_out = getattr(model, "get_input_embeddings", None), getattr(model, "get_output_embeddings", None)
    emb = get_in() if callable(get_in) else None
    if isinstance(emb, nn.Module) and getattr(emb, "weight", None) is not None and emb.weight.dtype != dtype:
        emb.register_forward_hook(lambda _m, _args, out: out.to(dtype) if out.is_floating_point() else out)
    head = get_out() if callable(get_out) else None
    if type(head) is nn.Linear and head.weight.dtype != dtype:
        head.forward = types.MethodType(_chunked_head_forward, head)  # type: ignore[method-assign]


def _chunked_head_forward(self: nn.Linear, x: Tensor) -> Tensor:
    w = self.weight
    out = torch.empty(*x.shape[:-1], w.shape[0], dtype=x.dtype, device=x.device)
    scratch = _widening_scratch(self, x)
    for a in range(0, w.shape[0], HEAD_CHUNK_ROWS):
        b = min(a + HEAD_CHUNK_ROWS, w.shape[0])
        bias = None if self.bias is None else self.bias[a:b].to(x.dtype)
        wide = w[a:b].to(x.dtype) if scratch is None else scratch[: b - a].copy_(w[a:b])
        out[..., a:b] = F.linear(x, wide, bias)
    return out


def _widening_scratch(head: nn.Linear, x: Tensor) -> Tensor | None:
    """One HEAD_CHUNK_ROWS x hidden buffer the head widens every chunk into, kept on the module.

    A fresh copy per chunk (29 MB at hidden 896) sits under glibc's mmap threshold and churns the heap:
    the 0.5B step's RSS peak moved 417-580 MiB run to run with the same live tensors. With autograd
    recording (x or the weight requiring a gradient) each chunk keeps its own copy: backward needs them all."""
    w = head.weight
    if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad):
        return None
    buf: Tensor | None = getattr(head, "_meerkat_widen", None)
    inference = torch.is_inference_mode_enabled()
    if buf is None or buf.dtype != x.dtype or buf.device != w.device or buf.is_inference() != inference:
        buf = torch.empty(min(HEAD_CHUNK_ROWS, w.shape[0]), w.shape[1], dtype=x.dtype, device=w.device)
        head._meerkat_widen = buf  # a plain attribute: not a parameter or buffer, never saved
    return buf


def load_tokenizer(root: Path) -> Any | None:
    """The directory's tokenizer, or None when it has no tokenizer files."""
    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    if not any((root / n).is_file() for n in names):
        log.info("%s has no tokenizer files; LoadedModel.tokenizer is None", root)
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(root))


_load_tokenizer = load_tokenizer  # the old private name (coordinator/selfcheck.py imports it)


def weight_bytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters and buffers (quantized storage + quant states)."""
    total = 0
    seen: set[int] = set()
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
        qs = getattr(t, "quant_state", None)
        if qs is not None:
            total += _quant_state_bytes(qs)
        scb = getattr(t, "SCB", None)
        if isinstance(scb, Tensor):
            total += scb.numel() * scb.element_size()
    return total


def _quant_state_bytes(qs: Any) -> int:
    total = 0
    for key in ("absmax", "code"):
        t = getattr(qs, key, None)
        if isinstance(t, Tensor):
            total += t.numel() * t.element_size()
    inner = getattr(qs, "state2", None)
    return total + (_quant_state_bytes(inner) if inner is not None else 0)


__all__ = [
    "LoadedModel",
    "MaskLike",
    "QUANTS",
    "Quant",
    "cpu_has_bf16",
    "default_compute_dtype",
    "load_model",
    "load_tokenizer",
    "weight_bytes",
]
