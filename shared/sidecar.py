"""The exact sparse side-car: the masked weights of a (quantized) model in ONE flat fp32 buffer.

Flat order (the same everywhere: mask file, coordinator, every device): layers in sorted name order,
each layer's sorted flat indices in ascending order. `SideCar.values` is that buffer on the model
device; `SideCar.view(name)` is the layer's slice of it (a view: a perturbation of the whole buffer is
one kernel and every wrapped layer sees it at its next forward).

`SideCarLinear` wraps a Linear (plain, bitsandbytes `Linear4bit` or `Linear8bitLt`) PEFT style: it
keeps `base_layer` and adds its own output. For a quantized base ("correct" mode):

    y = base_layer(x)                                  the quantized kernel, untouched
    y[..., rows] += x[..., cols] * view                sparse correction, fp32 products, one add per row

where (rows, cols) = divmod(indices, in_features). The masked positions were zeroed before
quantization (see shared/modelload.py; 0 is exact in NF4 and int8), so base + correction computes with
exactly the side-car at those positions and the effective weight does not depend on the quantization
error there. The correction costs tokens x nnz gathered multiply-adds instead of dequantising the
whole weight tile every forward (the previous design; a fifth of an fp32 forward at the 1B shape on
CPU, BENCHMARKS.md). Its sums run in a fixed order on each device (see `_add_correction`), so a
device computes the same bits every time. "tile" mode (dequantise the tile, overwrite the masked
entries, F.linear) is the cheaper one on a CPU computing in bf16 and for many tokens per call; "auto"
picks per call by the token count: `default_sidecar_mode`. For a plain (unquantized) base the
side-car is written into the weight in place before each forward (the weight *aliases* the buffer at
the masked positions; no copy of the tile is made).
"""

from __future__ import annotations

import importlib
import json
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import Tensor, nn

from shared.maskfile import flat_offsets

log = logging.getLogger(__name__)


class SideCarError(ValueError):
    """A side-car does not fit its model or checkpoint; the message names the layer."""


class SideCar:
    """One flat fp32 buffer (nnz,) of masked values with per-layer views, in sorted-layer-name order."""

    def __init__(
        self,
        layers: Mapping[str, Tensor],
        initial: Tensor,
        device: str | torch.device = "cpu",
    ) -> None:
        self.layer_names: list[str] = sorted(layers)
        for name in self.layer_names:
            idx = layers[name]
            if idx.dtype != torch.int64 or idx.dim() != 1:
                raise SideCarError(f"layer {name!r}: indices must be 1-D int64, got {idx.dtype} {tuple(idx.shape)}")
        self.offsets: dict[str, tuple[int, int]] = flat_offsets(layers)
        self.nnz = sum(b - a for a, b in self.offsets.values())
        if initial.dtype != torch.float32 or tuple(initial.shape) != (self.nnz,):
            raise SideCarError(
                f"initial values must be float32 ({self.nnz},), got {initial.dtype} {tuple(initial.shape)}"
            )
        self.device = torch.device(device)
        self._initial = initial.detach().to("cpu", copy=True)
        self.indices: dict[str, Tensor] = {n: layers[n].to(self.device) for n in self.layer_names}
        self.values: Tensor = self._initial.to(self.device, copy=True)  # (nnz,) never rebound

    def view(self, name: str) -> Tensor:
        """The layer's slice of `values` (shares storage)."""
        if name not in self.offsets:
            raise SideCarError(f"layer {name!r} is not in the side-car")
        a, b = self.offsets[name]
        return self.values[a:b]

    def initial_values(self) -> Tensor:
        """Original checkpoint weights at the mask (v_0, fp32, CPU): a fresh copy."""
        return self._initial.clone()

    def get_values(self) -> Tensor:
        """Current values as a CPU fp32 copy."""
        return self.values.detach().to("cpu", copy=True)

    def set_values(self, values: Tensor) -> None:
        """Overwrite the buffer in place (views stay valid); rejects wrong shape/dtype and NaN/inf."""
        if not isinstance(values, Tensor) or values.dtype != torch.float32 or tuple(values.shape) != (self.nnz,):
            what = f"{values.dtype} {tuple(values.shape)}" if isinstance(values, Tensor) else type(values).__name__
            raise SideCarError(f"set_values expects float32 ({self.nnz},), got {what}")
        if not bool(torch.isfinite(values).all()):
            raise SideCarError("set_values: values contain NaN or inf")
        with torch.no_grad():
            self.values.copy_(values)

    def nbytes(self) -> int:
        """Bytes of the buffer plus its indices on the device."""
        return self.values.numel() * 4 + sum(t.numel() * 8 for t in self.indices.values())


def bnb_module() -> Any:
    """bitsandbytes, imported lazily (a model without quantization never needs it), typed loosely."""
    return importlib.import_module("bitsandbytes")


