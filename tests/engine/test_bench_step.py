"""`meerkat bench step --json` runs end to end on a tiny shape and prints its JSON result last."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.parametrize("quant, loss", [("nf4", "lm"), ("int8", "label")])
def test_bench_step_json_last(quant: str, loss: str) -> None:
    cmd = [sys.executable, "-m", "shared.cli", "bench", "step", "--quant", quant, "--loss", loss, "--layers", "1",
           "--hidden", "64", "--vocab", "512", "--batch", "2", "--seq", "16", "--repeats", "1", "--threads", "1",
           "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["bench"] == "step" and result["quant"] == quant and result["loss"] == loss
    assert result["nnz"] > 0 and result["model_layers"] == 1
    for key in ("plain_fwd_ms", "sidecar_fwd_ms", "step_ms", "infer_live_mib", "step_live_mib"):
        assert result[key] > 0, key
    assert result["step_over_sidecar_fwd"] == pytest.approx(result["step_ms"] / result["sidecar_fwd_ms"], rel=0.01)
    if quant == "int8":
        assert "inputs will be cast" not in out.stderr  # bitsandbytes' per-call int8 warning is silenced


def test_bench_step_times_a_model_directory(llama_dir: object) -> None:
    """--model DIR: a local checkpoint instead of a built shape, with the planner's prediction beside it."""
    cmd = [sys.executable, "-m", "shared.cli", "bench", "step", "--model", str(llama_dir), "--batch", "2", "--seq", "16",
           "--repeats", "1", "--threads", "1", "--mask-fraction", "0.01", "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["model"] == str(llama_dir) and result["model_type"] == "llama" and result["model_layers"] == 2
    assert result["nnz"] > 0 and result["params"] > 0 and result["sidecar_mode"] in ("correct", "tile", "auto")
    assert result["planner_need_mib"] > 0 and result["planner_error"] > -1
    # the planner's basis: private peak + file-backed weights - what load_model leaves that is no tensor
    need = result["step_rss_peak_mib"] + result["mapped_weights_mib"] - result["load_overhead_mib"]
    assert result["step_need_mib"] == pytest.approx(need, abs=0.2)
    assert result["load_overhead_mib"] >= 0


def test_file_backed_bytes_counts_mapped_weights_only(tmp_path: Path) -> None:
    """A parameter that is a view of a mmapped file is file-backed (not in the private RSS); others are not."""
    import torch

    from bench.step import file_backed_bytes

    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Linear(32, 16))
    assert file_backed_bytes(model) == 0
    path = tmp_path / "w.bin"
    torch.zeros(32 * 64).numpy().tofile(path)
    mapped = torch.from_file(str(path), shared=True, size=32 * 64, dtype=torch.float32).view(32, 64)
    model[0].weight = torch.nn.Parameter(mapped, requires_grad=False)
    assert file_backed_bytes(model) == 32 * 64 * 4


def test_presets_build_the_published_shapes() -> None:
    """Every preset is a config transformers accepts, with the published sizes (checked on the meta device)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from bench.step import PRESETS

    want_params = {"qwen2.5-0.5b": 0.49e9, "llama-3.2-1b": 1.24e9, "llama-3.2-3b": 3.21e9, "gemma-2-2b": 2.61e9, "phi-3-mini": 3.82e9}
    for name, cfg in PRESETS.items():
        values = dict(cfg)
        config = AutoConfig.for_model(values.pop("model_type"), **values)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        n = sum(p.numel() for p in model.parameters())
        assert n == pytest.approx(want_params[name], rel=0.02), (name, n)
