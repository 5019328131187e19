"""Tiny models and tokenizers for the mask tests, with weights filled from shared.prng (no global RNG)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from shared import prng

WORDS = (
    "the cat sat on a mat and the dog ran to the park while birds sang in tall green trees "
    "code compiles when the function returns an int and the loop ends before the buffer fills"
).split()


def uniform(seed: int, n: int) -> torch.Tensor:
    """float32 (n,) uniform in [-1, 1) from shared.prng's raw stream."""
    u = prng.raw_u64(seed, n) >> np.uint64(40)  # 24 bits
    return torch.from_numpy(u.astype(np.float32)) / 2**23 - 1.0


def fill_from_prng(model: nn.Module, seed: int, std: float = 0.1) -> None:
    """Overwrite every parameter with a deterministic gaussian stream (norm weights stay at 1)."""
    with torch.no_grad():
        for i, (name, p) in enumerate(sorted(model.named_parameters())):
            if "norm" in name:
                p.fill_(1.0)
                continue
            z = uniform(prng.derive_seed(seed, i), p.numel()) * 3**0.5  # unit variance
            p.copy_(z.view_as(p) * std)


class PlantedLM(nn.Module):
    """emb -> fc1 -> tanh -> fc2 -> head; the loss sees W * (1 + (scale-1) P) for fc1/fc2.

    So dL/dW at a planted position (P = 1) is `scale` times what it would be: large-gradient weights
    that are a property of the model, not of a hook. `reparameterise()` divides the planted weights by
    `scale` so the effective weights (and the forward pass) are those of an ordinary model.
    """

    amp_fc1: torch.Tensor  # buffers (register_buffer below): 1 or `scale` per weight
    amp_fc2: torch.Tensor

    def __init__(self, vocab: int, d: int, h: int, planted: dict[str, list[int]], scale: float) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.fc1 = nn.Linear(d, h, bias=False)
        self.fc2 = nn.Linear(h, d, bias=False)
        self.head = nn.Linear(d, vocab, bias=False)
        for name in ("fc1", "fc2"):
            lin = getattr(self, name)
            amp = torch.ones(lin.weight.numel())
            amp[torch.tensor(planted.get(name, []), dtype=torch.int64)] = scale
            self.register_buffer(f"amp_{name}", amp.view_as(lin.weight))

    def reparameterise(self) -> None:
        with torch.no_grad():
            for name in ("fc1", "fc2"):
                getattr(self, name).weight.div_(getattr(self, f"amp_{name}"))

    def get_input_embeddings(self) -> nn.Module:
        return self.emb

    def get_output_embeddings(self) -> nn.Module:
        return self.head

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> SimpleNamespace:
        x = self.emb(input_ids)  # (B, L, d)
        x = x + torch.tanh(F.linear(x, self.fc1.weight * self.amp_fc1))  # (B, L, h) ... d == h here
        x = F.linear(x, self.fc2.weight * self.amp_fc2)  # (B, L, d)
        logits = self.head(x)  # (B, L, V)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
        return SimpleNamespace(loss=loss)


def char_encode(text: str) -> list[int]:
    """A stand-in tokenizer: one id per byte, folded into a 32-symbol vocabulary."""
    return [b % 32 for b in text.encode()]


def save_tokenizer(path: Path) -> None:
    """A small BPE tokenizer (trained here, deterministic) saved as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=200,
        special_tokens=["<unk>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([" ".join(WORDS)] * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")
    fast.save_pretrained(str(path))


def save_tiny_llama(path: Path, seed: int = 7) -> None:
    """A 2-layer Llama (vocab 512 >= the tokenizer's) with prng weights, plus its tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    fill_from_prng(model, seed)
    model.save_pretrained(str(path))
    save_tokenizer(path)


def write_corpus(path: Path, n_docs: int, offset: int = 0) -> Path:
    """Deterministic pseudo-text: documents separated by blank lines."""
    u = prng.raw_u64(12345, n_docs * 20, offset=offset * n_docs * 20)
    docs = []
    for d in range(n_docs):
        words = [WORDS[int(x) % len(WORDS)] for x in u[d * 20 : (d + 1) * 20]]
        docs.append(" ".join(words))
    path.write_text("\n\n".join(docs) + "\n")
    return path
