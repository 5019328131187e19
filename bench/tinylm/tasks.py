"""Labelled tasks the tiny LM can learn, their verbalisers, and Non-IID client splits written as JSONL.

A task renders a prompt that ends right before the answer; the answer is one label word with a leading
space (" good"), which must be ONE token of the model's tokenizer. Clients get label-skewed shares by a
Dirichlet(alpha) draw per label (alpha 0.5: the paper's setting), optionally with some single-label
("extreme") clients. All randomness: `bench.tinylm.corpus.Rng` over shared.prng.

Files written by `write_task(dir, ...)`:
    task.json          {"format_version": 1, "name", "verbalizer": {"0": " bad", "1": " good"},
                        "template": "Review: {text}\nSentiment:", "max_length": 256,
                        "train": ["client_00.jsonl", ...], "eval": "eval.jsonl", "n_clients", "alpha",
                        "n_single", "seed", "label_counts": {"client_00": [n_label0, ...], ...}}
    client_XX.jsonl    one {"text": <raw text>, "label": <int>} per line; the prompt is
                       template.format(text=text), it ends right before the answer verbalizer[str(label)]
    eval.jsonl         the same, balanced labels, drawn independently of the training examples
This is the task.json format `shared.dataset.load_task_config` reads (keys it does not know
are ignored there).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bench.tinylm.corpus import (
    DAYS,
    DOMAINS,
    NAMES,
    NEWS_TOPICS,
    NEWS_TOPICS_8,
    PLACES,
    Rng,
    news,
    opinion,
    review,
)
from shared.jsonl import read_jsonl
from shared.prng import derive_seed

log = logging.getLogger(__name__)
FORMAT_VERSION = 1


@dataclass(frozen=True)
class Task:
    name: str
    labels: tuple[str, ...]  # verbaliser: label i -> answer word with a leading space, one token
    template: str  # "{text}" is replaced by the raw text; the prompt ends right before the answer
    raw_text: Callable[[Rng, int], str]  # (rng, label) -> raw text whose content implies the label
    bias_label: int  # the label the pretraining corpus over-uses: the zero-shot model leans to it
    # labels whose pretraining answers lean to bias_label; None = all of them. The others are answered
    # with their true label P_TRUE + P_BIAS of the time, so zero-shot gets those right: a start between
    # chance and good for many-way tasks, where "all labels lean" would sit at chance.
    biased: tuple[int, ...] | None = None

    def draw(self, rng: Rng, label: int) -> str:
        """Raw text for `label` (without the template)."""
        if not 0 <= label < len(self.labels):
            raise ValueError(f"task {self.name}: label {label} out of range [0, {len(self.labels)})")
        return self.raw_text(rng, label)

    def prompt(self, text: str) -> str:
        """The model input for raw `text`: ends right before the answer word."""
        return self.template.format(text=text)


@dataclass(frozen=True)
class Example:
    text: str  # raw text; the prompt is task.prompt(text)
    label: int


def _sentiment(rng: Rng, label: int) -> str:
    return review(rng, positive=label == 1)


def _topic(rng: Rng, label: int) -> str:
    return news(rng, NEWS_TOPICS[label])


ITEMS = ("apples", "stamps", "shoes", "books", "candles", "tickets", "flowers", "batteries")


def _claim(rng: Rng, label: int) -> str:
    """Premise with a person, place, day and item; the claim repeats one fact (yes) or alters it (no)."""
    who, where, day, item = rng.choice(NAMES), rng.choice(PLACES), rng.choice(DAYS), rng.choice(ITEMS)
    premise = f"{who} went to {where} on {day} and bought {rng.choice(('two', 'some', 'five', 'new'))} {item}."
    slot = rng.randint(3)
    if label == 0:  # change the slot's value to a different one of the same kind
        pools: tuple[tuple[str, ...], ...] = (PLACES, DAYS, ITEMS)
        current = (where, day, item)[slot]
        other = rng.choice([v for v in pools[slot] if v != current])
        where, day, item = (other, day, item) if slot == 0 else (where, other, item) if slot == 1 else (where, day, other)
    claim = (f"{who} went to {where}.", f"{who} went out on {day}.", f"{who} bought {item}.")[slot]
    return f"Premise: {premise}\nClaim: {claim}"


QUANTITIES = ("two", "some", "five", "new")
ABSENT_FACTS = ("paid with cash", "met a friend there", "was in a hurry", "took the bus", "forgot the list")


def _nli(rng: Rng, label: int) -> str:
    """Two sentences; everything needed is in the first. 0 true: the hypothesis repeats a fact of the
    premise. 1 false: it negates a fact (easy half) or swaps a value for another of its kind (needs the
    comparison). 2 unknown: it states a fact the premise does not mention (easy half) or a premise fact
    about another person (needs the name comparison)."""
    who, where, day, item = rng.choice(NAMES), rng.choice(PLACES), rng.choice(DAYS), rng.choice(ITEMS)
    premise = f"{who} went to {where} on {day} and bought {rng.choice(QUANTITIES)} {item}."
    slot = rng.randint(3)

    def fact(name: str, w: str, d: str, i: str) -> str:
        return (f"{name} went to {w}.", f"{name} went out on {d}.", f"{name} bought {i}.")[slot]

    if label == 0:
        hyp = fact(who, where, day, item)
    elif label == 1 and rng.chance(0.5):
        hyp = (f"{who} did not go to {where}.", f"{who} stayed home on {day}.", f"{who} did not buy {item}.")[slot]
    elif label == 1:
        pools: tuple[tuple[str, ...], ...] = (PLACES, DAYS, ITEMS)
        other = rng.choice([v for v in pools[slot] if v != (where, day, item)[slot]])
        hyp = fact(who, *[other if k == slot else v for k, v in enumerate((where, day, item))])
    elif rng.chance(0.5):
        hyp = f"{who} {rng.choice(ABSENT_FACTS)}."
    else:
        hyp = fact(rng.choice([n for n in NAMES if n != who]), where, day, item)
    return f"Premise: {premise}\nHypothesis: {hyp}"


def _polarity(rng: Rng, label: int) -> str:
    return opinion(rng, positive=label == 1)


def _news8(rng: Rng, label: int) -> str:
    return news(rng, NEWS_TOPICS_8[label])


DOMAIN_TASK = ("recipes", "code", "clinical", "dialogue")


def _domain(rng: Rng, label: int) -> str:
    return DOMAINS[DOMAIN_TASK[label]](rng)


TASKS: dict[str, Task] = {
    "sentiment": Task("sentiment", (" bad", " good"), "Review: {text}\nSentiment:", _sentiment, 1),
    "topic": Task("topic", tuple(" " + t for t in NEWS_TOPICS), "Article: {text}\nTopic:", _topic, 0),
    # pair task: compare a claim with its premise (exact-word check; the hardest of the four)
    "claim": Task("claim", (" no", " yes"), "{text}\nAnswer:", _claim, 1),
    "domain": Task("domain", (" food", " code", " health", " chat"), "Text: {text}\nDomain:", _domain, 3),
    # rich corpus only (small / medium sizes): the harder three
    "news8": Task("news8", tuple(" " + t for t in NEWS_TOPICS_8), "Article: {text}\nSection:", _news8, 3,
                  biased=(0, 1, 2, 4, 5)),
    "polarity": Task("polarity", (" negative", " positive"), "Opinion: {text}\nOverall:", _polarity, 1),
    "nli": Task("nli", (" true", " false", " unknown"), "{text}\nInference:", _nli, 0),
}
# which tasks a corpus teaches (pretraining documents, zero-shot scores, label-word checks)
CORPUS_TASKS: dict[str, tuple[str, ...]] = {
    "core": ("claim", "domain", "sentiment", "topic"),
    "rich": ("claim", "domain", "news8", "nli", "polarity", "sentiment", "topic"),
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known: {sorted(TASKS)}")
    return TASKS[name]


def make_examples(task: Task, n: int, seed: int) -> list[Example]:
    """`n` examples with labels as balanced as n allows, in a shuffled order; a pure function of the seed."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    labels = [i % len(task.labels) for i in range(n)]
    Rng(derive_seed(seed, 0)).shuffle(labels)
    return [Example(task.draw(Rng(derive_seed(seed, 1, i)), y), y) for i, y in enumerate(labels)]


