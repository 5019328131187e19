"""Corpus generator and tokenizer: determinism, variety, calibration files, BPE round trip, label words."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from bench.tinylm import corpus, tasks
from bench.tinylm.tokenizer import save_tokenizer, train_tokenizer


def test_generate_is_deterministic_and_seed_dependent() -> None:
    a, b = corpus.generate(7, 60), corpus.generate(7, 60)
    assert a == b
    assert corpus.generate(8, 60) != a
    # document i depends only on (seed, i): a prefix is stable when more documents are asked for
    assert corpus.generate(7, 120)[:60] == a


def test_every_domain_appears_with_variety() -> None:
    docs = corpus.generate(1, 600)
    for k, name in enumerate(corpus.DOMAINS):
        mine = docs[k :: len(corpus.DOMAINS)]
        assert len(set(mine)) > 0.9 * len(mine), f"{name}: too many duplicate documents"
    words = {w for d in docs for w in d.split()}
    assert len(words) > 600


def test_unknown_domain_is_named() -> None:
    with pytest.raises(ValueError, match="nonsense"):
        corpus.generate(0, 3, ["reviews", "nonsense"])


def test_write_corpus_one_file_per_domain(tmp_path: Path) -> None:
    paths = corpus.write_corpus(tmp_path, seed=3, docs_per_domain=20)
    assert sorted(p.stem for p in paths) == sorted(corpus.DOMAINS)
    for p in paths:
        rows = [json.loads(line) for line in p.read_text().splitlines()]
        assert len(rows) == 20 and all(set(r) == {"text"} and r["text"] for r in rows)
    again = corpus.write_corpus(tmp_path / "b", seed=3, docs_per_domain=20)
    assert [p.read_bytes() for p in paths] == [p.read_bytes() for p in again]


def test_rng_draws() -> None:
    r = corpus.Rng(5)
    xs = [r.uniform() for _ in range(5000)]
    assert 0 < min(xs) and max(xs) < 1 and abs(sum(xs) / len(xs) - 0.5) < 0.02
    g = [corpus.Rng(9).gamma(0.5)] + [r.gamma(0.5) for _ in range(4000)]
    assert abs(sum(g) / len(g) - 0.5) < 0.05  # E[Gamma(a, 1)] = a
    g3 = [r.gamma(3.0) for _ in range(4000)]
    assert abs(sum(g3) / len(g3) - 3.0) < 0.15
    p = r.dirichlet([0.5] * 6)
    assert abs(sum(p) - 1) < 1e-12 and min(p) >= 0
    with pytest.raises(ValueError, match="seed"):
        corpus.Rng(-1)


@pytest.fixture(scope="module")
def tok() -> object:
    docs = corpus.generate(0, 1500) + tasks.pretraining_docs(1, 900)
    return train_tokenizer(docs, 2048)


def test_tokenizer_round_trip_and_autotokenizer(tok: object, tmp_path: Path) -> None:
    save_tokenizer(tok, tmp_path)  # type: ignore[arg-type]
    loaded = AutoTokenizer.from_pretrained(str(tmp_path))
    for text in ["Review: The battery is great.\nSentiment: good", "def f(x):\n    return x * 2\n",
                 "ünïcode ✓ text\tnot in the corpus 12345"]:
        ids = loaded.encode(text, add_special_tokens=False)
        assert loaded.decode(ids) == text
    assert loaded.pad_token == "<|pad|>" and loaded.eos_token == "<|eos|>" and loaded.bos_token == "<|bos|>"
    assert len({loaded.pad_token_id, loaded.eos_token_id, loaded.bos_token_id}) == 3
    assert 1000 < len(loaded) <= 2048


def test_every_label_word_is_one_token(tok: object) -> None:
    for name in tasks.CORPUS_TASKS["core"]:
        ids = tasks.label_token_ids(tok, tasks.TASKS[name].labels)
        assert len(set(ids)) == len(tasks.TASKS[name].labels)


def test_rich_corpus_label_words_are_one_token() -> None:
    """The small / medium recipe: eight news topics and the seven tasks' answers; every verbaliser is one
    token of a tokenizer trained on that text (the build checks the same on the real tokenizer)."""
    docs = corpus.generate(0, 1200, corpus="rich") + tasks.pretraining_docs(1, 2100, corpus="rich")
    tok = train_tokenizer(docs, 4096)
    for name in tasks.CORPUS_TASKS["rich"]:
        ids = tasks.label_token_ids(tok, tasks.TASKS[name].labels)
        assert len(set(ids)) == len(tasks.TASKS[name].labels), name
    news = docs[1::6]
    assert {t for t in corpus.NEWS_TOPICS_8 if any(s in d for d in news for s in corpus._NEWS[t][0])} == set(corpus.NEWS_TOPICS_8)
    with pytest.raises(ValueError, match="corpus"):
        corpus.generate(0, 3, corpus="huge")


def test_label_token_ids_names_split_words(tok: object) -> None:
    with pytest.raises(ValueError, match="xylophonequark"):
        tasks.label_token_ids(tok, [" good", " xylophonequark"])


def test_tokenizer_training_is_deterministic() -> None:
    docs = corpus.generate(2, 800)
    assert train_tokenizer(docs, 700).get_vocab() == train_tokenizer(docs, 700).get_vocab()
