"""bf16 weights, fp32 arithmetic: the mask builder's Linear layers on a CPU without native bf16.

A CPU without AVX512-BF16 / AMX multiplies bf16 matrices 5-8x slower than fp32 ones (this repo's AMD
EPYC box, one thread, 128 x 2048 @ 2048 x 8192: fp32 125 ms, bf16 660 ms forward; 143 vs 1107 ms for
the weight gradient), so a bf16 backprop of a 1B model takes minutes per sequence. Widening the whole
model to fp32 doubles the weights' memory (a 1B model: +2.3 GiB). `widen_linears` keeps every bf16
Linear weight as it is and computes its forward and backward products in fp32, one layer's widened
copy at a time: the activations passed between layers and the weight gradients stay bf16, as in a
native bf16 backprop (the products are accumulated in fp32 there too; here the operands are exact
widenings, so the results are the same up to the order of the fp32 sums).
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class _WideLinear(torch.autograd.Function):
    """y = x W^T + b with x, W, b of one dtype, computed in fp32 and returned in that dtype."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, w)  # the narrow tensors: no fp32 copy outlives the call
        ctx.has_bias = b is not None
        y = F.linear(x.float(), w.float(), None if b is None else b.float())
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx: Any, gy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, w = ctx.saved_tensors
        g32 = gy.float()
        gx = (g32 @ w.float()).to(x.dtype) if ctx.needs_input_grad[0] else None
        gw = None
        if ctx.needs_input_grad[1]:
            gw = (g32.reshape(-1, g32.shape[-1]).t() @ x.reshape(-1, x.shape[-1]).float()).to(w.dtype)
        gb = g32.reshape(-1, g32.shape[-1]).sum(0).to(w.dtype) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return gx, gw, gb


def _wide_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    out: torch.Tensor = _WideLinear.apply(x, self.weight, self.bias)  # type: ignore[no-untyped-call]
    return out


def widen_linears(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> int:
    """Make every nn.Linear whose weight is `dtype` compute in fp32 (weights untouched); returns how many."""
    n = 0
    for module in model.modules():
        if isinstance(module, nn.Linear) and module.weight.dtype == dtype:
            module.forward = types.MethodType(_wide_forward, module)  # type: ignore[method-assign]
            n += 1
    return n


__all__ = ["widen_linears"]
