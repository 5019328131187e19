"""Backprop learnability check: is each task learnable from the pretrained tiny LM, and how far from solved?

For every task the model was pretrained for: score it zero-shot on fresh balanced eval examples, fine-tune a
fresh copy of ALL weights with plain AdamW on the label token (full-vocabulary cross-entropy at the last
prompt position, as the client engine trains), score again. Cheap ground truth for the learning benchmark:
a task that plain backprop cannot move in a few hundred steps cannot separate zeroth-order methods either.
`meerkat tiny-model --size S --check-tasks` runs it; numbers in docs/TINYLM.md.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from bench.tinylm import tasks
from bench.tinylm.pretrain import model_tasks
from shared.prng import derive_seed

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CheckConfig:
    steps: int = 100  # AdamW steps per task
    lr: float = 1e-3
    batch: int = 16
    n_eval: int = 200  # balanced eval examples per task, drawn independently of the training ones
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 0 or self.batch < 1 or self.n_eval < 1 or self.lr <= 0:
            raise ValueError(f"check config needs steps >= 0, batch >= 1, n_eval >= 1, lr > 0; got {self}")


@dataclass(frozen=True)
class TaskCheck:
    task: str
    n_labels: int
    chance: float
    zero_shot: float
    after: float
    steps: int
    final_loss: float  # mean training loss over the last 10 steps (nan with steps=0)
    wall_s: float


def _last_logits(model: Any, pad_id: int, batch: Sequence[Sequence[int]]) -> torch.Tensor:
    """(B, V) logits at each sequence's last token (right padding); keeps the autograd graph."""
    width = max(len(ids) for ids in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for r, row in enumerate(batch):
        ids[r, : len(row)] = torch.tensor(row)
        mask[r, : len(row)] = 1
    logits: torch.Tensor = model(input_ids=ids, attention_mask=mask).logits
    return logits[torch.arange(len(batch)), mask.sum(1) - 1]


def finetune(model: Any, tokenizer: Any, task: tasks.Task, train: Sequence[tasks.Example], cfg: CheckConfig) -> list[float]:
    """Plain full-weight AdamW on the label token, `cfg.steps` batches cycling through `train`; losses per step."""
    label_ids = tasks.label_token_ids(tokenizer, task.labels)
    prompts = [tokenizer.encode(task.prompt(e.text), add_special_tokens=False) for e in train]
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    model.train()
    losses = []
    for step in range(cfg.steps):
        idx = [(step * cfg.batch + j) % len(train) for j in range(cfg.batch)]
        logits = _last_logits(model, tokenizer.pad_token_id, [prompts[i] for i in idx])
        target = torch.tensor([label_ids[train[i].label] for i in idx])
        loss = torch.nn.functional.cross_entropy(logits.float(), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
        losses.append(float(loss.detach()))
    model.eval()
    return losses


def check_task(model_dir: str | Path, name: str, cfg: CheckConfig) -> TaskCheck:
    """Zero-shot -> after-fine-tune accuracy of one task on a fresh copy of the model in `model_dir`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.time()
    task = tasks.get_task(name)
    k = sorted(tasks.TASKS).index(name)
    train = tasks.make_examples(task, max(cfg.batch, cfg.steps * cfg.batch), derive_seed(cfg.seed, 20, k))
    evals = tasks.make_examples(task, cfg.n_eval, derive_seed(cfg.seed, 21, k))
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model: Any = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.eval()
    before = tasks.accuracy(model, tokenizer, task, evals)
    losses = finetune(model, tokenizer, task, train, cfg)
    after = tasks.accuracy(model, tokenizer, task, evals)
    tail = losses[-10:]
    return TaskCheck(name, len(task.labels), 1.0 / len(task.labels), before, after, cfg.steps,
                     sum(tail) / len(tail) if tail else float("nan"), round(time.time() - t0, 1))


def check_tasks(model_dir: str | Path, names: Sequence[str] | None = None, cfg: CheckConfig | None = None) -> list[TaskCheck]:
    """`check_task` for each named task (default: every task the model was pretrained for)."""
    cfg = cfg or CheckConfig()
    known = model_tasks(model_dir)
    chosen = list(known) if names is None else list(names)
    missing = [n for n in chosen if n not in known]
    if missing:
        raise ValueError(f"model {model_dir} was not pretrained for task(s) {missing}; it knows {list(known)} "
                         "(news8 / polarity / nli need --size small or medium)")
    out = []
    for name in chosen:
        res = check_task(model_dir, name, cfg)
        log.info("check %s: %s", name, asdict(res))
        out.append(res)
    return out


def format_row(r: TaskCheck) -> str:
    return (f"{r.task:<10} {r.n_labels}-way  chance {r.chance:.2f}  zero-shot {r.zero_shot:.3f} -> "
            f"{r.after:.3f} after {r.steps} steps (loss {r.final_loss:.3f}, {r.wall_s:.0f} s)")
