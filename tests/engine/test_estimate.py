"""The config-only memory estimate agrees with what a loaded model holds (weights counted exactly,
side-car an upper bound) and with the planner's component formula; bad arguments are refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from edge_client.engine.estimate import GIB, estimate_memory
from edge_client.engine.planner import step_sidecar_bytes
from shared.modelload import Quant, load_model, weight_bytes


@pytest.mark.parametrize("quant", ["nf4", "int8", "none"])
def test_weights_match_the_loaded_model(quant: Quant, qwen2_dir: Path, llama_mask: dict[str, torch.Tensor]) -> None:
    """Shapes from config.json alone (meta device) give the bytes the quantized model really holds."""
    lm = load_model(qwen2_dir, quant, "cpu", None, torch.float32, fingerprint="0" * 64)
    est = estimate_memory(qwen2_dir / "config.json", quant, 64, 4.0, compute_dtype="float32", device="cpu")
    assert est.weights_bytes == pytest.approx(weight_bytes(lm.model), rel=0.01), quant


def test_sidecar_is_an_upper_bound(llama_dir: Path, llama_mask: dict[str, torch.Tensor]) -> None:
    lm = load_model(llama_dir, "nf4", "cpu", llama_mask, torch.float32, fingerprint="0" * 64)
    assert lm.sidecar is not None
    est = estimate_memory(llama_dir / "config.json", "nf4", 64, 4.0, compute_dtype="float32", device="cpu")
    fraction = lm.sidecar.nnz / est.linear_params
    bound = estimate_memory(llama_dir / "config.json", "nf4", 64, 4.0, compute_dtype="float32", device="cpu",
                            fraction=fraction)  # fmt: skip
    measured = step_sidecar_bytes(lm.sidecar, lm.model)
    assert measured <= bound.sidecar_bytes <= 1.01 * 56 * lm.sidecar.nnz


def test_micro_batch_fits_and_an_impossible_budget_reads_zero(llama_dir: Path) -> None:
    cfg = llama_dir / "config.json"
    big = estimate_memory(cfg, "nf4", 128, 4.0, device="cpu", max_micro_batch=8)
    assert big.micro_batch == 8
    budget = big.need_bytes(3) + big.per_seq_bytes // 2
    small = estimate_memory(cfg, "nf4", 128, budget / GIB, device="cpu")
    assert small.micro_batch == 3 and small.need_bytes(3) <= small.budget_bytes
    assert estimate_memory(cfg, "nf4", 128, big.weights_bytes / 2 / GIB, device="cpu").micro_batch == 0
    # longer sequences cost more per sequence (activations linear, attention scores quadratic)
    assert estimate_memory(cfg, "nf4", 256, 4.0, device="cpu").per_seq_bytes > 2 * big.per_seq_bytes


def test_bad_arguments(llama_dir: Path) -> None:
    cfg = llama_dir / "config.json"
    with pytest.raises(ValueError, match="quant"):
        estimate_memory(cfg, "fp8", 128, 4.0)
    with pytest.raises(ValueError, match="compute_dtype"):
        estimate_memory(cfg, "nf4", 128, 4.0, compute_dtype="int4")
    with pytest.raises(ValueError, match="seq_len"):
        estimate_memory(cfg, "nf4", 1, 4.0)
