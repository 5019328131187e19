"""MEERKAT mask builder: pick the ~0.1% of weights that carry fine-tuning, once, on a server.

Pipeline (each step a short function, testable on its own):
    read_calibration(files)          -> documents per file + sha256          (raw text / JSONL)
    pack_sequences(tokenizer, ...)   -> (n_seqs, seq_len) int64 token ids     (round-robin over files)
    eligible_weights(model)          -> {module name: weight}                 (decoder Linear weights)
    accumulate_gradients(...)        -> GradStats: mean g and mean g^2 per weight, fp32
    select_top_k(keys, k)            -> {layer: sorted flat indices}          (coordinator/mask/select.py)
    concentration(sq, fraction)      -> top-k mean g^2 vs the next tier / the f..10f band

Scores: pretrain-grad = mean squared per-sequence gradient of the LM loss; weight-magnitude = |w|;
random = a uniform key from `shared.prng` (no global RNG). Ties are broken by (layer name, flat index)
ascending, so the same inputs give the same mask bit for bit.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from coordinator.mask.loading import load_for_mask, pick_device, tokenizer_encoder
from coordinator.mask.select import (
    BAND_FACTOR,
    MaskBuildError,
    concentration,
    float_keys,
    k_for,
    mask_sq_stats,
    random_keys,
    select_top_k,
    top_values,
)
from shared.jsonl import JsonlError, parse_jsonl

log = logging.getLogger(__name__)

Method = Literal["pretrain-grad", "weight-magnitude", "random"]
METHODS: tuple[str, ...] = ("pretrain-grad", "weight-magnitude", "random")


# ---------------------------------------------------------------- calibration text


@dataclass(frozen=True)
class CalibFile:
    """One calibration file: its documents in order and the sha256 of its bytes."""

    path: Path
    sha256: str
    documents: tuple[str, ...]


def _jsonl_document(path: Path, lineno: int, record: dict[str, Any]) -> str:
    if isinstance(record.get("text"), str):
        return str(record["text"])
    prompt, completion = record.get("prompt"), record.get("completion")
    if isinstance(prompt, str) and isinstance(completion, str):
        return prompt + completion
    raise MaskBuildError(f"{path}:{lineno}: needs a string 'text' field or string 'prompt' + 'completion'")


def read_calibration(path: str | Path) -> CalibFile:
    """Documents of one file: JSONL (`.jsonl`): one per record; text: paragraphs split on blank lines."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise MaskBuildError(f"calibration file {p}: cannot read ({exc.strerror})") from exc
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MaskBuildError(f"calibration file {p}: not UTF-8 text (byte {exc.start})") from exc
    if p.suffix.lower() in (".jsonl", ".ndjson"):
        try:
            docs = [_jsonl_document(p, i, row) for i, row in parse_jsonl(text, str(p))]
        except JsonlError as exc:
            raise MaskBuildError(str(exc)) from exc
    else:
        docs = [para.strip() for para in text.replace("\r\n", "\n").split("\n\n") if para.strip()]
    if not docs:
        raise MaskBuildError(f"calibration file {p}: contains no text")
    return CalibFile(p, hashlib.sha256(data).hexdigest(), tuple(docs))


@dataclass(frozen=True)
class Packed:
    """Token ids packed into fixed-length sequences and how many tokens each file contributed."""

    ids: torch.Tensor  # (n_seqs, seq_len) int64
    tokens_per_file: tuple[int, ...]


def _round_robin(files: Sequence[CalibFile]) -> Iterator[tuple[int, str]]:
    longest = max(len(f.documents) for f in files)
    for j in range(longest):
        for i, f in enumerate(files):
            if j < len(f.documents):
                yield i, f.documents[j]


