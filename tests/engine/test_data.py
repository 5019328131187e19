"""Data: row formats, loss only on completion/label tokens, padding/micro-batch invariance, accuracy,
task.json, resumable shuffled stream."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from shared.dataset import (
    DataError,
    DataPointer,
    DataStream,
    TaskConfig,
    encode_rows,
    load_jsonl,
    load_task_config,
)
from shared.loss import batch_loss, evaluate

TASK = TaskConfig(name="t", verbalizer={"0": " negative", "1": " positive"}, template="{text} review:", max_length=64)


@pytest.fixture(scope="module")
def tok(llama_dir: Path) -> Any:
    return AutoTokenizer.from_pretrained(str(llama_dir))


@pytest.fixture(scope="module")
def model(llama_dir: Path) -> Any:
    return AutoModelForCausalLM.from_pretrained(str(llama_dir), dtype=torch.float32).eval()


def _write(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_row_formats_and_targets(tmp_path: Path, tok: Any) -> None:
    rows: list[dict[str, Any]] = [
        {"text": "the movie was great"},
        {"prompt": "the movie", "completion": " was great"},
        {"text": "a terrible film", "label": 0},
        {"text": "i loved the music", "label": "1"},
    ]
    ds = load_jsonl(_write(tmp_path / "d.jsonl", rows), tok, TASK)
    text_ids = tok("the movie was great")["input_ids"]
    assert list(ds.examples[0].input_ids) == text_ids and ds.examples[0].n_target == len(text_ids) - 1
    comp = tok(" was great", add_special_tokens=False)["input_ids"]
    assert list(ds.examples[1].input_ids) == tok("the movie")["input_ids"] + comp
    assert ds.examples[1].n_target == len(comp)
    neg = tok(" negative", add_special_tokens=False)["input_ids"]
    assert list(ds.examples[2].input_ids) == tok("a terrible film review:")["input_ids"] + neg
    assert ds.examples[2].n_target == len(neg) and ds.examples[2].label == 0
    assert ds.examples[3].label == 1
    assert ds.classes == ("0", "1")
    assert ds.class_token_ids == (neg[0], tok(" positive", add_special_tokens=False)["input_ids"][0])


@pytest.mark.parametrize(
    "row, task, match",
    [
        ({"text": "x", "label": 1}, TaskConfig(), "no verbalizer"),
        ({"text": "x", "label": 7}, TASK, "label 7 not in verbalizer"),
        ({"prompt": "x"}, TASK, "'completion' must be a string"),
        ({"body": "x"}, TASK, "row needs"),
        ({"text": 5}, TASK, "'text' must be a string"),
    ],
)
def test_bad_rows_name_file_and_line(tmp_path: Path, tok: Any, row: dict[str, Any], task: TaskConfig, match: str) -> None:
    path = _write(tmp_path / "bad.jsonl", [{"text": "fine"}, row])
    with pytest.raises(DataError, match=match) as info:
        load_jsonl(path, tok, task)
    assert "bad.jsonl:2" in str(info.value)


def test_truncation_keeps_the_completion(tok: Any) -> None:
    task = TaskConfig(verbalizer={"0": " negative", "1": " positive"}, max_length=6)
    ds = encode_rows([{"text": "the movie was great and the acting was wonderful", "label": 1}], tok, task)
    ex = ds.examples[0]
    pos = tok(" positive", add_special_tokens=False)["input_ids"]
    assert len(ex.input_ids) == 6 and list(ex.input_ids[-len(pos) :]) == pos and ex.n_target == len(pos)


def _reference_loss(model: Any, ids: tuple[int, ...], n_target: int) -> float:
    """Unpadded, one example: full logits, mean CE over the last n_target tokens."""
    x = torch.tensor([ids])
    with torch.no_grad():
        logits = model(x).logits[0]
    return float(F.cross_entropy(logits[-n_target - 1 : -1], x[0, -n_target:]))


def test_loss_only_on_targets_and_padding_invariant(model: Any, tok: Any) -> None:
    rows: list[dict[str, Any]] = [
        {"text": "the worst thing i have seen this year"},
        {"prompt": "a terrible film with a boring plot", "completion": " and bad acting"},
        {"text": "fun", "label": 1},
        {"text": "the movie was great and the acting was wonderful", "label": 0},
    ]
    ds = encode_rows(rows, tok, TASK)
    want = np.mean([_reference_loss(model, e.input_ids, e.n_target) for e in ds.examples])
    batch = ds.batch(range(len(ds)))
    assert batch_loss(model, batch) == pytest.approx(want, rel=1e-5)
    # micro-batches: summed (sum of example losses / B) gives the same number
    assert batch_loss(model, batch, micro_batch=1) == pytest.approx(want, rel=1e-5)
    assert batch_loss(model, batch, micro_batch=3) == pytest.approx(want, rel=1e-5)


def test_prompt_tokens_do_not_enter_the_loss(model: Any, tok: Any) -> None:
    """The loss is the completion-only reference, and differs from the loss over all tokens."""
    ds = encode_rows([{"prompt": "the movie was great", "completion": " fun"}], tok, TASK)
    e = ds.examples[0]
    masked = batch_loss(model, ds.batch([0]))
    assert masked == pytest.approx(_reference_loss(model, e.input_ids, e.n_target), rel=1e-5)
    assert masked != pytest.approx(_reference_loss(model, e.input_ids, len(e.input_ids) - 1), rel=1e-3)


def test_evaluate_accuracy_matches_argmax_over_verbalizer(model: Any, tok: Any) -> None:
    rows = [{"text": t, "label": i % 2} for i, t in enumerate(["the movie", "a terrible film", "i loved it", "boring", "fun plot"])]
    ds = encode_rows(rows, tok, TASK)
    correct = 0
    for e in ds.examples:
        x = torch.tensor([e.input_ids])
        with torch.no_grad():
            logits = model(x).logits[0, -e.n_target - 1]
        pred = int(torch.argmax(logits[list(ds.class_token_ids or ())]))
        correct += int(pred == e.label)
    out = evaluate(model, ds, batch_size=2)
    assert out["accuracy"] == pytest.approx(correct / len(rows))
    assert out["loss"] == pytest.approx(batch_loss(model, ds.batch(range(len(ds)))), rel=1e-5)
    lm_only = encode_rows([{"text": "the movie was great"}], tok, TASK)
    assert evaluate(model, lm_only)["accuracy"] is None


def test_task_config_file(tmp_path: Path) -> None:
    p = tmp_path / "task.json"
    p.write_text(json.dumps({"name": "sst2", "verbalizer": {"0": " negative", "1": " positive"}, "n_clients": 10}))
    task = load_task_config(p)
    assert task.verbalizer == {"0": " negative", "1": " positive"} and task.template == "{text}"
    p.write_text(json.dumps({"verbalizer": {"0": ""}}))
    with pytest.raises(DataError, match="task.json.*verbalizer"):
        load_task_config(p)
    p.write_text(json.dumps({"template": "no placeholder"}))
    with pytest.raises(DataError, match="template"):
        load_task_config(p)
    p.write_text("{not json")
    with pytest.raises(DataError, match="cannot read"):
        load_task_config(p)


def test_stream_is_a_resumable_seeded_permutation() -> None:
    full = DataStream(10, seed=42)
    seq = full.take(25)
    assert sorted(seq[:10]) == list(range(10)) and sorted(seq[10:20]) == list(range(10))
    assert seq[:10] != seq[10:20]  # each epoch its own permutation
    assert seq[:10] != list(range(10))
    part = DataStream(10, seed=42)
    first = part.take(7)
    saved = part.pointer
    assert saved == DataPointer(0, 7)
    resumed = DataStream(10, seed=42, pointer=DataPointer(saved.epoch, saved.index))
    assert first + resumed.take(18) == seq
    assert resumed.pointer == DataPointer(2, 5)
    assert DataStream(10, seed=43).take(10) != seq[:10]
    assert DataStream(10, seed=42, shuffle=False).take(12) == list(range(10)) + [0, 1]
    with pytest.raises(DataError, match="must be >= 0"):
        DataStream(3, seed=1, pointer=DataPointer(0, -1))
    with pytest.raises(DataError, match="> dataset size"):
        DataStream(3, seed=1, pointer=DataPointer(0, 4))
