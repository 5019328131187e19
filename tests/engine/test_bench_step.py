"""`meerkat bench step --json` runs end to end on a tiny shape and prints its JSON result last."""

from __future__ import annotations

import json
import subprocess
import sys

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