def pack_sequences(
    encode: Callable[[str], list[int]],
    files: Sequence[CalibFile],
    n_seqs: int,
    seq_len: int,
    eos_id: int | None,
) -> Packed:
    """Documents (round-robin over files, eos between them) concatenated and cut into (n_seqs, seq_len)."""
    if n_seqs < 1 or seq_len < 2:
        raise MaskBuildError(f"need seqs >= 1 and seq-len >= 2, got seqs={n_seqs} seq-len={seq_len}")
    budget = n_seqs * seq_len
    stream: list[int] = []
    per_file = [0] * len(files)
    for i, doc in _round_robin(files):
        doc_ids = list(encode(doc)) + ([eos_id] if eos_id is not None else [])
        take = doc_ids[: budget - len(stream)]
        stream.extend(take)
        per_file[i] += len(take)
        if len(stream) >= budget:
            break
    n_full = len(stream) // seq_len
    if n_full == 0:
        names = ", ".join(str(f.path) for f in files)
        raise MaskBuildError(
            f"calibration text ({names}) has {len(stream)} tokens, fewer than one sequence of {seq_len}"
        )
    if n_full < n_seqs:
        log.warning(
            "calibration text gives only %d full sequences of %d tokens (asked for %d)",
            n_full,
            seq_len,
            n_seqs,
        )
        # the tokens of the dropped partial sequence came from the last files read; attribute them exactly
        extra = len(stream) - n_full * seq_len
        for i in reversed(range(len(files))):
            cut = min(extra, per_file[i])
            per_file[i] -= cut
            extra -= cut
    ids = torch.tensor(stream[: n_full * seq_len], dtype=torch.int64).view(n_full, seq_len)  # (N, L)
    return Packed(ids, tuple(per_file))


# ---------------------------------------------------------------- eligible weights and gradients


def eligible_weights(model: nn.Module, include_embeddings: bool = False) -> dict[str, torch.Tensor]:
    """{module name: weight} of the Linear layers inside the decoder; input/output embeddings on request.

    A weight shared by two modules (tied embeddings) appears once, under the Linear's name (lm_head),
    because that is the module a side-car wraps.
    """
    get_out = getattr(model, "get_output_embeddings", None)
    get_in = getattr(model, "get_input_embeddings", None)
    out_emb = get_out() if callable(get_out) else None
    in_emb = get_in() if callable(get_in) else None
    found: dict[str, torch.Tensor] = {}
    seen: dict[int, str] = {}
    for name, module in model.named_modules():
        is_emb = module is out_emb or module is in_emb
        if is_emb and not include_embeddings:
            continue
        if not (isinstance(module, nn.Linear) or (is_emb and isinstance(module, nn.Embedding))):
            continue
        w = module.weight
        if id(w) in seen:
            if isinstance(module, nn.Linear):  # tied: prefer the Linear's name
                del found[seen[id(w)]]
                found[name], seen[id(w)] = w, name
            continue
        found[name], seen[id(w)] = w, name
    if not found:
        raise MaskBuildError(f"{type(model).__name__} has no eligible nn.Linear weights")
    return dict(sorted(found.items()))


@dataclass
class GradStats:
    """Per-layer fp32 mean gradient and mean squared gradient over calibration sequences."""

    mean: dict[str, torch.Tensor]  # layer -> (out, in) in the weight's dtype
    sq: dict[str, torch.Tensor]  # layer -> (out, in) fp32
    n_seqs: int
    mean_loss: float


