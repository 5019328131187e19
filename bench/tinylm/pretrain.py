"""Pretrain the project's own tiny Llama-config LM on the generated corpus; deterministic and cached.

Recipe = size spec + seed + the source of the corpus/task/tokenizer/pretrain modules. The same recipe gives
the same weights on the same machine and thread count (weights initialised and data ordered from
shared.prng, no global RNG, no dropout). Result: a `save_pretrained` dir (safetensors) + tokenizer +
`meerkat_tinylm.json` manifest, cached under `$XDG_CACHE_HOME|~/.cache/meerkat-edge/tinylm/<size>-<hash>`,
written to a temp dir and renamed so a killed run never leaves half a model in the cache.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from bench.tinylm import corpus, tasks
from bench.tinylm import tokenizer as tokenizer_mod
from bench.tinylm.tokenizer import save_tokenizer, train_tokenizer
from shared.fsio import share_tree
from shared.prng import derive_seed, raw_u64

log = logging.getLogger(__name__)
MANIFEST = "meerkat_tinylm.json"
RECIPE_VERSION = 1


@dataclass(frozen=True)
class SizeSpec:
    name: str
    hidden: int  # model width d
    layers: int
    heads: int
    intermediate: int  # SwiGLU inner width
    steps: int  # optimiser steps
    batch: int  # sequences per step
    seq_len: int = 128  # tokens per training sequence
    vocab: int = 2048  # BPE target size (the corpus saturates a little below 2k)
    lr: float = 3e-3  # AdamW peak; linear warmup then cosine to 10%
    warmup: int = 50
    weight_decay: float = 0.1
    n_docs: int = 30_000  # domain documents (reviews, news, recipes, code, clinical, dialogue)
    n_task_docs: int = 15_000  # task-style documents with noisy, biased answers (bench.tinylm.tasks)
    init_std: float = 0.02
    corpus: str = "core"  # "core": 4 tasks, the demo text; "rich": + news8 / polarity / nli (corpus.CORPORA)
    device: str = "cpu"  # "auto" = cuda when available; not in the cache key (like the thread count)


SIZES: dict[str, SizeSpec] = {
    # tests only: seconds
    "micro": SizeSpec("micro", hidden=32, layers=1, heads=2, intermediate=64, steps=20, batch=4, seq_len=64,
                      n_docs=600, n_task_docs=300, warmup=5),
    # `make demo` critical path: <= ~2 min on 2 cores
    "demo": SizeSpec("demo", hidden=128, layers=2, heads=4, intermediate=384, steps=600, batch=16),
    # ~5-10M parameters, rich corpus (7 tasks), <= 30 min on 2 loaded cores with --threads 1
    "small": SizeSpec("small", hidden=256, layers=4, heads=4, intermediate=1024, steps=900, batch=16, lr=2e-3,
                      vocab=4096, n_task_docs=21_000, corpus="rich"),
    # ~30-60M parameters, rich corpus: for a GPU (CPU works but takes many hours)
    "medium": SizeSpec("medium", hidden=640, layers=8, heads=10, intermediate=1792, steps=4000, batch=32,
                       seq_len=256, lr=6e-4, warmup=200, vocab=4096, n_docs=200_000, n_task_docs=100_000,
                       corpus="rich", device="auto"),
}
ALIASES = {"base": "medium"}  # the old name of the GPU size


def get_spec(size: str) -> SizeSpec:
    size = ALIASES.get(size, size)
    if size not in SIZES:
        raise ValueError(f"unknown tiny-model size {size!r}; known: {list(SIZES)} (alias: base = medium)")
    return SIZES[size]


def spec_tasks(spec: SizeSpec) -> tuple[str, ...]:
    """The task names this size is pretrained for (bench.tinylm.tasks.CORPUS_TASKS of its corpus)."""
    return tasks.CORPUS_TASKS[spec.corpus]


def model_tasks(model_dir: str | Path) -> tuple[str, ...]:
    """The task names a built model dir was pretrained for (manifest; older manifests: the core four)."""
    man = read_manifest(model_dir)
    return tuple(man.get("tasks", tasks.CORPUS_TASKS["core"]))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise ValueError(f"device must be auto | cpu | cuda[:N], got {name!r}")
    return torch.device(name)


def recipe_hash(spec: SizeSpec, seed: int) -> str:
    """sha256 over the spec, the seed and the source of every module that shapes the weights."""
    h = hashlib.sha256(json.dumps({"v": RECIPE_VERSION, "spec": dataclasses.asdict(spec), "seed": seed},
                                  sort_keys=True).encode())
    for path in (corpus.__file__, tasks.__file__, tokenizer_mod.__file__, __file__):
        h.update(Path(path).read_bytes())
    return h.hexdigest()


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "meerkat-edge" / "tinylm"


def _gaussian(seed: int, n: int) -> torch.Tensor:
    """n standard normals from one shared.prng stream (Box-Muller on the two 32-bit halves of each u64)."""
    u = raw_u64(seed, n)
    u1 = ((u >> np.uint64(32)).astype(np.float64) + 0.5) / 2.0**32
    u2 = ((u & np.uint64(0xFFFFFFFF)).astype(np.float64) + 0.5) / 2.0**32
    z = np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)
    return torch.from_numpy(z.astype(np.float32))


def init_weights(model: torch.nn.Module, seed: int, std: float, n_layers: int) -> None:
    """Norms -> 1; every other tensor ~ N(0, std^2) from derive_seed(seed, k) (k = rank of its sorted name);
    residual output projections (o_proj, down_proj) scaled by 1/sqrt(2 * layers) as in GPT-2."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for k, name in enumerate(sorted(params)):
            p = params[name]
            if "norm" in name:
                p.fill_(1.0)
                continue
            s = std / math.sqrt(2 * n_layers) if name.endswith(("o_proj.weight", "down_proj.weight")) else std
            p.copy_(_gaussian(derive_seed(seed, 7, k), p.numel()).view_as(p) * s)


