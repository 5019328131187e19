"""Model fingerprint: streams safetensors, agrees across sharding/re-save, changes with any weight/config."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from shared.fingerprint import FingerprintError, fingerprint_model_dir, fp_tag
from shared.prng import directions

CONFIG = {"model_type": "llama", "hidden_size": 8, "num_hidden_layers": 1, "vocab_size": 16}


def _tensors() -> dict[str, torch.Tensor]:
    return {
        "embed.weight": directions(1, 128, "gaussian").reshape(16, 8),
        "layer.0.weight": directions(2, 64, "gaussian").reshape(8, 8).to(torch.bfloat16),
        "norm.weight": torch.ones(8),
    }


def _write(root: Path, tensors: dict[str, torch.Tensor], config: dict[str, object] | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(config or CONFIG, indent=2))
    save_file(tensors, str(root / "model.safetensors"), metadata={"format": "pt"})
    return root


def test_stable_and_sensitive(tmp_path: Path) -> None:
    fp = fingerprint_model_dir(_write(tmp_path / "a", _tensors()))
    assert len(fp) == 64 and int(fp, 16) >= 0
    assert fingerprint_model_dir(_write(tmp_path / "b", _tensors())) == fp
    # volatile config keys and key order/whitespace do not matter
    cfg = dict(reversed(list(CONFIG.items())), transformers_version="9.9", _name_or_path="/x")
    assert fingerprint_model_dir(_write(tmp_path / "c", _tensors(), cfg)) == fp
    # one ulp in one weight, a dtype, a shape, a name, a config value: all change it
    t = _tensors()
    t["embed.weight"].view(torch.int32)[3, 4] ^= 1
    assert fingerprint_model_dir(_write(tmp_path / "d", t)) != fp
    t = _tensors()
    t["norm.weight"] = t["norm.weight"].to(torch.float16)
    assert fingerprint_model_dir(_write(tmp_path / "e", t)) != fp
    t = _tensors()
    t["embed.weight"] = t["embed.weight"].reshape(8, 16)
    assert fingerprint_model_dir(_write(tmp_path / "f", t)) != fp
    t = _tensors()
    t["embed2.weight"] = t.pop("embed.weight")
    assert fingerprint_model_dir(_write(tmp_path / "g", t)) != fp
    assert fingerprint_model_dir(_write(tmp_path / "h", _tensors(), dict(CONFIG, hidden_size=9))) != fp


def test_sharded_equals_single_file(tmp_path: Path) -> None:
    t = _tensors()
    single = fingerprint_model_dir(_write(tmp_path / "single", t))
    root = tmp_path / "sharded"
    root.mkdir()
    (root / "config.json").write_text(json.dumps(CONFIG))
    save_file(
        {"norm.weight": t["norm.weight"], "embed.weight": t["embed.weight"]},
        str(root / "model-00001-of-00002.safetensors"),
    )
    save_file({"layer.0.weight": t["layer.0.weight"]}, str(root / "model-00002-of-00002.safetensors"))
    weight_map = {"norm.weight": "model-00001-of-00002.safetensors", "embed.weight": "model-00001-of-00002.safetensors",
                  "layer.0.weight": "model-00002-of-00002.safetensors"}  # fmt: skip
    (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert fingerprint_model_dir(root) == single


def test_real_transformers_model_single_and_sharded(tmp_path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=64)  # fmt: skip
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(tmp_path / "one")
    model.save_pretrained(tmp_path / "many", max_shard_size="20KB")
    assert len(list((tmp_path / "many").glob("*.safetensors"))) > 1
    assert fingerprint_model_dir(tmp_path / "one") == fingerprint_model_dir(tmp_path / "many")


def test_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(FingerprintError, match="config.json not found"):
        fingerprint_model_dir(tmp_path)
    (tmp_path / "config.json").write_text("{")
    with pytest.raises(FingerprintError, match="config.json: not valid JSON"):
        fingerprint_model_dir(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FingerprintError, match="no model.safetensors"):
        fingerprint_model_dir(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\xff" * 8 + b"{}")
    with pytest.raises(FingerprintError, match="header length"):
        fingerprint_model_dir(tmp_path)
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode()
    (tmp_path / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 8)
    with pytest.raises(FingerprintError, match="'w' data_offsets"):
        fingerprint_model_dir(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"w": "gone.safetensors"}})
    )
    with pytest.raises(FingerprintError, match="gone.safetensors"):
        fingerprint_model_dir(tmp_path)


def test_fp_tag() -> None:
    fp = "0f" * 32
    assert fp_tag(fp) == zlib.crc32(bytes.fromhex(fp))
    assert 0 <= fp_tag(fp) < 1 << 32 and fp_tag(fp) != fp_tag("f0" * 32)
    with pytest.raises(ValueError, match="64 hex"):
        fp_tag("abc")
    with pytest.raises(ValueError, match="not hex"):
        fp_tag("zz" * 32)
