"""MEERKAT mask builder: pick the ~0.1% of weights that carry fine-tuning, once, on a server.

Pipeline (each step a short function, testable on its own):
    read_calibration(files)          -> documents per file + sha256          (raw text / JSONL)
    pack_sequences(tokenizer, ...)   -> (n_seqs, seq_len) int64 token ids     (round-robin over files)
    eligible_weights(model)          -> {module name: weight}                 (decoder Linear weights)
    accumulate_gradients(...)        -> GradStats: mean g and mean g^2 per weight, fp32
    select_top_k(keys, k)            -> {layer: sorted flat indices}          (global, exact, deterministic)
    concentration(sq, fraction)      -> top-k mean g^2 vs the next tier / the f..10f band

Scores: pretrain-grad = mean squared per-sequence gradient of the LM loss; weight-magnitude = |w|;
random = a uniform key from `shared.prng` (no global RNG). Ties are broken by (layer name, flat index)
ascending, so the same inputs give the same mask bit for bit.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from shared import prng
from shared.jsonl import JsonlError, parse_jsonl

log = logging.getLogger(__name__)

Method = Literal["pretrain-grad", "weight-magnitude", "random"]
METHODS: tuple[str, ...] = ("pretrain-grad", "weight-magnitude", "random")
BAND_FACTOR = 10  # the paper compares the top 0.1% with the 0.1%..1% band: f .. 10 f


class MaskBuildError(ValueError):
    """Bad calibration input, model or arguments for the mask builder; the message names the culprit."""


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

    mean: dict[str, torch.Tensor]  # layer -> (out, in) fp32
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
    """Backprop the LM loss of each sequence alone; add g and g^2 into fp32 buffers; free the grads.

    One sequence at a time keeps activation memory at batch 1; the squared gradient is per sequence
    (a batch would square an average and shrink the signal). Only the eligible weights keep
    requires_grad, so no gradient memory is spent on anything else.
    """
    from tqdm import tqdm

    if ids.dim() != 2 or ids.shape[0] < 1:
        raise MaskBuildError(f"expected token ids of shape (n_seqs, seq_len), got {tuple(ids.shape)}")
    device = next(iter(weights.values())).device
    wanted = {id(w) for w in weights.values()}
    for p in model.parameters():
        p.requires_grad_(id(p) in wanted)
    total = {n: torch.zeros(w.shape, dtype=torch.float32, device=device) for n, w in weights.items()}
    total_sq = {n: torch.zeros(w.shape, dtype=torch.float32, device=device) for n, w in weights.items()}
    loss_sum = 0.0
    modes = {m: m.training for m in model.modules()}
    model.eval()  # no dropout: the gradient of the model as it is
    for m in model.modules():
        # HF recomputes a block's activations only while the block is in train mode: flip just the
        # checkpointed blocks; their children (attention, dropout) stay in eval mode
        if getattr(m, "gradient_checkpointing", False) is True:
            m.training = True
    try:
        for row in tqdm(ids, desc="mask: backprop", unit="seq", disable=None if progress else True):
            seq = row.unsqueeze(0).to(device)  # (1, L)
            loss = model(input_ids=seq, labels=seq).loss
            if not torch.isfinite(loss):
                raise MaskBuildError(
                    f"calibration loss is {loss.item()} (not finite): check the model weights"
                )
            loss.backward()
            loss_sum += float(loss.item())
            for name, w in weights.items():
                g = w.grad
                if g is None:
                    raise MaskBuildError(f"layer {name} got no gradient: is it used by the forward pass?")
                g32 = g.float()
                total[name].add_(g32)
                total_sq[name].addcmul_(g32, g32)
                w.grad = None
    finally:
        for m, mode in modes.items():
            m.training = mode
    n = ids.shape[0]
    for name in weights:
        total[name].div_(n)
        total_sq[name].div_(n)
        if not bool(torch.isfinite(total_sq[name]).all()):
            raise MaskBuildError(f"layer {name}: gradient overflowed (inf/NaN); try --dtype float32")
    return GradStats(total, total_sq, n, loss_sum / n)


# ---------------------------------------------------------------- global top-k


def float_keys(scores: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Order-preserving int32 keys of non-negative finite float32 scores: their IEEE bit patterns.

    The keys are views of fp32 scores (no copy: a 1B-weight model's scores are 4 GiB already); only a
    layer holding -0.0 (sign bit set) is copied once to turn it into +0.0.
    """
    keys = {}
    for name, s in scores.items():
        s32 = s.detach().float().flatten()
        if not bool(torch.isfinite(s32).all()):
            raise MaskBuildError(f"layer {name}: score has inf/NaN")
        if bool((s32 < 0).any()):
            raise MaskBuildError(f"layer {name}: scores must be >= 0")
        k = s32.view(torch.int32)
        if bool((k < 0).any()):  # -0.0
            k = (s32 + 0.0).view(torch.int32)
        keys[name] = k
    return keys