def _documents(spec: SizeSpec, seed: int) -> list[str]:
    docs = (corpus.generate(derive_seed(seed, 1), spec.n_docs, corpus=spec.corpus)
            + tasks.pretraining_docs(derive_seed(seed, 2), spec.n_task_docs, corpus=spec.corpus))
    corpus.Rng(derive_seed(seed, 3)).shuffle(docs)
    return docs


def _blocks(tokenizer: Any, docs: list[str], seq_len: int) -> torch.Tensor:
    """(n_blocks, seq_len) int64: the documents joined by <|eos|> and cut into equal blocks."""
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for ids in tokenizer(docs, add_special_tokens=False)["input_ids"]:
        stream.extend(ids)
        stream.append(eos)
    n = len(stream) // seq_len
    return torch.tensor(stream[: n * seq_len], dtype=torch.long).view(n, seq_len)


def _model(spec: SizeSpec, tokenizer: Any) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=spec.hidden, intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers, num_attention_heads=spec.heads, num_key_value_heads=spec.heads,
        max_position_embeddings=max(512, spec.seq_len), rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(cfg)


def _lr(spec: SizeSpec, step: int) -> float:
    if step < spec.warmup:
        return spec.lr * (step + 1) / spec.warmup
    frac = (step - spec.warmup) / max(1, spec.steps - spec.warmup)
    return spec.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * frac)))


def _train(model: Any, blocks: torch.Tensor, spec: SizeSpec, seed: int, progress: bool,
           device: torch.device) -> list[float]:
    """AdamW over blocks in a shared.prng order (a fresh permutation per epoch); returns per-step losses."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": spec.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=spec.lr, betas=(0.9, 0.95))
    order: list[int] = []
    epoch, losses = 0, []
    model.train()
    bar = tqdm(range(spec.steps), desc=f"pretrain {spec.name}", disable=not progress, unit="step")
    for step in bar:
        if len(order) < spec.batch:
            perm = list(range(len(blocks)))
            corpus.Rng(derive_seed(seed, 5, epoch)).shuffle(perm)
            order.extend(perm)
            epoch += 1
        idx, order = order[: spec.batch], order[spec.batch:]
        batch = blocks[idx].to(device)  # (B, T)
        for g in opt.param_groups:
            g["lr"] = _lr(spec, step)
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        if step % 10 == 0:
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return losses


def zero_shot(model: Any, tokenizer: Any, seed: int, n: int = 200,
              names: tuple[str, ...] = tasks.CORPUS_TASKS["core"]) -> dict[str, float]:
    """Accuracy per task on `n` fresh balanced examples (argmax over the verbaliser).

    The example seed of a task is keyed by a fixed rank (the sorted core tasks, then the sorted others), so
    a task's zero-shot examples do not depend on which other tasks a size has (core ranks as before)."""
    core = sorted(tasks.CORPUS_TASKS["core"])
    rank = {name: k for k, name in enumerate(core + sorted(set(tasks.TASKS) - set(core)))}
    return {name: tasks.accuracy(model, tokenizer, tasks.TASKS[name],
                                 tasks.make_examples(tasks.TASKS[name], n, derive_seed(seed, 9, rank[name])))
            for name in sorted(names)}


