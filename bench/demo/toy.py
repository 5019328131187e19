"""A tiny random model + tokenizer + 0.5% mask + labelled JSONL on disk, built in a second (never
downloaded), and the one TOML writer for generated configs: what the tests, `meerkat bench chaos` and
`meerkat bench fleet` run real coordinators and clients on."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from shared.fingerprint import fingerprint_model_dir
from shared.maskfile import Mask, MaskMeta, save_mask
from shared.prng import derive_seed, directions, raw_u64

WORDS = ("good", "bad", "great", "awful", "fine", "poor", "nice", "dull", "movie", "film", "plot", "cast")


@dataclass(frozen=True)
class Toy:
    model_dir: Path
    mask_path: Path
    data_path: Path
    fingerprint: str
    mask: Mask


def build_toy(root: Path, seed: int = 11, n_examples: int = 24, *, hidden: int = 64, layers_n: int = 2,
              intermediate: int = 128, filler: int = 0) -> Toy:
    """Tiny Llama (2 layers, d=64) with prng-initialised weights, a 300-token BPE, a 0.5% mask, labelled JSONL.

    `hidden`/`layers_n`/`intermediate` make a larger model of the same kind (`meerkat bench guest` uses the
    `small` shape: steps that keep a core busy; random weights cost the same as trained ones) and `filler`
    words lengthen every example (more tokens per step); the defaults build the very same toy as ever."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from bench.tinylm.tokenizer import train_tokenizer

    root.mkdir(parents=True, exist_ok=True)
    texts = [f"the {a} {b} was {c}" for a in WORDS for b in WORDS[8:] for c in WORDS[:8]]
    tok = train_tokenizer(texts, 300)
    model_dir = root / "model"
    cfg = LlamaConfig(
        hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers_n, num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tok), max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for i, (_, p) in enumerate(sorted(model.named_parameters())):
            p.copy_(directions(derive_seed(seed, i), p.numel(), "gaussian").view_as(p) * 0.05)
    model.save_pretrained(str(model_dir))
    tok.save_pretrained(str(model_dir))
    fp = fingerprint_model_dir(model_dir)

    layers, shapes = {}, {}
    for i, (name, rows, cols) in enumerate(
        [("model.layers.0.mlp.down_proj", hidden, intermediate), ("model.layers.1.self_attn.q_proj", hidden, hidden)]
    ):
        keys = torch.from_numpy(raw_u64(seed + 100 + i, rows * cols).astype("int64") & 0x7FFFFFFFFFFFFFFF)
        layers[name] = torch.sort(torch.argsort(keys)[: rows * cols // 200]).values.to(torch.int64)
        shapes[name] = (rows, cols)
    nnz = sum(int(t.numel()) for t in layers.values())
    total = hidden * intermediate + hidden * hidden
    mask = Mask(layers=layers, shapes=shapes, grad=None, meta=MaskMeta(1, "random", nnz / total, "test", fp))
    mask_path = root / "mask.safetensors"
    save_mask(mask, mask_path)

    data = root / "data"
    data.mkdir(exist_ok=True)
    (data / "task.json").write_text(json.dumps({"name": "toy", "verbalizer": {"0": " bad", "1": " good"}, "template": "{text} it was"}))
    u = raw_u64(seed + 7, 3 * n_examples)
    with (data / "train.jsonl").open("w") as f:
        for i in range(n_examples):
            a, b = WORDS[int(u[3 * i] % 12)], WORDS[8 + int(u[3 * i + 1] % 4)]
            more = "".join(f" {WORDS[(i + k) % 12]}" for k in range(filler))
            f.write(json.dumps({"text": f"the {a} {b}{more}", "label": int(u[3 * i + 2] % 2)}) + "\n")
    return Toy(model_dir, mask_path, data / "train.jsonl", fp, mask)


def toml_text(settings: dict[str, Any]) -> str:
    """`key = value` TOML lines (bools, numbers, everything else as a JSON string); a dict value becomes a
    table after them (`policy={"enabled": False}` -> `[policy]`)."""
    lines = []
    tables = [f"\n[{k}]\n" + toml_text(v) for k, v in settings.items() if isinstance(v, dict)]
    for k, v in settings.items():
        if isinstance(v, dict):
            continue
        if isinstance(v, bool):
            lines.append(f"{k} = {'true' if v else 'false'}")
        elif isinstance(v, (int, float)):
            lines.append(f"{k} = {v!r}")
        elif isinstance(v, (list, tuple)):
            lines.append(f"{k} = {json.dumps([x if isinstance(x, (int, float)) else str(x) for x in v])}")
        else:
            lines.append(f"{k} = {json.dumps(str(v))}")
    return "\n".join(lines) + "\n" + "".join(tables)


__all__ = ["WORDS", "Toy", "build_toy", "toml_text"]
