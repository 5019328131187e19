"""Tiny real models for the engine tests: Llama and Qwen2 configs, weights filled from shared.prng
(reproducible without touching the global RNG), a byte-level BPE tokenizer, and a shared.prng mask."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
import torch

from shared.prng import derive_seed, raw_u64

if TYPE_CHECKING:
    from transformers import PreTrainedModel

CORPUS = [
    "the movie was great and the acting was wonderful",
    "a terrible film with a boring plot and bad acting",
    "i loved the music and the story was fun",
    "the worst thing i have seen this year",
    "positive negative sentiment review text data",
] * 4


def uniform(seed: int, n: int, scale: float) -> torch.Tensor:
    """Uniform(-scale, scale) float32 from shared.prng (53-bit mantissa path)."""
    u = (raw_u64(seed, n) >> np.uint64(11)).astype(np.float64) * 2.0**-53
    return torch.from_numpy(((2.0 * u - 1.0) * scale).astype(np.float32))


def fill_weights(model: torch.nn.Module, seed: int) -> None:
    with torch.no_grad():
        for i, (name, p) in enumerate(sorted(model.named_parameters())):
            if name.endswith("norm.weight") or "layernorm" in name:
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.copy_(uniform(derive_seed(seed, i), p.numel(), 0.02).view_as(p))
            else:
                p.copy_(uniform(derive_seed(seed, i), p.numel(), 0.1).view_as(p))


def build_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=380, special_tokens=["<pad>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(str(path))


def build_model(path: Path, family: str, seed: int, tokenizer: bool = True) -> Path:
    from transformers import (
        Gemma2Config,
        Gemma2ForCausalLM,
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    common: dict[str, Any] = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=384,
        max_position_embeddings=256,
    )
    if family == "llama":
        model: PreTrainedModel = LlamaForCausalLM(LlamaConfig(**common))
    elif family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common, tie_word_embeddings=False))
    else:
        model = Gemma2ForCausalLM(Gemma2Config(**common, head_dim=16, final_logit_softcapping=5.0))
    fill_weights(model, seed)
    model.save_pretrained(str(path))
    if tokenizer:
        build_tokenizer(path)
    return path


def prng_mask(model_dir: Path, fraction: float = 0.01, seed: int = 99) -> dict[str, torch.Tensor]:
    from bench.step import random_mask

    return random_mask(model_dir, fraction, seed)


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_model(tmp_path_factory.mktemp("llama"), "llama", 11)


@pytest.fixture(scope="session")
def qwen2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_model(tmp_path_factory.mktemp("qwen2"), "qwen2", 12)


@pytest.fixture(scope="session")
def gemma2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_model(tmp_path_factory.mktemp("gemma2"), "gemma2", 13, tokenizer=False)


@pytest.fixture(scope="session")
def llama_mask(llama_dir: Path) -> dict[str, torch.Tensor]:
    return prng_mask(llama_dir)


@pytest.fixture(autouse=True, scope="session")
def _one_thread() -> Iterator[None]:
    """Tiny models: one intra-op thread is faster than two spinning on a shared, loaded CPU."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