# ---------------------------------------------------------------- pretraining text
# A task-style document in the pretraining corpus carries the true label with P_TRUE, the task's bias
# label with P_BIAS and a uniformly drawn label otherwise. The model so learns the features and the answer
# format, but its zero-shot argmax leans to the bias label: accuracy starts low and a fine-tune can fix it.
P_TRUE, P_BIAS = 0.4, 0.45


def pretraining_docs(seed: int, n: int, corpus: str = "core") -> list[str]:
    """`n` task-style documents (prompt + a noisy, biased answer), the corpus's tasks round-robin by name."""
    if corpus not in CORPUS_TASKS:
        raise ValueError(f"unknown corpus {corpus!r}; known: {sorted(CORPUS_TASKS)}")
    names = sorted(CORPUS_TASKS[corpus])
    docs = []
    for i in range(n):
        task = TASKS[names[i % len(names)]]
        rng = Rng(derive_seed(seed, 2, i))
        label = rng.randint(len(task.labels))
        text = task.draw(rng, label)
        u = rng.uniform()
        leans = task.biased is None or label in task.biased
        bias = task.bias_label if leans else label
        answer = label if u < P_TRUE else bias if u < P_TRUE + P_BIAS else rng.randint(len(task.labels))
        docs.append(task.prompt(text) + task.labels[answer])
    return docs