def dequantize_weight(layer: nn.Module, dtype: torch.dtype | None = None) -> Tensor:
    """Dense (out, in) weight of a plain / bnb 4-bit / bnb 8-bit Linear as a NEW tensor in `dtype`."""
    bnb = bnb_module()
    weight: Any = layer.weight
    w: Tensor
    if isinstance(layer, bnb.nn.Linear4bit):
        _unpack_cpu_4bit(layer)
        weight = layer.weight
        w = bnb.functional.dequantize_4bit(weight.data, weight.quant_state)
    elif isinstance(layer, bnb.nn.Linear8bitLt):
        state = getattr(layer, "state", None)  # after its first forward the int8 weight lives in layer.state
        cb = getattr(weight, "CB", None)
        cb = cb if cb is not None else getattr(state, "CB", None)
        scb = getattr(weight, "SCB", None)
        scb = scb if scb is not None else getattr(state, "SCB", None)
        if cb is None or scb is None:
            raise SideCarError("Linear8bitLt has no int8 weight (CB/SCB): was it moved to a device?")
        w = bnb.functional.int8_vectorwise_dequant(cb, scb)
    else:
        w = weight.detach().clone()
    return w.to(dtype) if dtype is not None and w.dtype != dtype else w


def _unpack_cpu_4bit(layer: Any) -> None:
    """bnb repacks a CPU 4-bit weight for its bf16 kernel on its first forward; undo that once."""
    qs = layer.weight.quant_state
    if getattr(qs, "packing_format_for_cpu", False):
        inverse = importlib.import_module("bitsandbytes.nn.modules")._convert_weight_packed_for_cpu_inverse
        layer.weight.data, layer.weight.quant_state = inverse(layer.weight.data, qs)
        layer.quant_state = layer.weight.quant_state


SideCarMode = Literal["correct", "tile", "auto"]
SIDECAR_MODES: tuple[str, ...] = ("correct", "tile", "auto")
# "auto": the correction while tokens x nnz x GATHER_COST <= out x in (the tile's dequantisation), else
# the tile; a gathered product costs ~3 dequantised weights on CPU (BENCHMARKS.md "side-car modes")
GATHER_COST = 3


def default_sidecar_mode(device: torch.device, compute_dtype: torch.dtype) -> SideCarMode:
    """How a quantized layer computes, whichever profiled cheaper (BENCHMARKS.md "side-car modes").

    CPU in fp32 (no AVX512-BF16): "auto", per call -- the correction for few tokens (a 1B model at
    batch 1 x 128: 1.035x the plain forward vs the tile's 1.107x), the tile for many (the default
    8 x 128 bench). CPU in bf16: "tile" (dequantise + a bf16 matmul costs what bnb's own kernel does,
    the correction's bf16 gathers a quarter of a forward). CUDA: "tile", the measured design (1.33x
    on an H200); the correction has not been profiled on a GPU yet.
    """
    if device.type == "cpu" and compute_dtype == torch.float32:
        return "auto"
    return "tile"


