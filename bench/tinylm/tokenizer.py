"""Byte-level BPE tokenizer for the tiny LM, trained with `tokenizers`, saved as a HF fast tokenizer.

`AutoTokenizer.from_pretrained(model_dir)` loads it. Special tokens: <|pad|> (id 0), <|bos|> (1),
<|eos|> (2). No special token is added automatically: the pretraining stream is `doc <|eos|> doc ...`.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|eos|>"


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE (every byte is in the base alphabet, so any text encodes)."""
    if vocab_size < 256 + 3:
        raise ValueError(f"vocab_size must be >= 259 (bytes + 3 special tokens), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOS)  # type: ignore[no-untyped-call]


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, out_dir: str | Path) -> None:
    tokenizer.save_pretrained(str(out_dir))