def accumulate_gradients(
    model: nn.Module,
    weights: Mapping[str, torch.Tensor],
    ids: torch.Tensor,
    *,
    progress: bool = True,
) -> GradStats:
    """Backprop the LM loss of each sequence alone; add g and g^2 into per-layer buffers as each arrives.

    One sequence at a time keeps activation memory at batch 1; the squared gradient is per sequence
    (a batch would square an average and shrink the signal). Only the eligible weights keep
    requires_grad. A post-accumulate hook on each weight adds its gradient into the buffers the moment
    backprop has finished it and frees it, so at most one layer's gradient is alive, never a full
    gradient copy of the model. g^2 is summed in fp32 (the ranking needs it); g in the weight's own
    dtype (fp32 for an fp32 model; a bf16 model's mean gradient, used only at the mask by GradIP, is
    summed in bf16 to keep the peak near 6 bytes per eligible parameter + the bf16 weights).
    """
    from tqdm import tqdm

    if ids.dim() != 2 or ids.shape[0] < 1:
        raise MaskBuildError(f"expected token ids of shape (n_seqs, seq_len), got {tuple(ids.shape)}")
    device = next(iter(weights.values())).device
    wanted = {id(w) for w in weights.values()}
    for p in model.parameters():
        p.requires_grad_(id(p) in wanted)
    total = {n: torch.zeros(w.shape, dtype=w.dtype, device=device) for n, w in weights.items()}
    total_sq = {n: torch.zeros(w.shape, dtype=torch.float32, device=device) for n, w in weights.items()}
    arrived: set[str] = set()

    def make_hook(name: str) -> Callable[[torch.Tensor], None]:
        def hook(w: torch.Tensor) -> None:
            g = w.grad
            assert g is not None  # the hook runs after accumulation
            g32 = g.float()  # the same tensor for an fp32 weight
            total[name].add_(g)
            total_sq[name].addcmul_(g32, g32)
            w.grad = None  # freed as soon as it is counted
            arrived.add(name)

        return hook

    handles = [w.register_post_accumulate_grad_hook(make_hook(n)) for n, w in weights.items()]  # type: ignore[no-untyped-call]
    loss_sum = 0.0
    modes = {m: m.training for m in model.modules()}
    model.eval()  # no dropout: the gradient of the model as it is
    for m in model.modules():
        # HF recomputes a block's activations only while the block is in train mode: flip just the
        # checkpointed blocks; their children (attention, dropout) stay in eval mode
        if getattr(m, "gradient_checkpointing", False) is True:
            m.training = True
    n = ids.shape[0]
    started = time.perf_counter()
    try:
        for i, row in enumerate(tqdm(ids, desc="mask: backprop", unit="seq", disable=None if progress else True)):
            seq = row.unsqueeze(0).to(device)  # (1, L)
            loss = model(input_ids=seq, labels=seq).loss
            if not torch.isfinite(loss):
                raise MaskBuildError(
                    f"calibration loss is {loss.item()} (not finite): check the model weights"
                )
            arrived.clear()
            loss.backward()
            loss_sum += float(loss.item())
            missing = sorted(set(weights) - arrived)
            if missing:
                raise MaskBuildError(f"layer {missing[0]} got no gradient: is it used by the forward pass?")
            _log_progress(i + 1, n, time.perf_counter() - started)
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
    for name in weights:
        total[name].div_(n)
        total_sq[name].div_(n)
        if not bool(torch.isfinite(total_sq[name]).all()):
            raise MaskBuildError(f"layer {name}: gradient overflowed (inf/NaN); try --dtype float32")
    return GradStats(total, total_sq, n, loss_sum / n)


