"""Labelled tasks: balanced deterministic examples, Dirichlet / extreme client splits, task files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.tinylm import tasks
from shared.dataset import load_jsonl, load_task_config


def test_examples_balanced_deterministic_and_label_dependent() -> None:
    for task in tasks.TASKS.values():
        ex = tasks.make_examples(task, 40, seed=3)
        assert ex == tasks.make_examples(task, 40, seed=3)
        counts = [sum(e.label == c for e in ex) for c in range(len(task.labels))]
        assert max(counts) - min(counts) <= 1
        assert len({e.text for e in ex}) > 30
        assert task.prompt(ex[0].text).startswith(task.template.split("{text}")[0])
        assert not task.prompt(ex[0].text).endswith(" ")  # the answer word brings its own space


def test_sentiment_text_carries_its_label() -> None:
    ex = tasks.make_examples(tasks.get_task("sentiment"), 200, seed=1)
    pos_words = set(" ".join(e.text for e in ex if e.label == 1).split())
    neg_words = set(" ".join(e.text for e in ex if e.label == 0).split())
    assert "Five" in pos_words or "Worth" in pos_words
    assert "terrible" in neg_words or "awful" in neg_words


def test_claim_no_changes_a_fact() -> None:
    task = tasks.get_task("claim")
    for e in tasks.make_examples(task, 60, seed=2):
        premise, claim = e.text.split("\n")
        fact = claim.removeprefix("Claim: ").split(" ")[-1].rstrip(".")
        assert (fact in premise) == (e.label == 1), e.text


def test_unknown_task_named() -> None:
    with pytest.raises(ValueError, match="nope"):
        tasks.get_task("nope")


def _labels(n: int, k: int) -> list[int]:
    return [i % k for i in range(n)]


def test_dirichlet_assigns_each_example_exactly_once() -> None:
    labels = _labels(600, 3)
    parts = tasks.dirichlet_partition(labels, 10, 0.5, seed=4)
    flat = sorted(i for p in parts for i in p)
    assert flat == list(range(600))
    assert min(len(p) for p in parts) >= 2
    assert parts == tasks.dirichlet_partition(labels, 10, 0.5, seed=4)
    assert parts != tasks.dirichlet_partition(labels, 10, 0.5, seed=5)


def _skew(labels: list[int], parts: list[list[int]]) -> float:
    """Mean total-variation distance between each client's label mix and the global one."""
    k = max(labels) + 1
    glob = [labels.count(c) / len(labels) for c in range(k)]
    tv = []
    for p in parts:
        mine = [sum(labels[i] == c for i in p) / len(p) for c in range(k)]
        tv.append(0.5 * sum(abs(a - b) for a, b in zip(mine, glob, strict=True)))
    return sum(tv) / len(tv)


def test_skew_grows_as_alpha_drops() -> None:
    labels = _labels(1000, 2)
    skew = {a: sum(_skew(labels, tasks.dirichlet_partition(labels, 10, a, seed=s)) for s in range(4)) / 4
            for a in (100.0, 1.0, 0.1)}
    assert skew[100.0] < 0.1 < skew[0.1]
    assert skew[100.0] < skew[1.0] < skew[0.1]


def test_extreme_partition_single_label_clients() -> None:
    labels = _labels(800, 2)
    parts = tasks.extreme_partition(labels, 10, n_single=4, alpha=0.5, seed=1)
    assert sorted(i for p in parts for i in p) == list(range(800))
    for k in range(4):
        assert {labels[i] for i in parts[k]} == {k % 2}
        assert len(parts[k]) == 80
    assert any(len({labels[i] for i in p}) == 2 for p in parts[4:])


def test_partition_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match="alpha"):
        tasks.dirichlet_partition(_labels(100, 2), 5, 0.0, seed=0)
    with pytest.raises(ValueError, match="cannot give"):
        tasks.dirichlet_partition(_labels(10, 2), 8, 0.5, seed=0)
    with pytest.raises(ValueError, match="n_single"):
        tasks.extreme_partition(_labels(100, 2), 5, 6, 0.5, seed=0)


