"""MEERKAT mask builder: pick the ~0.1% of weights that carry fine-tuning, once, on a server.

Pipeline (each step a short function, testable on its own):
    read_calibration(files)          -> documents per file + sha256          (coordinator/mask/calibtext.py)
    pack_sequences(tokenizer, ...)   -> (n_seqs, seq_len) int64 token ids     (round-robin over files)
    eligible_weights(model)          -> {module name: weight}                 (decoder Linear weights)
    accumulate_gradients(...)        -> GradStats: mean g and mean g^2 per weight, fp32
    select_top_k(keys, k)            -> {layer: sorted flat indices}          (coordinator/mask/select.py)
    mean_grad_at(...)                -> mean g at the mask only               (the second of two passes)
    concentration(sq, fraction)      -> top-k mean g^2 vs the next tier / the f..10f band

Scores: pretrain-grad = mean squared per-sequence gradient of the LM loss; weight-magnitude = |w|;
random = a uniform key from `shared.prng` (no global RNG). Ties are broken by (layer name, flat index)
ascending, so the same inputs give the same mask bit for bit.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from coordinator.mask.calibtext import CalibFile, Packed, pack_sequences, read_calibration
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

log = logging.getLogger(__name__)

Method = Literal["pretrain-grad", "weight-magnitude", "random"]
METHODS: tuple[str, ...] = ("pretrain-grad", "weight-magnitude", "random")


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
    ids: torch.Tensor | None = None  # the (n_seqs, seq_len) token ids they came from (a second pass reruns them)


def accumulate_gradients(
    model: nn.Module,
    weights: Mapping[str, torch.Tensor],
    ids: torch.Tensor,
    *,
    progress: bool = True,
    keep_mean: bool = True,
) -> GradStats:
    """Backprop the LM loss of each sequence alone; add g and g^2 into per-layer buffers as each arrives.

    One sequence at a time keeps activation memory at batch 1; the squared gradient is per sequence
    (a batch would square an average and shrink the signal). Only the eligible weights keep
    requires_grad. A post-accumulate hook on each weight adds its gradient into the buffers the moment
    backprop has finished it and frees it, so at most one layer's gradient is alive, never a full
    gradient copy of the model. g^2 is summed in fp32 (the ranking needs it); g in the weight's own
    dtype (fp32 for an fp32 model; a bf16 model's mean gradient, used only at the mask by GradIP, is
    summed in bf16 to keep the peak near 6 bytes per eligible parameter + the bf16 weights).
    `keep_mean=False` sums g^2 only (`mean` comes back empty): the first of two passes, where
    `mean_grad_at` gives the mean gradient at the mask once it is known (4 bytes per parameter).
    """
    if ids.dim() != 2 or ids.shape[0] < 1:
        raise MaskBuildError(f"expected token ids of shape (n_seqs, seq_len), got {tuple(ids.shape)}")
    device = next(iter(weights.values())).device
    total = {n: torch.zeros(w.shape, dtype=w.dtype, device=device) for n, w in weights.items()} if keep_mean else {}
    total_sq = {n: torch.zeros(w.shape, dtype=torch.float32, device=device) for n, w in weights.items()}

    def add(name: str, g: torch.Tensor) -> None:
        g32 = g.float()  # the same tensor for an fp32 weight
        if keep_mean:
            total[name].add_(g)
        total_sq[name].addcmul_(g32, g32)

    loss = _backprop(model, weights, ids, add, "mask: backprop", progress)
    n = ids.shape[0]
    for name in weights:
        if keep_mean:
            total[name].div_(n)
        total_sq[name].div_(n)
        if not bool(torch.isfinite(total_sq[name]).all()):
            raise MaskBuildError(f"layer {name}: gradient overflowed (inf/NaN); try --dtype float32")
    return GradStats(total, total_sq, n, loss)


def mean_grad_at(
    model: nn.Module,
    weights: Mapping[str, torch.Tensor],
    ids: torch.Tensor,
    indices: Mapping[str, torch.Tensor],
    *,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """The second pass: fp32 mean gradient at the mask's flat `indices` only, over the same sequences.

    For an fp32 model the values are bit for bit those of one pass (the same additions in the same
    order); a bf16 model's are summed in fp32 here, not bf16, so they are the more exact ones.
    """
    device = next(iter(weights.values())).device
    at = {n: idx.to(device) for n, idx in indices.items()}
    total = {n: torch.zeros(idx.numel(), dtype=torch.float32, device=device) for n, idx in at.items()}

    def add(name: str, g: torch.Tensor) -> None:
        if name in at:
            total[name].add_(g.flatten()[at[name]].float())

    _backprop(model, {n: w for n, w in weights.items() if n in at}, ids, add, "mask: gradient at the mask", progress)
    return {n: (t / ids.shape[0]).cpu().contiguous() for n, t in total.items()}


def _backprop(
    model: nn.Module,
    weights: Mapping[str, torch.Tensor],
    ids: torch.Tensor,
    add: Callable[[str, torch.Tensor], None],
    desc: str,
    progress: bool,
) -> float:
    """Backprop each sequence alone, hand every eligible weight's gradient to `add` the moment it is
    complete and free it; returns the mean loss."""
    from tqdm import tqdm

    wanted = {id(w) for w in weights.values()}
    for p in model.parameters():
        p.requires_grad_(id(p) in wanted)
    arrived: set[str] = set()

    def make_hook(name: str) -> Callable[[torch.Tensor], None]:
        def hook(w: torch.Tensor) -> None:
            assert w.grad is not None  # the hook runs after accumulation
            add(name, w.grad)
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
    device = next(iter(weights.values())).device
    started = time.perf_counter()
    try:
        for i, row in enumerate(tqdm(ids, desc=desc, unit="seq", disable=None if progress else True)):
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
            _log_progress(desc, i + 1, n, time.perf_counter() - started)
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
    return loss_sum / n


def passes_for(weights: Mapping[str, torch.Tensor], available_bytes: int) -> int:
    """`--passes auto`: 1 while the one-pass buffers (fp32 g^2 + g in the weight's dtype) take at most
    80 % of the memory still available with the model loaded, else 2 (g^2 only, then g at the mask)."""
    one_pass = sum(w.numel() * (4 + w.element_size()) for w in weights.values())
    return 1 if one_pass <= 0.8 * available_bytes else 2


def _log_progress(desc: str, done: int, total: int, elapsed: float) -> None:
    """A log line with the rate and the ETA (also when stderr is not a terminal and tqdm stays quiet)."""
    every = max(1, total // 10)
    if done % every and done != total:
        return
    per = elapsed / done
    log.info("%s: %d/%d sequences, %.1f s/seq, ETA %.0f s", desc, done, total, per, per * (total - done))


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
    keep_mean: bool = True,
) -> tuple[GradStats, dict[str, Any]]:
    """Pack the calibration text, backprop it, and describe what was used (for the mask's metadata)."""
    packed = pack_sequences(encode, calib, seqs, seq_len, eos_id)
    log.info(
        "calibration: %d sequences x %d tokens from %d file(s)", packed.ids.shape[0], seq_len, len(calib)
    )
    stats = accumulate_gradients(model, weights, packed.ids, progress=progress, keep_mean=keep_mean)
    stats.ids = packed.ids
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
    passes: int = 1,
) -> BuildResult:
    """Score every eligible weight by `method`, keep the global top `fraction`, attach the mean gradient.

    Calibration text is required for pretrain-grad; for the baselines it is optional and, when given,
    only supplies the mean gradient at the mask (GradIP needs it) and the concentration numbers.
    `passes=2` backprops the calibration twice: g^2 only, then (g^2 freed) g at the mask only: the same
    mask bits with no full-size g buffer (2 bytes per eligible bf16 parameter less), twice the backprop.
    """
    if passes not in (1, 2):
        raise MaskBuildError(f"passes must be 1 or 2, got {passes}")
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
            model, encode, eos_id, calib, weights, seqs=seqs, seq_len=seq_len, progress=progress,
            keep_mean=passes == 1,
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
        stats = {"concentration": concentration(grads.sq, fraction), **mask_sq_stats(indices, grads.sq)}
        if passes == 1:
            grad_at = {n: grads.mean[n].flatten()[idx].float().cpu().contiguous() for n, idx in indices.items()}
        else:
            assert grads.ids is not None
            ids, grads = grads.ids, None  # g^2 freed before the second pass
            grad_at = mean_grad_at(model, weights, ids, indices, progress=progress)
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
    "mean_grad_at",
    "pack_sequences",
    "parse_description",
    "passes_for",
    "pick_device",
    "random_keys",
    "read_calibration",
    "select_top_k",
    "to_mask",
    "tokenizer_encoder",
    "top_values",
]
