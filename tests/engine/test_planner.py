"""Memory planner: impossible budgets are refused naming the numbers; feasible ones give a micro-batch
whose predicted need fits; the meter sees a real allocation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from edge_client.engine.planner import GIB, MemoryBudgetError, MemoryMeter, plan_memory, step_sidecar_bytes
from shared.modelload import load_model, weight_bytes


def test_impossible_budget_is_refused_with_the_numbers(llama_dir: Path, llama_mask: dict[str, torch.Tensor]) -> None:
    """(d) weights alone exceed the budget: MemoryBudgetError names weights, side-car, one sequence, budget."""
    lm = load_model(llama_dir, "nf4", "cpu", llama_mask, torch.float32, fingerprint="0" * 64)
    budget = 0.5 * weight_bytes(lm.model) / GIB
    with pytest.raises(MemoryBudgetError) as info:
        plan_memory(lm.model, budget, seq_len=64, sidecar=lm.sidecar)
    msg = str(info.value)
    for word in ("weights", "side-car", "one sequence of 64 tokens", f"> budget {budget:.3f} GiB"):
        assert word in msg, msg
    assert f"weights {weight_bytes(lm.model) / GIB:.3f} GiB" in msg


def test_feasible_budget_gives_a_fitting_micro_batch(llama_dir: Path, llama_mask: dict[str, torch.Tensor]) -> None:
    lm = load_model(llama_dir, "nf4", "cpu", llama_mask, torch.float32, fingerprint="0" * 64)
    big = plan_memory(lm.model, 4.0, seq_len=128, sidecar=lm.sidecar, max_micro_batch=32)
    assert big.micro_batch == 32
    assert big.weights_bytes == weight_bytes(lm.model)
    assert big.sidecar_bytes == step_sidecar_bytes(lm.sidecar, lm.model) > step_sidecar_bytes(lm.sidecar) > 0
    # buffer 4 + index 8 + v_0 copy 4 + backup 4 + z 4 bytes per entry, plus the layers' plans (<= 32)
    assert lm.sidecar is not None and 24 * lm.sidecar.nnz < big.sidecar_bytes <= 56 * lm.sidecar.nnz
    assert big.per_seq_bytes > 0
    # a budget that leaves room for ~3 sequences on top of what is fixed
    budget = big.need_bytes(3) + big.per_seq_bytes // 2
    small = plan_memory(lm.model, budget / GIB, seq_len=128, sidecar=lm.sidecar, max_micro_batch=32)
    assert 1 <= small.micro_batch <= 32
    assert small.need_bytes(small.micro_batch) <= small.budget_bytes
    assert "micro-batch" in small.describe()


def test_bad_arguments(llama_dir: Path) -> None:
    lm = load_model(llama_dir, "none", "cpu", None, torch.float32, fingerprint="0" * 64)
    with pytest.raises(ValueError, match="budget_gib"):
        plan_memory(lm.model, 0.0, 16)
    with pytest.raises(ValueError, match="seq_len"):
        plan_memory(lm.model, 1.0, 1)


def test_meter_sees_an_allocation() -> None:
    meter = MemoryMeter("cpu")

    def work() -> float:
        x = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        return float(x.sum())

    out, peak = meter.measure(work)
    assert out == 64 * 2**20 // 4
    assert peak >= 48 * 2**20
    _, small = meter.measure(lambda: torch.ones(16).sum())
    assert small < 16 * 2**20


def test_meter_leaves_out_file_backed_pages(tmp_path: Path) -> None:
    """Pages of a mmapped file (a checkpoint from_pretrained keeps mapped) are not private memory:
    reading 64 MiB of a mapped file during the call adds ~0, while an allocation beside it counts."""
    path = tmp_path / "weights.bin"
    n = 64 * 2**20 // 4
    torch.ones(n).numpy().tofile(path)
    mapped = torch.from_file(str(path), shared=True, size=n, dtype=torch.float32)  # mmap, not read yet
    meter = MemoryMeter("cpu")
    out, peak = meter.measure(lambda: float(mapped.sum()))  # faults the 64 MiB of file pages in
    assert out == n
    assert peak < 16 * 2**20, peak

    def both() -> float:
        x = mapped * 2  # 64 MiB private
        return float(x.sum())

    _, peak = meter.measure(both)
    assert peak >= 48 * 2**20, peak


def test_per_sequence_slope_is_read_over_one_and_four_sequences(
    llama_dir: Path, llama_mask: dict[str, torch.Tensor], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The slope is (peak(4) - peak(1)) / 3; a device whose 4-sequence calibration runs out of memory
    falls back to the slope over 1 and 2 sequences instead of being refused."""
    from edge_client.engine import planner

    lm = load_model(llama_dir, "nf4", "cpu", llama_mask, torch.float32, fingerprint="0" * 64)
    mib = 1 << 20
    peaks = {1: 50 * mib, 2: 53 * mib, 4: 80 * mib}
    calls: list[int] = []

    def fake(model: object, meter: object, batch: int, seq_len: int, pad_id: int) -> int:
        calls.append(batch)
        return peaks[batch]

    monkeypatch.setattr(planner, "_calibrate", fake)
    plan = plan_memory(lm.model, 4.0, seq_len=64, sidecar=lm.sidecar, safety=1.0)
    assert calls == [1, 4]
    assert (plan.per_seq_bytes, plan.fixed_bytes) == (10 * mib, 40 * mib)

    def oom_at_four(model: object, meter: object, batch: int, seq_len: int, pad_id: int) -> int:
        calls.append(batch)
        if batch == 4:
            raise planner.MemoryBudgetError("calibration with 4 sequence(s) ran out of memory")
        return peaks[batch]

    calls.clear()
    monkeypatch.setattr(planner, "_calibrate", oom_at_four)
    plan = plan_memory(lm.model, 4.0, seq_len=64, sidecar=lm.sidecar, safety=1.0)
    assert calls == [1, 4, 2]
    assert (plan.per_seq_bytes, plan.fixed_bytes) == (3 * mib, 47 * mib)