# ---------------------------------------------------------------- client partitions
def dirichlet_partition(
    labels: Sequence[int], n_clients: int, alpha: float, seed: int, min_per_client: int = 2, max_tries: int = 100
) -> list[list[int]]:
    """Indices per client: for each label, shares ~ Dirichlet(alpha) over clients (label skew).

    Every index is assigned exactly once. Draws are retried (next derived seed) until each client holds at
    least `min_per_client` examples; small alpha -> strong skew.
    """
    if n_clients < 1:
        raise ValueError(f"n_clients must be >= 1, got {n_clients}")
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    if n_clients * min_per_client > len(labels):
        raise ValueError(f"{len(labels)} examples cannot give {n_clients} clients {min_per_client} each")
    classes = sorted(set(labels))
    for attempt in range(max_tries):
        rng = Rng(derive_seed(seed, 3, attempt))
        parts: list[list[int]] = [[] for _ in range(n_clients)]
        for c in classes:
            idx = [i for i, y in enumerate(labels) if y == c]
            rng.shuffle(idx)
            props = rng.dirichlet([alpha] * n_clients)
            bounds, acc = [], 0.0
            for p in props[:-1]:
                acc += p
                bounds.append(round(acc * len(idx)))
            for k, (lo, hi) in enumerate(zip([0, *bounds], [*bounds, len(idx)], strict=True)):
                parts[k].extend(idx[lo:hi])
        if min(len(p) for p in parts) >= min_per_client:
            return [sorted(p) for p in parts]
    raise ValueError(f"no Dirichlet(alpha={alpha}) split gave every one of {n_clients} clients "
                     f">= {min_per_client} examples in {max_tries} tries; use more examples or a larger alpha")


def extreme_partition(
    labels: Sequence[int], n_clients: int, n_single: int, alpha: float, seed: int, min_per_client: int = 2
) -> list[list[int]]:
    """The first `n_single` clients each hold ONE label (label k % n_labels, an n/N share of it); the rest
    of the data is split over the other clients by `dirichlet_partition`."""
    if not 0 <= n_single <= n_clients:
        raise ValueError(f"n_single must be in [0, n_clients={n_clients}], got {n_single}")
    if n_single == 0:
        return dirichlet_partition(labels, n_clients, alpha, seed, min_per_client)
    if n_single == n_clients:
        raise ValueError("n_single == n_clients leaves no data for anyone else; use n_single < n_clients")
    classes = sorted(set(labels))
    rng = Rng(derive_seed(seed, 4))
    pools = {c: [i for i, y in enumerate(labels) if y == c] for c in classes}
    for pool in pools.values():
        rng.shuffle(pool)
    share = len(labels) // n_clients
    single: list[list[int]] = []
    for k in range(n_single):
        pool = pools[classes[k % len(classes)]]
        take = min(share, len(pool) - min_per_client)  # leave some of the label for the others
        if take < min_per_client:
            raise ValueError(f"label {classes[k % len(classes)]} too small for {n_single} single-label clients")
        single.append(sorted(pool[:take]))
        del pool[:take]
    rest = sorted(i for pool in pools.values() for i in pool)
    sub = dirichlet_partition([labels[i] for i in rest], n_clients - n_single, alpha, seed, min_per_client)
    return single + [sorted(rest[j] for j in part) for part in sub]


# ---------------------------------------------------------------- files
@dataclass
class TaskFiles:
    name: str
    labels: dict[int, str]
    template: str
    train: dict[str, list[Example]]  # client id -> examples
    eval: list[Example]
    meta: dict[str, Any] = field(default_factory=dict)


def _write_jsonl(path: Path, examples: Sequence[Example]) -> None:
    with path.open("w", encoding="utf-8") as fh:
        for ex in examples:
            fh.write(json.dumps({"text": ex.text, "label": ex.label}) + "\n")


