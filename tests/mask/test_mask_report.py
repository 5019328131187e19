"""Report numbers on hand-built masks: known shares, Jaccard, recall; text, JSON and PNG output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from coordinator.mask.report import (
    build_report,
    format_report,
    layer_shares,
    module_type,
    overlap,
    type_shares,
)
from shared.cli import main
from shared.maskfile import FORMAT_VERSION, Mask, MaskError, MaskMeta, save_mask

FP = "ab" * 32
SHAPES = {
    "model.layers.0.mlp.up_proj": (4, 5),
    "model.layers.1.mlp.up_proj": (4, 5),
    "model.layers.10.self_attn.q_proj": (2, 2),
}


def _mask(
    layers: dict[str, list[int]], method: str = "pretrain-grad", fp: str = FP, calib: str = "{}"
) -> Mask:
    idx = {n: torch.tensor(v, dtype=torch.int64) for n, v in layers.items()}
    meta = MaskMeta(FORMAT_VERSION, method, 0.25, calib, fp, "2025-01-01T00:00:00+00:00")
    return Mask(layers=idx, shapes={n: SHAPES[n] for n in layers}, grad=None, meta=meta)


L0, L1, L10 = sorted(SHAPES)[0], sorted(SHAPES)[1], "model.layers.10.self_attn.q_proj"
# A: 8 indices (L0: 4, L1: 2, L10: 2); B: 6 indices (L0: 3, L1: 3); shared: L0 {1, 2}, L1 {7} -> 3
A = _mask({L0: [0, 1, 2, 3], L1: [7, 19], L10: [0, 3]})
B = _mask({L0: [1, 2, 9], L1: [5, 7, 8]}, method="random")


def test_overlap_on_known_sets() -> None:
    o = overlap(A, B)
    assert o["intersection"] == 3
    assert o["jaccard"] == pytest.approx(3 / (8 + 6 - 3))
    assert o["recall_a_in_b"] == pytest.approx(3 / 8) and o["recall_b_in_a"] == pytest.approx(3 / 6)
    assert overlap(A, A) == {"intersection": 8, "jaccard": 1.0, "recall_a_in_b": 1.0, "recall_b_in_a": 1.0}


def test_overlap_refuses_mismatched_shapes() -> None:
    other = Mask(layers={L0: torch.tensor([1])}, shapes={L0: (5, 4)}, grad=None, meta=A.meta)
    with pytest.raises(MaskError, match=f"layer {L0}: shape"):
        overlap(A, other)


def test_layer_and_type_shares() -> None:
    rows = layer_shares(A)
    assert [r["layer"] for r in rows] == [L0, L1, L10]  # natural order: 10 after 1
    assert [r["nnz"] for r in rows] == [4, 2, 2]
    assert [r["share"] for r in rows] == [0.5, 0.25, 0.25]
    assert [r["density"] for r in rows] == [4 / 20, 2 / 20, 2 / 4]
    assert type_shares(A) == {"mlp.up_proj": 0.75, "self_attn.q_proj": 0.25}
    assert (
        module_type("model.layers.3.self_attn.q_proj") == "self_attn.q_proj"
        and module_type("lm_head") == "lm_head"
    )


def test_report_dict_and_table() -> None:
    stats = {
        "concentration": {
            "fraction": 0.25, "k": 8, "n_weights": 44, "top_mean_sq": 5.0, "next_tier_mean_sq": 0.1,
            "ratio_next_tier": 50.0, "band": [0.25, 1.0], "band_mean_sq": 0.05, "ratio_band": 100.0,
            "overall_mean_sq": 1.0, "top_mass_share": 0.9,
        },
        "mask_mean_sq": 5.0,
        "mask_mass_share": 0.9,
    }  # fmt: skip
    a = _mask({L0: [0, 1, 2, 3], L1: [7, 19], L10: [0, 3]}, calib=json.dumps({"files": [], "stats": stats}))
    rep = build_report([a, B], ["a.safetensors", "b.safetensors"])
    assert rep["warnings"] == []
    assert rep["masks"][0]["stored_stats"] == stats and rep["masks"][1]["stored_stats"] is None
    assert rep["overlap"] == [{"a": "a.safetensors", "b": "b.safetensors", **overlap(A, B)}]
    text = format_report(rep)
    assert "0.273" in text  # Jaccard 3/11
    assert "50x the next tier" in text and "100x the 25%..100% band" in text
    assert "75.00%" in text and "50.00%" in text  # mlp.up_proj share of A; L1 share of B (3 of 6)
    mixed = build_report([A, _mask({L0: [1]}, fp="cd" * 32)], ["a", "c"])
    assert mixed["warnings"] == ["masks were built for different base models (fingerprints differ)"]


def test_cli_report_json_and_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    save_mask(A, tmp_path / "a.safetensors")
    save_mask(B, tmp_path / "b.safetensors")
    paths = [str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")]
    png = tmp_path / "r.png"
    assert main(["mask", "report", *paths, "--json", "--png", str(png)]) == 0
    rep = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rep["overlap"][0]["intersection"] == 3 and rep["masks"][1]["method"] == "random"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["mask", "report", *paths]) == 0
    assert "recall A in B" in capsys.readouterr().out
    assert main(["mask", "report", str(tmp_path / "missing.safetensors")]) == 2
    assert "mask file not found" in capsys.readouterr().err
    assert main(["mask", "report", paths[0], "--calib", paths[0]]) == 2
    assert "--calib needs --model" in capsys.readouterr().err