def build_model_dir(spec: SizeSpec, seed: int, out_dir: str | Path, progress: bool = True,
                    device_override: str | None = None) -> dict[str, Any]:
    """Corpus -> tokenizer -> pretraining -> save into `out_dir`; returns the manifest (also written there)."""
    t0 = time.time()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    docs = _documents(spec, seed)
    corpus_sha = hashlib.sha256("\x00".join(docs).encode()).hexdigest()
    tokenizer = train_tokenizer(docs[: min(len(docs), 12_000)], spec.vocab)
    names = spec_tasks(spec)
    for name in names:
        try:
            tasks.label_token_ids(tokenizer, tasks.TASKS[name].labels)
        except ValueError as exc:
            raise RuntimeError(f"task {name}: the trained tokenizer splits a label word ({exc})") from exc
    blocks = _blocks(tokenizer, docs, spec.seq_len)
    log.info("corpus: %d docs, %d blocks of %d tokens, vocab %d (%.1fs)",
             len(docs), len(blocks), spec.seq_len, len(tokenizer), time.time() - t0)
    device = resolve_device(spec.device if device_override is None else device_override)
    model = _model(spec, tokenizer)
    init_weights(model, derive_seed(seed, 6), spec.init_std, spec.layers)
    model.to(device)
    losses = _train(model, blocks, spec, seed, progress, device)
    acc = zero_shot(model, tokenizer, seed, names=names)
    model.to("cpu")
    model.save_pretrained(str(out), safe_serialization=True)
    save_tokenizer(tokenizer, out)
    import transformers

    manifest = {
        "format_version": 1, "size": spec.name, "seed": seed, "recipe_hash": recipe_hash(spec, seed),
        "spec": dataclasses.asdict(spec), "steps": spec.steps, "final_loss": sum(losses[-20:]) / len(losses[-20:]),
        "first_loss": losses[0], "n_params": sum(p.numel() for p in model.parameters()),
        "corpus_sha256": corpus_sha, "n_docs": len(docs), "n_tokens": int(blocks.numel()),
        "tokens_seen": spec.steps * spec.batch * spec.seq_len, "vocab_size": len(tokenizer),
        "corpus": spec.corpus, "tasks": list(names), "device": str(device),
        "zero_shot_accuracy": acc, "wall_s": round(time.time() - t0, 2), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "transformers": transformers.__version__,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    log.info("tiny model %s: %d params, loss %.3f -> %.3f, zero-shot %s, %.1fs", spec.name, manifest["n_params"],
             losses[0], manifest["final_loss"], acc, manifest["wall_s"])
    return manifest


def get_model_dir(size: str = "demo", seed: int = 0, *, out: str | Path | None = None, force: bool = False,
                  progress: bool = True, cache: str | Path | None = None, device: str | None = None) -> Path:
    """The pretrained tiny model's dir: from the cache, or built once (atomically) into it.

    With `out`, the model is also copied there and `out` is returned. `force` rebuilds the cache entry.
    `device` (auto | cpu | cuda) overrides the size's training device for a build; not in the cache key.
    """
    spec = get_spec(size)
    root = Path(cache) if cache is not None else cache_root()
    final = root / f"{spec.name}-{recipe_hash(spec, seed)[:12]}"
    if force or not (final / MANIFEST).is_file():
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / f".tmp-{final.name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            build_model_dir(spec, seed, tmp, progress, device)
            if final.exists():  # force, or a half-dead entry without manifest: move aside, then swap in
                trash = root / f".old-{final.name}-{os.getpid()}"
                final.rename(trash)
                shutil.rmtree(trash, ignore_errors=True)
            try:
                tmp.rename(final)
            except OSError:  # another process finished the same recipe first: keep theirs
                if not (final / MANIFEST).is_file():
                    raise
                log.info("another build of %s won the race; using it", final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    else:
        log.info("tiny model %s cached at %s", spec.name, final)
    share_tree(final)  # a service user reads it: weights 0644, not transformers' 0600 (nor a 0077 umask's)
    if out is None:
        return final
    dest = Path(out)
    if dest.exists() and any(dest.iterdir()) and not (dest / MANIFEST).is_file():
        raise FileExistsError(f"--out {dest} exists and is not a tiny-model dir; pick an empty or new dir")
    shutil.copytree(final, dest, dirs_exist_ok=True)
    return share_tree(dest)


def read_manifest(model_dir: str | Path) -> dict[str, Any]:
    path = Path(model_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{model_dir} has no {MANIFEST}: not a tiny-model dir")
    result: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return result