class SideCarLinear(nn.Module):
    """A Linear whose weight at `indices` is `view` (a slice of the side-car buffer). Wraps `base_layer`."""

    def __init__(
        self,
        base_layer: nn.Module,
        view: Tensor,
        indices: Tensor,
        compute_dtype: torch.dtype,
        mode: SideCarMode = "correct",
    ) -> None:
        super().__init__()
        if mode not in SIDECAR_MODES:
            raise SideCarError(f"side-car mode must be one of {SIDECAR_MODES}, got {mode!r}")
        self.mode = mode
        out_f, in_f = _shape(base_layer)
        if view.shape != indices.shape:
            raise SideCarError(f"view {tuple(view.shape)} and indices {tuple(indices.shape)} differ")
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= out_f * in_f):
            raise SideCarError(f"indices out of range for a ({out_f}, {in_f}) weight")
        self.base_layer = base_layer
        self.in_features, self.out_features = in_f, out_f
        self.compute_dtype = compute_dtype
        self.is_quantized = _is_bnb(base_layer)
        # plain attributes, not buffers: they must keep aliasing the side-car after state_dict/to() calls
        self.sidecar_view = view
        self.sidecar_indices = indices
        # the correction's gather/scatter plan: row and column of each entry, touched rows and their counts
        self.sidecar_row_of, self.sidecar_cols = indices // in_f, indices % in_f
        self.sidecar_rows, self.sidecar_counts = torch.unique_consecutive(self.sidecar_row_of, return_counts=True)

    @property
    def weight(self) -> Tensor:
        w: Tensor = getattr(self.base_layer, "weight")  # noqa: B009
        return w

    @property
    def bias(self) -> Tensor | None:
        b: Tensor | None = getattr(self.base_layer, "bias", None)
        return b

    def effective_weight(self) -> Tensor:
        """The (out, in) weight this layer computes with, as a new fp32 tensor (tests, export)."""
        with torch.no_grad():
            w = dequantize_weight(self.base_layer, torch.float32)
            w.view(-1).index_copy_(0, self.sidecar_indices, self.sidecar_view.float())
        return w

    def forward(self, x: Tensor) -> Tensor:
        if not self.is_quantized:
            return self._dense_forward(x)
        if self.mode == "tile" or (
            self.mode == "auto"
            and x.numel() // self.in_features * self.sidecar_indices.numel() * GATHER_COST
            > self.in_features * self.out_features
        ):
            return self._tile_forward(x)
        y: Tensor = self.base_layer(x)
        if self.sidecar_indices.numel() == 0:
            return y
        return self._add_correction(x, y)

    def _tile_forward(self, x: Tensor) -> Tensor:
        """Dequantise the tile in the compute dtype, overwrite the masked entries, F.linear."""
        with torch.no_grad():
            w = dequantize_weight(self.base_layer, self.compute_dtype)
            w.view(-1).index_copy_(0, self.sidecar_indices, self.sidecar_view.to(w.dtype))
        bias = self.bias
        if bias is not None and bias.dtype != w.dtype:
            bias = bias.to(w.dtype)
        return F.linear(x.to(w.dtype), w, bias).to(x.dtype)

    def _dense_forward(self, x: Tensor) -> Tensor:
        w = self.weight.data
        with torch.no_grad():  # write in place: the weight aliases the buffer at the masked positions
            w.view(-1).index_copy_(0, self.sidecar_indices, self.sidecar_view.to(w.dtype))
        bias = self.bias
        if bias is not None and bias.dtype != w.dtype:
            bias = bias.to(w.dtype)
        return F.linear(x.to(w.dtype), w, bias).to(x.dtype)

    def _add_correction(self, x: Tensor, y: Tensor) -> Tensor:
        """y[..., r] += sum over masked (r, c) of x[..., c] * v, products in fp32, in a fixed order.

        CPU: one gather of (N, nnz) products and ONE index_add_ into y's columns, which walks the
        indices in order (index ops pay per index, so the fewest index passes win; profiled in
        BENCHMARKS.md). CUDA: index_add_ would use atomics (no fixed order), so each row's run of
        products is summed by `segment_reduce` first and the touched rows, unique, are added once.
        """
        xs = x.reshape(-1, self.in_features)
        ys = y.reshape(-1, self.out_features)
        if ys.device.type != "cuda":
            contrib = xs.float().index_select(1, self.sidecar_cols).mul_(self.sidecar_view)  # (N, nnz)
            ys.index_add_(1, self.sidecar_row_of, contrib.to(ys.dtype))
            return ys.view(y.shape)
        xt = xs.t().float().contiguous()  # (in, N)
        contrib = xt.index_select(0, self.sidecar_cols).mul_(self.sidecar_view[:, None])  # (nnz, N)
        acc = torch.segment_reduce(contrib, "sum", lengths=self.sidecar_counts, axis=0)  # (rows touched, N)
        ys.index_add_(1, self.sidecar_rows, acc.t().to(ys.dtype))
        return ys.view(y.shape)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, nnz={self.sidecar_indices.numel()}"


def _is_bnb(layer: nn.Module) -> bool:
    try:
        bnb = bnb_module()
    except ImportError:
        return False
    return isinstance(layer, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))


def _shape(layer: nn.Module) -> tuple[int, int]:
    out_f, in_f = getattr(layer, "out_features", None), getattr(layer, "in_features", None)
    if not isinstance(out_f, int) or not isinstance(in_f, int):
        raise SideCarError(f"cannot wrap {type(layer).__name__}: not a Linear (no in/out_features)")
    return out_f, in_f


def sidecar_layers(model: nn.Module) -> Iterator[tuple[str, SideCarLinear]]:
    """(module name, wrapper) for every wrapped layer, in sorted name order."""
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, SideCarLinear)]
    yield from sorted(found, key=lambda nm: nm[0])