def write_task(
    out_dir: str | Path, task_name: str, n_clients: int = 10, alpha: float = 0.5, seed: int = 0,
    n_train: int = 2000, n_eval: int = 400, n_single: int = 0, max_length: int = 256,
) -> Path:
    """Write per-client JSONL files, eval.jsonl and task.json into `out_dir`; returns task.json's path."""
    task = get_task(task_name)
    train = make_examples(task, n_train, derive_seed(seed, 10))
    evals = make_examples(task, n_eval, derive_seed(seed, 11))
    labels = [ex.label for ex in train]
    parts = extreme_partition(labels, n_clients, n_single, alpha, derive_seed(seed, 12))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files, counts = [], {}
    for k, part in enumerate(parts):
        cid = f"client_{k:02d}"
        _write_jsonl(out / f"{cid}.jsonl", [train[i] for i in part])
        files.append(f"{cid}.jsonl")
        counts[cid] = [sum(1 for i in part if labels[i] == c) for c in range(len(task.labels))]
    _write_jsonl(out / "eval.jsonl", evals)
    meta = {"format_version": FORMAT_VERSION, "name": task.name,
            "verbalizer": {str(i): w for i, w in enumerate(task.labels)}, "template": task.template,
            "max_length": max_length,
            "train": files, "eval": "eval.jsonl", "n_clients": n_clients, "alpha": alpha,
            "n_single": n_single, "seed": seed, "label_counts": counts}
    path = out / "task.json"
    path.write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    log.info("wrote task %s: %d clients, alpha=%s, %d single-label -> %s", task.name, n_clients, alpha, n_single, out)
    return path


def _read_jsonl(path: Path, n_labels: int) -> list[Example]:
    out = []
    for lineno, row in read_jsonl(path):
        if not isinstance(row.get("text"), str) or not isinstance(row.get("label"), int):
            raise ValueError(f"{path}:{lineno}: need {{'text': str, 'label': int}}, got {json.dumps(row)[:80]!r}")
        if not 0 <= row["label"] < n_labels:
            raise ValueError(f"{path}:{lineno}: label {row['label']} out of range [0, {n_labels})")
        out.append(Example(row["text"], row["label"]))
    return out


def load_task(task_dir: str | Path) -> TaskFiles:
    """Read task.json and every JSONL file it names."""
    root = Path(task_dir)
    meta_path = root / "task.json" if root.is_dir() else root
    root = meta_path.parent
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    for key in ("name", "verbalizer", "template", "train", "eval"):
        if key not in meta:
            raise ValueError(f"{meta_path}: missing key {key!r}")
    labels = {int(k): v for k, v in meta["verbalizer"].items()}
    if sorted(labels) != list(range(len(labels))):
        raise ValueError(f"{meta_path}: verbalizer must be keyed '0'..'n-1', got {sorted(meta['verbalizer'])}")
    train = {Path(f).stem: _read_jsonl(root / f, len(labels)) for f in meta["train"]}
    return TaskFiles(meta["name"], labels, meta["template"], train, _read_jsonl(root / meta["eval"], len(labels)), meta)


# ---------------------------------------------------------------- scoring
def label_token_ids(tokenizer: Any, words: Sequence[str]) -> list[int]:
    """The single token id of each label word; raises naming every word that is not exactly one token."""
    ids, bad = [], []
    for w in words:
        toks = tokenizer.encode(w, add_special_tokens=False)
        if len(toks) != 1:
            bad.append(f"{w!r} -> {toks}")
        else:
            ids.append(toks[0])
    if bad:
        raise ValueError("label words must be one token each: " + "; ".join(bad))
    return ids


@torch.no_grad()
def label_logits(model: Any, tokenizer: Any, texts: Sequence[str], label_ids: Sequence[int], batch_size: int = 32) -> torch.Tensor:
    """(N, n_labels) next-token logits of the label words right after each prompt."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(texts), batch_size):
        enc = [tokenizer.encode(t, add_special_tokens=False) for t in texts[start:start + batch_size]]
        width = max(len(e) for e in enc)
        ids = torch.full((len(enc), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(enc), width), dtype=torch.long)
        for r, e in enumerate(enc):
            ids[r, : len(e)] = torch.tensor(e)
            mask[r, : len(e)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits  # (B, L, V)
        last = mask.sum(1).to(device) - 1
        out.append(logits[torch.arange(len(enc), device=device), last][:, list(label_ids)].float().cpu())
    return torch.cat(out)


def accuracy(model: Any, tokenizer: Any, task: Task, examples: Sequence[Example], batch_size: int = 32) -> float:
    """Share of examples whose highest-scoring label word is the right one (argmax over the verbaliser)."""
    if not examples:
        raise ValueError("accuracy needs at least one example")
    ids = label_token_ids(tokenizer, task.labels)
    logits = label_logits(model, tokenizer, [task.prompt(e.text) for e in examples], ids, batch_size)
    gold = torch.tensor([e.label for e in examples])
    return float((logits.argmax(1) == gold).float().mean())