def _log_progress(done: int, total: int, elapsed: float) -> None:
    """A log line with the rate and the ETA (also when stderr is not a terminal and tqdm stays quiet)."""
    every = max(1, total // 10)
    if done % every and done != total:
        return
    per = elapsed / done
    log.info("mask: %d/%d sequences, %.1f s/seq, ETA %.0f s", done, total, per, per * (total - done))


# ---------------------------------------------------------------- the whole build


@dataclass
class BuildResult:
    """A built mask before it is written: indices, shapes, mean grad at the mask, and what was measured."""

    method: str
    fraction: float
    indices: dict[str, torch.Tensor]  # layer -> sorted unique int64 flat indices
    shapes: dict[str, tuple[int, int]]  # every eligible layer, (out, in)
    grad: dict[str, torch.Tensor] | None  # layer -> fp32 mean gradient at `indices`
    calibration: dict[str, Any]  # files, sha256, tokens, seqs, seq_len, mean loss
    stats: dict[str, Any]  # concentration + mask statistics (only with calibration text)

    @property
    def nnz(self) -> int:
        return sum(int(t.numel()) for t in self.indices.values())


def _shape2(name: str, w: torch.Tensor) -> tuple[int, int]:
    if w.dim() != 2:
        raise MaskBuildError(f"layer {name}: weight has shape {tuple(w.shape)}, expected 2-D (out, in)")
    return int(w.shape[0]), int(w.shape[1])


def calibrate(
    model: nn.Module,
    encode: Callable[[str], list[int]],
    eos_id: int | None,
    calib: Sequence[CalibFile],
    weights: Mapping[str, torch.Tensor],
    *,
    seqs: int,
    seq_len: int,
    progress: bool = True,
) -> tuple[GradStats, dict[str, Any]]:
    """Pack the calibration text, backprop it, and describe what was used (for the mask's metadata)."""
    packed = pack_sequences(encode, calib, seqs, seq_len, eos_id)
    log.info(
        "calibration: %d sequences x %d tokens from %d file(s)", packed.ids.shape[0], seq_len, len(calib)
    )
    stats = accumulate_gradients(model, weights, packed.ids, progress=progress)
    desc = {
        "files": [
            {"name": f.path.name, "sha256": f.sha256, "tokens": n}
            for f, n in zip(calib, packed.tokens_per_file, strict=True)
        ],
        "seqs": int(packed.ids.shape[0]),
        "seq_len": seq_len,
        "tokens": int(packed.ids.numel()),
        "mean_loss": stats.mean_loss,
    }
    return stats, desc


def build_mask(
    model: nn.Module,
    encode: Callable[[str], list[int]] | None,
    eos_id: int | None,
    calib: Sequence[CalibFile],
    *,
    method: str = "pretrain-grad",
    fraction: float = 0.001,
    seqs: int = 128,
    seq_len: int = 512,
    seed: int = 0,
    progress: bool = True,
) -> BuildResult:
    """Score every eligible weight by `method`, keep the global top `fraction`, attach the mean gradient.

    Calibration text is required for pretrain-grad; for the baselines it is optional and, when given,
    only supplies the mean gradient at the mask (GradIP needs it) and the concentration numbers.
    """
    if method not in METHODS:
        raise MaskBuildError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if method == "pretrain-grad" and not calib:
        raise MaskBuildError("method pretrain-grad needs calibration text (--calib FILE)")
    if calib and encode is None:
        raise MaskBuildError("calibration text given but no tokenizer to encode it")
    weights = eligible_weights(model)
    shapes = {n: _shape2(n, w) for n, w in weights.items()}
    k = k_for(fraction, sum(w.numel() for w in weights.values()))
    grads: GradStats | None = None
    calib_desc: dict[str, Any] = {"files": []}
    if calib:
        assert encode is not None
        grads, calib_desc = calibrate(
            model, encode, eos_id, calib, weights, seqs=seqs, seq_len=seq_len, progress=progress
        )
    if method == "pretrain-grad":
        assert grads is not None
        keys = float_keys(grads.sq)
    elif method == "weight-magnitude":
        keys = float_keys({n: w.detach().abs() for n, w in weights.items()})
    else:
        if not 0 <= seed < 2**64:
            raise MaskBuildError(f"seed must be in [0, 2**64), got {seed}")
        keys = random_keys(shapes, seed)
    indices = select_top_k(keys, k)
    del keys
    grad_at: dict[str, torch.Tensor] | None = None
    stats: dict[str, Any] = {}
    if grads is not None:
        grad_at = {n: grads.mean[n].flatten()[idx].float().cpu().contiguous() for n, idx in indices.items()}
        stats = {"concentration": concentration(grads.sq, fraction), **mask_sq_stats(indices, grads.sq)}
        log.info(
            "concentration: top %.4g%% mean g^2 = %.3gx next tier, %.3gx the band",
            100 * fraction,
            stats["concentration"]["ratio_next_tier"] or float("nan"),
            stats["concentration"]["ratio_band"] or float("nan"),
        )
    indices = {n: idx.cpu() for n, idx in indices.items()}
    return BuildResult(method, fraction, indices, shapes, grad_at, calib_desc, stats)


# ---------------------------------------------------------------- the file


def describe(result: BuildResult, extra: Mapping[str, Any]) -> str:
    """The `calibration` metadata string: JSON with the files, token counts, settings and concentration."""
    body = {**result.calibration, **extra}
    if result.stats:
        body["stats"] = result.stats
    return json.dumps(body, sort_keys=True, allow_nan=False)


def parse_description(text: str) -> dict[str, Any] | None:
    """The JSON written by `describe`, or None when a mask carries free text from elsewhere."""
    try:
        body = json.loads(text)
    except json.JSONDecodeError:
        return None
    return body if isinstance(body, dict) else None


def to_mask(result: BuildResult, fingerprint: str, extra: Mapping[str, Any], created: str = "") -> Any:
    """A `shared.maskfile.Mask` for the result (only masked layers are listed)."""
    from shared.maskfile import FORMAT_VERSION, Mask, MaskMeta

    meta = MaskMeta(
        format_version=FORMAT_VERSION,
        method=result.method,
        fraction=result.fraction,
        calibration=describe(result, extra),
        fingerprint=fingerprint,
        created=created,
    )
    shapes = {n: result.shapes[n] for n in result.indices}
    return Mask(layers=dict(result.indices), shapes=shapes, grad=result.grad, meta=meta)


__all__ = [
    "BAND_FACTOR",
    "METHODS",
    "BuildResult",
    "CalibFile",
    "GradStats",
    "MaskBuildError",
    "Method",
    "Packed",
    "accumulate_gradients",
    "build_mask",
    "calibrate",
    "concentration",
    "describe",
    "eligible_weights",
    "float_keys",
    "k_for",
    "load_for_mask",
    "mask_sq_stats",
    "pack_sequences",
    "parse_description",
    "pick_device",
    "random_keys",
    "read_calibration",
    "select_top_k",
    "to_mask",
    "tokenizer_encoder",
    "top_values",
]
