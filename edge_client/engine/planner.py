"""Memory planner: does the model fit the device budget, and how many sequences per micro-batch?

    need(b) = weights + side-car + fixed + b * per_sequence        must be <= budget

- weights: bytes of parameters + buffers + quantization states (counted, not guessed);
- side-car: the flat buffer, its indices, the CPU copy of v_0, the wrapped layers' correction plans
  and the two nnz-sized temporaries of a step (backup, z);
- fixed, per_sequence: measured by calibration forwards of the step's loss (LM loss over every
  position: the worst case) at micro-batch 1 and 4 of `seq_len` tokens. per_sequence = (peak(4) -
  peak(1)) / 3, fixed = peak(1) - per_sequence (the dequantized weight tile, the rotary cache, ...).
  Three sequences apart, not one: a CPU peak moves by whole malloc arenas and mmap thresholds, and a
  slope over one sequence read anything from 0 to 2x the real one at 0.5B.
  CUDA: torch.cuda peak allocated bytes. CPU: the process's peak private RSS above the private RSS
  before the call (see MemoryMeter).

On CPU the budget covers what the model needs, not the interpreter and libraries already loaded.
CPU memory is counted without file-backed pages (RssFile: library code and the mmapped safetensors
checkpoint, which from_pretrained keeps mapped and whose clean pages the kernel can drop and re-read):
a model tensor that stays a view of the mmapped checkpoint (a bf16 embedding table) is counted once,
in `weights`, and the checkpoint pages read while quantizing do not count at all.
`MemoryMeter` is also what the client uses to record the peak memory of each round.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import psutil
import torch
from torch import nn

from edge_client.engine.procmem import clear_peak, status_bytes, trim_heap
from shared.dataset import Example
from shared.loss import model_device, target_losses
from shared.modelload import weight_bytes
from shared.sidecar import SideCar

log = logging.getLogger(__name__)

GIB = float(1 << 30)
WIDE = 4  # the second calibration's micro-batch: the per-sequence slope is read over WIDE - 1 sequences


class MemoryBudgetError(RuntimeError):
    """The model does not fit the budget even with one sequence per micro-batch; names the numbers."""


class MemoryMeter:
    """Peak memory of a stretch of work: reset(), run, peak(). CUDA allocator stats or CPU private RSS.

    CPU (Linux): current() is the private RSS (VmRSS - RssFile: anonymous and shared-memory pages);
    peak() is VmHWM - RssFile, with VmHWM reset through /proc/self/clear_refs (after returning freed
    heap with malloc_trim). VmHWM counts file-backed pages too; subtracting the file-backed RSS at the
    end is exact while that stays constant during the call, and reads low by the file pages faulted in
    after the private peak otherwise (a first forward over a mmapped tensor: the planner's safety
    factor covers it). Elsewhere: psutil's RSS, sampled at the end only.
    """

    def __init__(self, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self._proc = psutil.Process()
        self._hwm_ok = self.device.type == "cpu" and _can_reset_hwm()
        self._sampled_peak = 0

    def current(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.memory_allocated(self.device))
        if self._hwm_ok:
            rss, file, _ = status_bytes()
            return rss - file
        return int(self._proc.memory_info().rss)

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        trim_heap()
        if self._hwm_ok:
            clear_peak()  # keeps the erased mark: the heartbeat's peak since start survives (procmem)
        self._sampled_peak = self.current()

    def peak(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return int(torch.cuda.max_memory_allocated(self.device))
        if self._hwm_ok:
            rss, file, hwm = status_bytes()
            return max(hwm - file, rss - file)
        self._sampled_peak = max(self._sampled_peak, self.current())  # no HWM reset: best effort
        return self._sampled_peak

    def measure(self, fn: Callable[[], Any]) -> tuple[Any, int]:
        """Run fn; return (its result, peak bytes above the memory in use before it)."""
        self.reset()
        before = self.current()
        out = fn()
        return out, max(0, self.peak() - before)


def _can_reset_hwm() -> bool:
    try:
        clear_peak()
        return True
    except (OSError, RuntimeError):
        log.info("cannot reset peak RSS (/proc/self/clear_refs); CPU peaks are sampled at the end only")
        return False


@dataclass(frozen=True)
class MemoryPlan:
    micro_batch: int
    seq_len: int
    budget_bytes: int
    weights_bytes: int
    sidecar_bytes: int
    fixed_bytes: int
    per_seq_bytes: int
    device: str

    def need_bytes(self, micro_batch: int) -> int:
        return self.weights_bytes + self.sidecar_bytes + self.fixed_bytes + micro_batch * self.per_seq_bytes

    def describe(self) -> str:
        return (
            f"micro-batch {self.micro_batch} x {self.seq_len} tokens: weights {self.weights_bytes / GIB:.3f} GiB"
            f" + side-car {self.sidecar_bytes / GIB:.4f} GiB + fixed {self.fixed_bytes / GIB:.3f} GiB"
            f" + {self.micro_batch} x {self.per_seq_bytes / GIB:.4f} GiB per sequence"
            f" = {self.need_bytes(self.micro_batch) / GIB:.3f} GiB of budget {self.budget_bytes / GIB:.3f} GiB"
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def step_sidecar_bytes(sidecar: SideCar | None, model: nn.Module | None = None) -> int:
    """Buffer + indices + the CPU copy of v_0 + the step's two nnz-sized temporaries (backup copy,
    direction z) + with `model`, the correction plans its wrapped layers hold (row, column, touched rows
    and their counts: up to 32 bytes per masked entry)."""
    if sidecar is None:
        return 0
    plans = 0
    if model is not None:
        from shared.sidecar import sidecar_layers

        for _, layer in sidecar_layers(model):
            for t in (layer.sidecar_row_of, layer.sidecar_cols, layer.sidecar_rows, layer.sidecar_counts):
                plans += t.numel() * t.element_size()
    return sidecar.nbytes() + 4 * sidecar.nnz + 2 * 4 * sidecar.nnz + plans


def plan_memory(
    model: nn.Module,
    budget_gib: float,
    seq_len: int,
    device: str | torch.device | None = None,
    *,
    sidecar: SideCar | None = None,
    max_micro_batch: int = 64,
    safety: float = 1.15,
    pad_id: int = 0,
) -> MemoryPlan:
    """Measure and pick the largest micro-batch (<= max_micro_batch) that fits `budget_gib`."""
    if not (math.isfinite(budget_gib) and budget_gib > 0):
        raise ValueError(f"budget_gib must be a finite number > 0, got {budget_gib!r}")
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    dev = torch.device(device) if device is not None else model_device(model)
    budget = int(budget_gib * GIB)
    weights = weight_bytes(model)
    side = step_sidecar_bytes(sidecar, model)
    meter = MemoryMeter(dev)
    peaks = {1: _calibrate(model, meter, 1, seq_len, pad_id)}
    wide = WIDE
    try:
        peaks[wide] = _calibrate(model, meter, wide, seq_len, pad_id)
    except MemoryBudgetError:  # a device that holds 1-3 sequences (CUDA OOM): the slope over one
        wide = 2
        peaks[wide] = _calibrate(model, meter, wide, seq_len, pad_id)
    per_seq = max((peaks[wide] - peaks[1]) // (wide - 1), 1)
    fixed = max(peaks[1] - per_seq, 0)
    per_seq_safe = int(per_seq * safety)
    one = weights + side + fixed + per_seq_safe
    log.info("planner: weights %d B, side-car %d B, calibration peaks %s (seq_len %d)", weights, side, peaks, seq_len)
    if one > budget:
        raise MemoryBudgetError(
            f"memory budget {budget_gib:.3f} GiB is too small for one sequence of {seq_len} tokens: "
            f"weights {weights / GIB:.3f} GiB + side-car {side / GIB:.4f} GiB + fixed {fixed / GIB:.3f} GiB"
            f" + one sequence {per_seq_safe / GIB:.4f} GiB = {one / GIB:.3f} GiB > budget {budget_gib:.3f} GiB"
        )
    micro = min(max_micro_batch, (budget - weights - side - fixed) // per_seq_safe)
    plan = MemoryPlan(int(micro), seq_len, budget, weights, side, fixed, per_seq_safe, str(dev))
    log.info("memory plan: %s", plan.describe())
    return plan


def _calibrate(model: nn.Module, meter: MemoryMeter, batch: int, seq_len: int, pad_id: int) -> int:
    """Peak bytes of the step's loss on `batch` sequences of `seq_len` tokens (all targets)."""
    vocab = int(getattr(getattr(model, "config", None), "vocab_size", 2) or 2)
    examples = [Example(tuple((7 * i + j) % vocab for j in range(seq_len)), seq_len - 1) for i in range(batch)]
    try:
        with torch.no_grad():
            _, peak = meter.measure(lambda: target_losses(model, examples, pad_id).sum().item())
    except torch.OutOfMemoryError as exc:
        raise MemoryBudgetError(f"calibration with {batch} sequence(s) of {seq_len} tokens ran out of memory: {exc}") from exc
    return int(peak)


__all__ = ["GIB", "MemoryBudgetError", "MemoryMeter", "MemoryPlan", "plan_memory", "step_sidecar_bytes"]