def test_write_and_load_task_files(tmp_path: Path) -> None:
    path = tasks.write_task(tmp_path, "topic", n_clients=5, alpha=0.5, seed=2, n_train=200, n_eval=40, n_single=1)
    meta = json.loads(path.read_text())
    assert meta["verbalizer"] == {"0": " sports", "1": " money", "2": " science", "3": " world"}
    assert meta["eval"] == "eval.jsonl" and len(meta["train"]) == 5
    rows = [json.loads(line) for f in meta["train"] for line in (tmp_path / f).read_text().splitlines()]
    assert len(rows) == 200 and all(set(r) == {"text", "label"} for r in rows)
    assert all(isinstance(r["text"], str) and r["label"] in (0, 1, 2, 3) for r in rows)
    assert sum(sum(c) for c in meta["label_counts"].values()) == 200
    assert set(meta["label_counts"]["client_00"][1:]) == {0}  # the single-label client holds label 0 only
    loaded = tasks.load_task(tmp_path)
    assert loaded.labels[2] == " science" and len(loaded.eval) == 40
    assert sum(len(v) for v in loaded.train.values()) == 200
    # the second call with the same arguments writes the same bytes
    again = tasks.write_task(tmp_path / "b", "topic", n_clients=5, alpha=0.5, seed=2, n_train=200, n_eval=40, n_single=1)
    assert (tmp_path / "client_03.jsonl").read_bytes() == (again.parent / "client_03.jsonl").read_bytes()


def test_task_files_match_the_engine_loader(tmp_path: Path) -> None:
    """shared.dataset reads task.json + client JSONL: prompt = template(text), target = the label word."""
    from bench.tinylm import corpus
    from bench.tinylm.tokenizer import train_tokenizer

    tok = train_tokenizer(corpus.generate(0, 600) + tasks.pretraining_docs(1, 600), 2048)
    path = tasks.write_task(tmp_path, "sentiment", n_clients=3, n_train=30, n_eval=10, seed=1)
    cfg = load_task_config(path)
    ds = load_jsonl(tmp_path / "client_00.jsonl", tok, cfg)
    rows = [json.loads(x) for x in (tmp_path / "client_00.jsonl").read_text().splitlines()]
    good, bad = tasks.label_token_ids(tok, [" good", " bad"])
    for row, ex in zip(rows, ds.examples, strict=True):
        assert ex.n_target == 1
        assert ex.input_ids[-1] == (good if row["label"] == 1 else bad)
        prompt = tasks.get_task("sentiment").prompt(row["text"])
        assert list(ex.input_ids[:-1]) == tok.encode(prompt, add_special_tokens=False)


def test_load_task_names_bad_rows(tmp_path: Path) -> None:
    tasks.write_task(tmp_path, "sentiment", n_clients=2, n_train=20, n_eval=4)
    with (tmp_path / "client_01.jsonl").open("a") as fh:
        fh.write('{"text": "x", "label": 7}\n')
    with pytest.raises(ValueError, match=r"client_01.jsonl:\d+: label 7"):
        tasks.load_task(tmp_path)


def test_pretraining_docs_are_biased_but_informative() -> None:
    docs = tasks.pretraining_docs(0, 1200)
    sent = [d for d in docs if d.startswith("Review:")]
    assert len(sent) == 300
    share_good = sum(d.endswith(" good") for d in sent) / len(sent)
    assert 0.65 < share_good < 0.8  # bias label over-used: P_TRUE/2 + P_BIAS + (1-P_TRUE-P_BIAS)/2 = 0.725
    pos = [d for d in sent if any(w in d for w in ("Five stars", "Worth every", "Highly recommended"))]
    neg = [d for d in sent if any(w in d for w in ("One star.", "Total waste", "Do not buy"))]
    # the answer still carries the label: good is more frequent after positive reviews
    assert sum(d.endswith(" good") for d in pos) / len(pos) > sum(d.endswith(" good") for d in neg) / len(neg) + 0.2


# ---------------------------------------------------------------- rich-corpus tasks (small / medium sizes)
def test_core_text_is_frozen() -> None:
    """micro / demo pretrain on the core text: adding rich tasks must not change one byte of it (sha taken
    from the code before the rich tasks existed)."""
    import hashlib

    from bench.tinylm import corpus

    docs = corpus.generate(0, 60) + tasks.pretraining_docs(0, 40)
    assert hashlib.sha256("\x00".join(docs).encode()).hexdigest() == (
        "e3856c09246f206060d45c5c066786741f2f8be08aca7c5bbaaf484dcbc5cb01")
    assert docs == corpus.generate(0, 60, corpus="core") + tasks.pretraining_docs(0, 40, corpus="core")
    assert not any("Section:" in d or "Inference:" in d or "Opinion:" in d for d in docs)


def test_corpus_task_sets() -> None:
    assert set(tasks.CORPUS_TASKS["core"]) == {"claim", "domain", "sentiment", "topic"}
    assert set(tasks.CORPUS_TASKS["rich"]) == set(tasks.TASKS)
    docs = tasks.pretraining_docs(0, 700, corpus="rich")
    for end in ("\nSection:", "\nOverall:", "\nInference:", "\nTopic:", "\nSentiment:", "\nAnswer:", "\nDomain:"):
        assert sum(end in d for d in docs) == 100, end  # round-robin over the seven tasks
    with pytest.raises(ValueError, match="corpus"):
        tasks.pretraining_docs(0, 3, corpus="huge")