def attach_sidecar(
    model: nn.Module, sidecar: SideCar, compute_dtype: torch.dtype, mode: SideCarMode | None = None
) -> None:
    """Replace each masked Linear of `model` by a SideCarLinear over its slice of `sidecar`.

    `mode` (quantized layers): "correct" or "tile" (see SideCarLinear); None picks
    `default_sidecar_mode` for the side-car's device and `compute_dtype`.
    """
    mode = mode or default_sidecar_mode(sidecar.device, compute_dtype)
    modules = dict(model.named_modules())
    for name in sidecar.layer_names:
        layer = modules.get(name)
        if layer is None:
            raise SideCarError(f"mask layer {name!r} is not a module of this model")
        if isinstance(layer, SideCarLinear):
            raise SideCarError(f"layer {name!r} is already wrapped")
        out_f, in_f = _shape(layer)
        idx = sidecar.indices[name]
        if idx.numel() and int(idx[-1]) >= out_f * in_f:
            raise SideCarError(f"layer {name!r}: index {int(idx[-1])} out of range for ({out_f}, {in_f})")
        replace_module(model, name, SideCarLinear(layer, sidecar.view(name), idx, compute_dtype, mode))
    # quantized layers outside the mask get an empty slice (their forward is the base kernel alone), so
    # merged_dense_state and the export cover the whole quantized model
    empty_idx = torch.zeros(0, dtype=torch.int64, device=sidecar.device)
    for name, layer in list(model.named_modules()):
        if _is_bnb(layer) and name not in sidecar.offsets and not name.endswith(".base_layer"):
            replace_module(model, name, SideCarLinear(layer, sidecar.values[0:0], empty_idx, compute_dtype, mode))


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def merged_dense_state(model: nn.Module, dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """`{module}.weight` -> dense effective weight (dequantized base + side-car), CPU, in `dtype`.

    The side-car values are written in `dtype` after the cast (fp32 by default: exact), so an export
    built from these weights computes what the side-car model computes (up to the compute dtype).
    """
    out: dict[str, Tensor] = {}
    with torch.no_grad():
        for name, layer in sidecar_layers(model):
            w = dequantize_weight(layer.base_layer, dtype).to("cpu")
            idx = layer.sidecar_indices.to("cpu")
            w.view(-1).index_copy_(0, idx, layer.sidecar_view.detach().to("cpu", dtype))
            out[f"{name}.weight"] = w
    return out


def unwrap_dense(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Replace every SideCarLinear by a plain nn.Linear holding its merged dense weight (in place).

    What stays quantized elsewhere in the model is untouched; use it on a model whose only quantized
    layers are wrapped ones (or load with quant="none") before `save_pretrained`.
    """
    state = merged_dense_state(model, dtype)
    modules = dict(model.named_modules())
    for key, w in state.items():
        name = key[: -len(".weight")]
        layer = modules[name]
        assert isinstance(layer, SideCarLinear)
        dense = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, dtype=dtype)
        with torch.no_grad():
            dense.weight.copy_(w)
            if layer.bias is not None:
                dense.bias.copy_(layer.bias.detach().to("cpu", dtype))
        replace_module(model, name, dense)
    return model


# --- v_0 straight from the checkpoint (the coordinator needs no model load) -------------------------


def checkpoint_files(model_dir: str | Path) -> dict[str, Path]:
    """tensor name -> safetensors file that holds it, for a HF model directory."""
    root = Path(model_dir)
    index = root / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {k: root / v for k, v in weight_map.items()}
    single = root / "model.safetensors"
    if single.is_file():
        with safe_open(str(single), framework="pt") as f:
            return {k: single for k in f.keys()}
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise SideCarError(f"{root}: no safetensors weights (model.safetensors or an index) found")
    found: dict[str, Path] = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            found.update({k: path for k in f.keys()})
    return found


def initial_values_from_dir(model_dir: str | Path, mask_layers: Mapping[str, Tensor]) -> Tensor:
    """v_0: the checkpoint's weights at the mask, fp32 (nnz,), flattened in sorted-layer order.

    Reads one weight tensor at a time from the safetensors files (no model is built).
    """
    where = checkpoint_files(model_dir)
    parts: list[Tensor] = []
    for name in sorted(mask_layers):
        key = f"{name}.weight"
        if key not in where:
            near = [k for k in where if k.endswith(key.split(".", 1)[-1])][:3]
            raise SideCarError(f"mask layer {name!r}: checkpoint has no tensor {key!r} (similar: {near})")
        with safe_open(str(where[key]), framework="pt") as f:
            w = f.get_tensor(key)
        if w.dim() != 2:
            raise SideCarError(f"mask layer {name!r}: {key} is {tuple(w.shape)}, not a 2-D weight")
        idx = mask_layers[name].to("cpu", torch.int64)
        if idx.numel() and int(idx.max()) >= w.numel():
            raise SideCarError(f"mask layer {name!r}: index {int(idx.max())} out of range for {tuple(w.shape)}")
        parts.append(w.reshape(-1).index_select(0, idx).to(torch.float32))
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float32)


__all__ = [
    "SideCar",
    "SideCarError",
    "GATHER_COST",
    "SIDECAR_MODES",
    "SideCarLinear",
    "SideCarMode",
    "attach_sidecar",
    "bnb_module",
    "checkpoint_files",
    "default_sidecar_mode",
    "dequantize_weight",
    "initial_values_from_dir",
    "merged_dense_state",
    "replace_module",
    "sidecar_layers",
    "unwrap_dense",
]
