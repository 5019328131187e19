"""`meerkat export --base dequantized|original` in the checkpoint's dtype, and `meerkat evaluate` on both."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from coordinator.export import export_merged
from shared.cli import main
from shared.maskfile import load_mask
from shared.modelload import load_model
from tests.engine.conftest import build_model


@pytest.fixture(scope="module")
def bf16_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = build_model(tmp_path_factory.mktemp("fp32"), "llama", 21)
    out = tmp_path_factory.mktemp("bf16")
    AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.bfloat16).save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(src)).save_pretrained(str(out))
    return out


def _evaluate(model: Path, data: Path, capsys: pytest.CaptureFixture[str]) -> float:
    capsys.readouterr()
    assert main(["evaluate", "--model", str(model), "--data", str(data), "--json"]) == 0
    return float(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["loss"])


def test_both_bases_in_the_checkpoint_dtype(bf16_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    m = tmp_path / "mask.safetensors"
    assert main(["mask", "build", "--model", str(bf16_dir), "--method", "random", "--fraction", "0.02", "--out", str(m)]) == 0
    mask = load_mask(m)
    ref = load_model(bf16_dir, "nf4", "cpu", mask, torch.float32)
    assert ref.sidecar is not None
    values = ref.sidecar.initial_values() * 1.5 + 0.01
    ref.sidecar.set_values(values)
    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["the movie was great", "a terrible film", "i loved the music"]))

    deq = export_merged(bf16_dir, mask, values, "nf4", tmp_path / "deq")
    orig = export_merged(bf16_dir, mask, values, "nf4", tmp_path / "orig", base="original")
    base = load_file(str(bf16_dir / "model.safetensors"))
    for out, kind in ((deq, "dequantized"), (orig, "original")):
        info = json.loads((out / "meerkat_export.json").read_text())
        assert info["base"] == kind and info["dtype"] == "bfloat16"
        state = load_file(str(out / "model.safetensors"))
        assert all(t.dtype == torch.bfloat16 for t in state.values())  # never fp32 (a 1B export stays ~2.5 GB)
        for name, (a, b) in mask.offsets().items():  # the learned values, at the checkpoint's precision
            got = state[f"{name}.weight"].view(-1)[mask.layers[name]]
            assert torch.equal(got, values[a:b].to(torch.bfloat16)), (kind, name)

    name = "model.layers.0.self_attn.q_proj"
    keep = torch.ones(base[f"{name}.weight"].numel(), dtype=torch.bool)
    keep[mask.layers[name]] = False
    orig_w = load_file(str(orig / "model.safetensors"))[f"{name}.weight"].view(-1)
    deq_w = load_file(str(deq / "model.safetensors"))[f"{name}.weight"].view(-1)
    assert torch.equal(orig_w[keep], base[f"{name}.weight"].view(-1)[keep])  # untouched outside the mask
    assert not torch.equal(deq_w[keep], orig_w[keep])  # the fleet's base carries the nf4 rounding

    from shared.evaluation import evaluate_model, load_eval_data

    want = evaluate_model(ref.model, load_eval_data(data, ref.tokenizer, 256)).loss
    got_deq = _evaluate(deq, data, capsys)
    got_orig = _evaluate(orig, data, capsys)
    assert got_deq == pytest.approx(want, rel=2e-2)  # the fleet's model, up to bf16 rounding of the weights
    assert got_orig != got_deq and abs(got_orig - want) < 0.5  # a different base, the same learned values