def test_news8_many_way_and_partly_biased() -> None:
    task = tasks.get_task("news8")
    assert len(task.labels) == 8 and len(set(task.labels)) == 8
    ex = tasks.make_examples(task, 160, seed=4)
    assert [sum(e.label == c for e in ex) for c in range(8)] == [20] * 8
    assert len({e.text for e in ex}) > 150
    # answers in pretraining: biased labels lean to the bias label, the others are mostly right
    docs = [d for d in tasks.pretraining_docs(1, 7 * 1200, corpus="rich") if d.split("\n")[-1].startswith("Section:")]
    assert task.biased is not None and task.bias_label not in task.biased
    right = {c: [0, 0] for c in range(8)}
    for d in docs:
        text, answer = d.rsplit("\nSection:", 1)
        words = text.removeprefix("Article: ")
        true = next(c for c, t in enumerate(corpus_topics()) if any(s in words for s in topic_subjects(t)))
        right[true][0] += (" " + corpus_topics()[true]) == answer
        right[true][1] += 1
    for c, (ok, n) in right.items():
        share = ok / n
        assert (share < 0.6) if c in task.biased else (share > 0.75), (c, share)


def corpus_topics() -> tuple[str, ...]:
    from bench.tinylm.corpus import NEWS_TOPICS_8

    return NEWS_TOPICS_8


def topic_subjects(topic: str) -> tuple[str, ...]:
    """Event phrases unique to one topic (subjects are shared on purpose)."""
    from bench.tinylm.corpus import _NEWS

    return _NEWS[topic][1]


def _effective_polarity(clause: str) -> int:
    from bench.tinylm.corpus import OP_NEG_ADJ, OP_NEG_VERB, OP_POS_ADJ, OP_POS_VERB

    words = clause.rstrip(".").split()
    pos = any(w in OP_POS_ADJ or w in OP_POS_VERB for w in words)
    neg = any(w in OP_NEG_ADJ or w in OP_NEG_VERB for w in words)
    assert pos != neg, clause
    return (1 if pos else -1) * (-1 if "not" in words else 1)


def test_polarity_every_clause_implies_the_label_and_words_alone_do_not() -> None:
    task = tasks.get_task("polarity")
    ex = tasks.make_examples(task, 300, seed=5)
    naive_right = 0.0
    for e in ex:
        clauses = [c.strip() + "." for c in e.text.split(".")[1:] if c.strip()]
        assert 2 <= len(clauses) <= 3, e.text
        assert all(_effective_polarity(c) == (1 if e.label == 1 else -1) for c in clauses), e.text
        raw = sum(_effective_polarity(c) * (-1 if "not" in c.split() else 1) for c in clauses)  # ignore "not"
        naive_right += (raw > 0) == (e.label == 1) if raw != 0 else 0.5
    assert 0.3 < naive_right / len(ex) < 0.7  # bag of polar words without negation ~ a coin flip


def test_nli_second_sentence_is_decided_by_the_first() -> None:
    """true: hypothesis words all in the premise, same person; false: a negation of a premise fact or a
    value absent from the premise; unknown: another person or a fact of a kind the premise lacks."""
    from bench.tinylm.tasks import ABSENT_FACTS

    task = tasks.get_task("nli")
    assert task.labels == (" true", " false", " unknown")
    kinds = set()
    for e in tasks.make_examples(task, 300, seed=6):
        premise, hyp = (line.split(": ", 1)[1] for line in e.text.split("\n"))
        who, p_words, h_words = premise.split()[0], set(premise.rstrip(".").split()), hyp.rstrip(".").split()
        same_person = h_words[0] == who
        negated = "not" in h_words or "stayed" in h_words
        absent = hyp.rstrip(".").removeprefix(who + " ") in ABSENT_FACTS
        content = [w for w in h_words[1:] if w not in ("went", "to", "out", "on", "bought", "did", "not", "go",
                                                     "buy", "stayed", "home", "the")]
        in_premise = all(w in p_words for w in content)
        if e.label == 0:
            assert same_person and in_premise and not negated, e.text
        elif e.label == 1:
            assert same_person and not absent and (negated and in_premise or not negated and not in_premise), e.text
            kinds.add("negated" if negated else "swapped")
        else:
            assert absent or (not same_person and in_premise and not negated), e.text
            kinds.add("absent" if absent else "other person")
    assert kinds == {"negated", "swapped", "absent", "other person"}
