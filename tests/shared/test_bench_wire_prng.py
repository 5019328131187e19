"""`meerkat bench wire|prng --json`: last stdout line is JSON with the measured numbers."""

from __future__ import annotations

import json
from typing import Any

import pytest

from shared.cli import main


def _last_json(capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    lines = capsys.readouterr().out.strip().splitlines()
    out = json.loads(lines[-1])
    assert isinstance(out, dict)
    return out


def test_bench_wire_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "wire", "--json", "--reps", "50", "--big-fleet", "50"]) == 0
    out = _last_json(capsys)
    sizes = out["update_bytes"]
    assert isinstance(sizes, dict) and set(sizes) == {"1", "10", "100"}
    assert sizes["1"] < sizes["10"] < sizes["100"]
    assert sizes["10"] <= 80 and out["update_bytes_per_step_T10"] == sizes["10"] / 10
    assert isinstance(out["round_result_bytes_10clients_T10"], int) and out["round_result_bytes_10clients_T10"] < 1024
    assert out["targets_met"] is True


def test_bench_prng_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "prng", "--json", "--n", "50000", "--repeats", "3", "--steps", "2"]) == 0
    out = _last_json(capsys)
    assert out["n"] == 50000 and out["device"] == "cpu"
    for key in ("rademacher_ms_best", "gaussian_ms_best", "apply_round_ms_best"):
        assert isinstance(out[key], float) and out[key] > 0
