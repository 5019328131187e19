"""Every supported family end to end on a tiny random-init config, and a one-line refusal for the rest.

Matrix (shared/architectures.py SUPPORTED, hidden 64, 2 layers): `meerkat mask build`, load in
nf4/int8/none, two replicas running 2 rounds of SPSA whose side-cars stay bit-identical, and (slow)
export + reload in plain transformers + evaluate equal to the side-car model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from shared.apply import apply_round, values_checksum
from shared.architectures import SUPPORTED, UnsupportedModelError, check_model_dir
from shared.cli import main
from shared.dataset import Batch, Dataset, Example
from shared.loss import batch_loss, evaluate
from shared.maskfile import load_mask
from shared.modelload import load_model
from tests.engine.conftest import build_tokenizer, fill_weights

COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=384)
CONFIGS: dict[str, dict[str, Any]] = {
    "llama": dict(COMMON, num_key_value_heads=2),
    "mistral": dict(COMMON, num_key_value_heads=2),
    "qwen2": dict(COMMON, num_key_value_heads=2),
    "qwen3": dict(COMMON, num_key_value_heads=2, head_dim=16),
    "phi3": dict(COMMON, num_key_value_heads=4, pad_token_id=0, bos_token_id=1, eos_token_id=2),
    "gemma": dict(COMMON, num_key_value_heads=2, head_dim=16),
    "gemma2": dict(COMMON, num_key_value_heads=2, head_dim=16),
    "gemma3_text": dict(COMMON, num_key_value_heads=2, head_dim=16),
    "opt": dict(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=384,
                word_embed_proj_dim=64),
    "gpt_neox": dict(COMMON),
}
_BUILT: dict[str, Path] = {}


def build(root: Path, model_type: str, config: dict[str, Any]) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    path = root / model_type
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, max_position_embeddings=256, **config))
    fill_weights(model, 5)
    model.save_pretrained(str(path))
    return path


def model_dir(tmp_path_factory: pytest.TempPathFactory, model_type: str) -> Path:
    if model_type not in _BUILT:
        path = build(tmp_path_factory.mktemp("arch"), model_type, CONFIGS[model_type])
        build_tokenizer(path)
        _BUILT[model_type] = path
    return _BUILT[model_type]


def _batch(seed: int) -> Batch:
    examples = [Example(tuple((seed * 31 + 7 * i + 13 * j) % 380 + 3 for j in range(10)), 6) for i in range(3)]
    return Batch(examples, Dataset(examples, pad_id=0))


def _mask(path: Path, tmp_path: Path) -> Path:
    out = tmp_path / "mask.safetensors"
    rc = main(["mask", "build", "--model", str(path), "--method", "random", "--fraction", "0.02", "--out", str(out)])
    assert rc == 0 and out.is_file()
    return out


def test_supported_list_is_the_matrix() -> None:
    assert set(CONFIGS) == set(SUPPORTED)


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_family_end_to_end(model_type: str, tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> None:
    """mask build, nf4/int8/none, 2 rounds on 2 replicas: the side-cars stay bit-identical and move."""
    path = model_dir(tmp_path_factory, model_type)
    assert check_model_dir(path, "nf4") == model_type
    mask = load_mask(_mask(path, tmp_path))
    for quant in ("nf4", "int8", "none"):
        replicas = [load_model(path, quant, "cpu", mask, torch.float32) for _ in range(2)]  # type: ignore[arg-type]
        start = values_checksum(replicas[0].sidecar.values)  # type: ignore[union-attr]
        for rnd in range(2):
            from edge_client.engine.spsa import spsa_step

            seeds, gs = [], []
            for i, lm in enumerate(replicas):
                assert lm.sidecar is not None
                seed = 1000 * rnd + i + 1
                res = spsa_step(lm.model, lm.sidecar, lambda m, s=seed: batch_loss(m, _batch(s)), seed, 1e-2, 0.0)
                seeds.append(seed)
                gs.append(res.g)
            new = apply_round(replicas[0].sidecar.get_values(), seeds, gs, 1e-2, "rademacher")  # type: ignore[union-attr]
            for lm in replicas:
                lm.sidecar.set_values(new)  # type: ignore[union-attr]
        sums = {values_checksum(lm.sidecar.values) for lm in replicas}  # type: ignore[union-attr]
        assert len(sums) == 1 and sums != {start}, (model_type, quant)


@pytest.mark.slow
@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_family_export_reload_evaluate(model_type: str, tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> None:
    """export (both bases) loads in plain transformers and evaluates like the side-car model."""
    from transformers import AutoModelForCausalLM

    from coordinator.export import export_merged

    path = model_dir(tmp_path_factory, model_type)
    mask = load_mask(_mask(path, tmp_path))
    lm = load_model(path, "nf4", "cpu", mask, torch.float32)
    assert lm.sidecar is not None
    values = lm.sidecar.initial_values() * 1.5
    lm.sidecar.set_values(values)
    data = _batch(3).dataset
    want = evaluate(lm.model, data)["loss"]
    out = export_merged(path, mask, values, "nf4", tmp_path / "export", base="dequantized")
    got = evaluate(AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32), data)["loss"]
    assert got == pytest.approx(want, rel=1e-4, abs=1e-4)


# ---------------------------------------------------------------- refusals: one line, naming the layer type


def _refused_by_mask_build(path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> str:
    capsys.readouterr()  # what building the model printed
    rc = main(["mask", "build", "--model", str(path), "--method", "random", "--out", str(tmp_path / "m.safetensors")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    return err


def test_gpt2_conv1d_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = build(tmp_path, "gpt2", dict(n_embd=64, n_layer=2, n_head=4, vocab_size=384, n_positions=256))
    err = _refused_by_mask_build(path, tmp_path, capsys)
    assert "GPT-2" in err and "Conv1D" in err and "Llama" in err
    with pytest.raises(UnsupportedModelError, match="Conv1D"):
        load_model(path, "nf4", "cpu")


def test_t5_is_refused_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from transformers import T5Config, T5ForConditionalGeneration

    path = tmp_path / "t5"
    T5ForConditionalGeneration(T5Config(d_model=64, d_ff=128, num_layers=2, num_heads=4, d_kv=16, vocab_size=384)).save_pretrained(
        str(path)
    )
    err = _refused_by_mask_build(path, tmp_path, capsys)
    assert "T5" in err and "encoder-decoder" in err and "Traceback" not in err


def test_quantized_mamba_is_refused(tmp_path: Path) -> None:
    path = build(tmp_path, "mamba", dict(hidden_size=64, num_hidden_layers=2, vocab_size=384, state_size=8))
    for quant in ("nf4", "int8"):
        with pytest.raises(UnsupportedModelError, match=f"Mamba .*cannot be quantized \\({quant}\\): its MambaMixer"):
            load_model(path, quant, "cpu")  # type: ignore[arg-type]
    assert check_model_dir(path, "none") == "mamba"


def test_bin_only_checkpoint_is_refused_with_a_hint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from safetensors.torch import load_file

    path = build(tmp_path, "llama", CONFIGS["llama"])
    torch.save(load_file(str(path / "model.safetensors")), path / "pytorch_model.bin")  # an old-style checkpoint
    (path / "model.safetensors").unlink()
    err = _refused_by_mask_build(path, tmp_path, capsys)
    assert "pytorch_model.bin" in err and "safe_serialization=True" in err
    with pytest.raises(UnsupportedModelError, match="save_pretrained"):
        load_model(path, "none", "cpu")


def test_unknown_family_is_refused(tmp_path: Path) -> None:
    path = build(tmp_path, "gpt_neo", dict(hidden_size=64, num_layers=2, num_heads=4, vocab_size=384,
                                           attention_types=[[["global"], 2]]))
    with pytest.raises(UnsupportedModelError, match="model_type 'gpt_neo'.*supported list: Llama"):
        check_model_dir(path, "nf4")