def random_keys(shapes: Mapping[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    """Uniform int64 keys from `shared.prng`: key of flat position j of the concatenation = u_j >> 1."""
    keys: dict[str, torch.Tensor] = {}
    offset = 0
    for name in sorted(shapes):
        n = math.prod(shapes[name])
        u = prng.raw_u64(seed, n, offset=offset) >> 1  # numpy uint64 -> fits int64
        keys[name] = torch.from_numpy(u.astype("int64"))
        offset += n
    return keys


def _kth_largest_key(keys: Mapping[str, torch.Tensor], k: int) -> int:
    """The k-th largest key over all layers (bisection on the key value; exact, memory O(1) extra)."""
    lo = min(int(t.min()) for t in keys.values() if t.numel())
    hi = max(int(t.max()) for t in keys.values() if t.numel())
    while lo < hi:  # invariant: count(key >= lo) >= k, count(key >= hi + 1) < k
        mid = (lo + hi + 1) // 2
        if sum(int((t >= mid).sum()) for t in keys.values()) >= k:
            lo = mid
        else:
            hi = mid - 1
    return lo


def select_top_k(keys: Mapping[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """Exactly k positions with the largest keys, as sorted int64 flat indices per layer.

    Ties at the threshold go to the lowest (layer name, flat index) first, so the result is a pure
    function of the keys. Layers with no selected position are left out.
    """
    total = sum(t.numel() for t in keys.values())
    if not 1 <= k <= total:
        raise MaskBuildError(f"k must be in [1, {total}], got {k}")
    thr = _kth_largest_key(keys, k)
    ties_left = k - sum(int((t > thr).sum()) for t in keys.values())
    out: dict[str, torch.Tensor] = {}
    for name in sorted(keys):
        t = keys[name].flatten()
        above = torch.nonzero(t > thr).flatten()
        ties = torch.nonzero(t == thr).flatten()[: max(ties_left, 0)]
        ties_left -= ties.numel()
        idx = torch.sort(torch.cat([above, ties])).values.to(torch.int64)
        if idx.numel():
            out[name] = idx
    return out


def top_values(scores: Mapping[str, torch.Tensor], m: int) -> torch.Tensor:
    """The m largest scores over all layers, float64, sorted descending."""
    keys = float_keys(scores)
    thr = _kth_largest_key(keys, m)
    parts = [s.detach().flatten()[keys[n] > thr].double() for n, s in scores.items()]
    above = torch.cat(parts)
    thr_value = torch.tensor([thr], dtype=torch.int32).view(torch.float32).double()
    vals = torch.cat([above, thr_value.expand(m - above.numel())])
    return torch.sort(vals, descending=True).values


def k_for(fraction: float, total: int) -> int:
    """Number of masked weights for a fraction of `total` (rounded, at least 1)."""
    if not (0.0 < fraction <= 1.0) or math.isnan(fraction):
        raise MaskBuildError(f"fraction must be in (0, 1], got {fraction}")
    return max(1, min(total, round(fraction * total)))


def concentration(sq: Mapping[str, torch.Tensor], fraction: float) -> dict[str, Any]:
    """Mean g^2 of the top fraction vs the next tier of equal size and vs the f..10f band.

    The band is clipped to the number of weights; a ratio whose comparison tier is empty or all zero
    is None (JSON has no infinity).
    """
    total = sum(t.numel() for t in sq.values())
    k = k_for(fraction, total)
    m = min(total, BAND_FACTOR * k)
    vals = top_values(sq, m)
    overall = sum(float(t.double().sum()) for t in sq.values()) / total
    top = float(vals[:k].mean())
    nxt = vals[k : 2 * k]
    band = vals[k:m]

    def ratio(tier: torch.Tensor) -> float | None:
        if tier.numel() == 0:
            return None
        mean = float(tier.mean())
        return top / mean if mean > 0 else None

    return {
        "fraction": fraction,
        "k": k,
        "n_weights": total,
        "top_mean_sq": top,
        "next_tier_mean_sq": float(nxt.mean()) if nxt.numel() else None,
        "ratio_next_tier": ratio(nxt),
        "band": [fraction, fraction * m / k],
        "band_mean_sq": float(band.mean()) if band.numel() else None,
        "ratio_band": ratio(band),
        "overall_mean_sq": overall,
        "top_mass_share": float(vals[:k].sum()) / (overall * total) if overall > 0 else None,
    }


def mask_sq_stats(indices: Mapping[str, torch.Tensor], sq: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Mean g^2 at a mask's positions and the share of all g^2 mass the mask holds."""
    missing = sorted(set(indices) - set(sq))
    if missing:
        raise MaskBuildError(f"mask layers not in the model: {', '.join(missing[:5])}")
    at = sum(float(sq[n].flatten()[idx].double().sum()) for n, idx in indices.items())
    nnz = sum(idx.numel() for idx in indices.values())
    mass = sum(float(t.double().sum()) for t in sq.values())
    return {"mask_mean_sq": at / max(nnz, 1), "mask_mass_share": at / mass if mass > 0 else 0.0}


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
    include_embeddings: bool = False,
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
    weights = eligible_weights(model, include_embeddings)
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


# ---------------------------------------------------------------- model loading and the file


def pick_device(device: str) -> torch.device:
    """'auto' -> cuda when available, else cpu; anything else must be a valid torch device string."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise MaskBuildError(f"--device {device!r} is not a torch device") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise MaskBuildError(f"--device {device}: CUDA is not available on this machine")
    return dev


def load_for_mask(
    model_dir: str | Path,
    *,
    device: str = "auto",
    dtype: str = "float32",
    checkpointing: bool = False,
    tokenizer_dir: str | Path | None = None,
) -> tuple[nn.Module, Any]:
    """The full-precision model (no quantization: the mask needs true gradients) and its tokenizer.

    `checkpointing` turns on HF activation checkpointing (see `accumulate_gradients` for the mode).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = Path(model_dir)
    if not (root / "config.json").is_file():
        raise MaskBuildError(f"--model {root}: no config.json (expected a Hugging Face model directory)")
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16}
    if dtype not in dtypes:
        raise MaskBuildError(f"--dtype must be one of {', '.join(dtypes)}, got {dtype!r}")
    dev = pick_device(device)
    if dev.type == "cpu" and dtype != "float32":
        log.warning("bfloat16 backprop on CPU is slow and coarse; float32 is recommended")
    tok_root = Path(tokenizer_dir) if tokenizer_dir is not None else root
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(tok_root))
    except (OSError, ValueError) as exc:
        raise MaskBuildError(f"cannot load a tokenizer from {tok_root} (use --tokenizer DIR): {exc}") from exc
    model: Any = AutoModelForCausalLM.from_pretrained(str(root), dtype=dtypes[dtype])  # a PreTrainedModel
    model.to(dev)
    model.config.use_cache = False  # no KV cache during backprop
    model.eval()  # no dropout: the gradient of the model as it is
    if checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5 name
        if callable(enable):
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if not any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules()):
            raise MaskBuildError(f"{type(model).__name__} does not support gradient checkpointing")
    return model, tokenizer


def tokenizer_encoder(tokenizer: Any) -> tuple[Callable[[str], list[int]], int | None]:
    """(text -> ids without special tokens, eos id or None) for a transformers tokenizer."""

    def encode(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    eos = getattr(tokenizer, "eos_token_id", None)
    return encode, int(eos) if eos is not None else None


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
