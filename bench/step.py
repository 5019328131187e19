"""`meerkat bench step`: cost of one masked SPSA step vs one inference forward, in one run.

    meerkat bench step [--quant nf4|int8|none] [--layers 6 --hidden 384 --batch 8 --seq 128]
                       [--device cpu|cuda] [--preset NAME | --model DIR] [--loss lm|label] --json

Builds a random-init Llama of the given shape in a temp dir (speed does not depend on the weights),
or a preset with the published config values of qwen2.5-0.5b, llama-3.2-1b, llama-3.2-3b,
gemma-2-2b or phi-3-mini (random bf16 weights, built locally), or times a local HF causal-LM directory
(`--model DIR`, safetensors). A random mask of `--mask-fraction` of every 2-D decoder weight (from
shared.prng), and it measures:
- plain_fwd: the quantized model without side-car (bitsandbytes' own forward);
- sidecar_fwd: the deployed side-car model's forward (what inference costs on the device);
- step: one spsa_step (2 forwards + losses + exact restore + update) on the same batch;
- peaks: peak memory of an inference forward and of a step and their ratio (`peak_ratio`). CUDA:
  torch's peak allocated bytes. CPU: weights + side-car + the peak of live torch tensors during the
  call (profiler memory events: what the model needs, independent of the allocator); the RSS view is
  reported too (`*_rss_*`: peak private RSS, i.e. without file-backed pages, above the process's
  once the libraries are imported: the planner's MemoryMeter; glibc's retained heap makes it noisier).
  `mapped_weights_mib`: model tensors that are views of the mmapped checkpoint (file-backed pages, not
  in the private RSS; a bf16 embedding table when the checkpoint is bf16);
- planner_need_mib / planner_error: the memory planner's need at `--batch` (edge_client/engine/
  planner.py, its safety factor included) against the measured step need on the same basis
  (`step_need_mib`: CPU step_rss_peak_mib + mapped_weights_mib - load_overhead_mib, the private
  memory load_model leaves beyond the model's tensors: libraries' state, not the model; CUDA the
  allocated peak);
  `--no-plan` skips its two calibration forwards.
`--loss lm`: loss over every position, inference computes every logit. `--loss label`: one target
token per sequence (classification), inference computes the last position's logits only.
Times are medians over `--repeats` interleaved rounds; ratios are medians of per-round ratios.
The JSON line is printed last.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

# published config values of the models users bring (random weights: speed and memory do not depend
# on them); "llama-3.2-1b" is also what the GPU numbers in BENCHMARKS.md use
PRESETS: dict[str, dict[str, Any]] = {
    "qwen2.5-0.5b": dict(
        model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True,
        rope_theta=1000000.0, rms_norm_eps=1e-6, max_position_embeddings=32768,
    ),
    "llama-3.2-1b": dict(
        model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True,
        rope_theta=500000.0, rms_norm_eps=1e-5, max_position_embeddings=131072,
        rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=8192),
    ),
    "llama-3.2-3b": dict(
        model_type="llama", hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
        num_attention_heads=24, num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=True,
        rope_theta=500000.0, rms_norm_eps=1e-5, max_position_embeddings=131072,
        rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=8192),
    ),
    "gemma-2-2b": dict(
        model_type="gemma2", hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
        num_attention_heads=8, num_key_value_heads=4, head_dim=256, vocab_size=256000, tie_word_embeddings=True,
        hidden_activation="gelu_pytorch_tanh", final_logit_softcapping=30.0, attn_logit_softcapping=50.0,
        query_pre_attn_scalar=256, sliding_window=4096, max_position_embeddings=8192,
    ),
    "phi-3-mini": dict(
        model_type="phi3", hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, vocab_size=32064, tie_word_embeddings=False,
        rope_theta=10000.0, max_position_embeddings=4096, sliding_window=2047,
    ),
}
# names of 2-D weights that are not decoder Linear layers (what the random mask leaves out)
_NOT_LINEAR = ("embed", "lm_head", "wte", "wpe", "norm", "ln_")


def add_parser(sub: Any) -> None:
    p = sub.add_parser("step", help="ZO step time / inference forward time and peak memory ratio")
    p.add_argument("--quant", choices=("nf4", "int8", "none"), default="nf4")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None, help="a named model shape (overrides sizes)")
    p.add_argument("--model", default=None, metavar="DIR", help="time this local HF causal-LM directory instead")
    p.add_argument("--no-plan", action="store_true", help="skip the memory planner's prediction (2 more forwards)")
    p.add_argument("--sidecar-mode", choices=("default", "auto", "correct", "tile"), default="default",
                   help="how quantized layers apply the side-car (default: shared.sidecar.default_sidecar_mode)")
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--hidden", type=int, default=384)
    p.add_argument("--intermediate", type=int, default=None, help="MLP width (default 4 x hidden)")
    p.add_argument("--heads", type=int, default=None, help="attention heads (default hidden / 64)")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto")
    p.add_argument("--loss", choices=("lm", "label"), default="lm")
    p.add_argument("--mask-fraction", type=float, default=1e-3)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON line, last")
    p.set_defaults(func=run)


def model_config(args: argparse.Namespace) -> dict[str, Any]:
    """transformers config values of the model to build (a preset, or a Llama from the size flags)."""
    if args.preset:
        return dict(PRESETS[args.preset])
    heads = args.heads or max(1, args.hidden // 64)
    return dict(
        model_type="llama",
        hidden_size=args.hidden,
        intermediate_size=args.intermediate or 4 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 4) if heads % 4 == 0 else heads,
        vocab_size=args.vocab,
        tie_word_embeddings=False,
        max_position_embeddings=4096,
    )


def build_model_dir(cfg: dict[str, Any], path: Path) -> None:
    """Random-init model saved as bf16 safetensors (global-RNG init is fine: only speed is measured)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    values = dict(cfg)
    config = AutoConfig.for_model(values.pop("model_type"), **values)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)  # type: ignore[no-untyped-call]
    model.save_pretrained(str(path))
    del model
    gc.collect()


def _summary(cfg: dict[str, Any]) -> dict[str, Any]:
    """The shape fields of the JSON result (model_type, layers, hidden, ...)."""
    keys = dict(
        model_type="type", num_hidden_layers="layers", hidden_size="hidden", intermediate_size="intermediate",
        num_attention_heads="heads", num_key_value_heads="kv_heads", vocab_size="vocab", tie_word_embeddings="tie",
    )
    return {f"model_{short}": cfg.get(key) for key, short in keys.items()}


def random_mask(model_dir: Path, fraction: float, seed: int = 1234) -> dict[str, torch.Tensor]:
    """Top-`fraction` of each decoder Linear by a shared.prng key: sorted int64 flat indices per layer."""
    from safetensors import safe_open

    from shared.prng import derive_seed, raw_u64
    from shared.sidecar import checkpoint_files

    mask: dict[str, torch.Tensor] = {}
    files = checkpoint_files(model_dir)
    i = 0
    for key in sorted(files):
        with safe_open(str(files[key]), framework="pt") as f:
            shape = f.get_slice(key).get_shape()
        if len(shape) != 2 or not key.endswith(".weight") or any(s in key for s in _NOT_LINEAR):
            continue
        n = int(np.prod(shape))
        k = max(1, int(n * fraction))
        keys = raw_u64(derive_seed(seed, i), n)
        i += 1
        idx = np.sort(np.argpartition(keys, k)[:k])
        mask[key[: -len(".weight")]] = torch.from_numpy(idx.astype(np.int64))
    return mask


def timed_rounds(
    fns: dict[str, Callable[[], Any]], repeats: int, sync: Callable[[], None]
) -> dict[str, tuple[list[float], list[float]]]:
    """Wall and process-CPU seconds of each fn, interleaved round by round (after one warm-up each).

    Interleaving makes the ratios robust to a load that drifts during the run; CPU time is what to
    compare on a shared, loaded CPU (it does not count time spent waiting for a core).
    """
    for fn in fns.values():
        fn()  # warm-up (also triggers lazy packing/caching inside kernels)
    out: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync()
            w, c = time.perf_counter(), time.process_time()
            fn()
            sync()
            out[name][0].append(time.perf_counter() - w)
            out[name][1].append(time.process_time() - c)
    return out


def _ratio(num: list[float], den: list[float]) -> float:
    """Median over rounds of num/den (each round measured back to back)."""
    return round(statistics.median(a / b for a, b in zip(num, den, strict=True)), 3)


def run(args: argparse.Namespace) -> int:
    from bench.cli import print_json_last
    from edge_client.engine.planner import MemoryMeter, plan_memory, step_sidecar_bytes
    from edge_client.engine.spsa import spsa_step
    from shared.dataset import Batch, Dataset, Example
    from shared.loss import batch_loss, collate, tail_logits
    from shared.modelload import load_model, weight_bytes

    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    cfg = model_config(args)
    import bitsandbytes  # noqa: F401  (libraries resident before the baseline: peaks count model memory only)
    import transformers  # noqa: F401

    meter = MemoryMeter(dev)
    meter.reset()
    base = meter.current()
    with tempfile.TemporaryDirectory(prefix="meerkat-bench-step-") as tmp:
        if args.model:
            model_dir = Path(args.model)
            cfg = json.loads((model_dir / "config.json").read_text())
        else:
            model_dir = Path(tmp)
            t0 = time.perf_counter()
            build_model_dir(cfg, model_dir)
            log.info("built model %s in %.1fs", cfg, time.perf_counter() - t0)
        mask = random_mask(model_dir, args.mask_fraction)
        fingerprint = "0" * 64  # not needed for timing: skips hashing a large checkpoint
        ids = [tuple(int(x) for x in raw) for raw in _tokens(args.batch, args.seq, int(cfg["vocab_size"]))]
        n_target = args.seq - 1 if args.loss == "lm" else 1
        examples = [Example(t, n_target) for t in ids]
        batch = Batch(examples, Dataset(examples, pad_id=0))
        keep = args.seq if args.loss == "lm" else 1
        inputs = collate(examples, 0, dev)

        def peak_of(fn: Callable[[], Any]) -> int:
            meter.reset()
            fn()
            sync()
            return meter.peak() - base

        def live_of(fn: Callable[[], Any]) -> int:
            """CUDA: allocated peak (weights included). CPU: weights + peak of torch tensors live during fn."""
            if dev.type == "cuda":
                return peak_of(fn)
            return weight_bytes(model) + side_bytes + cpu_live_peak(fn)

        result: dict[str, Any] = {"bench": "step", "quant": args.quant, "device": _device_name(dev), "loss": args.loss}
        result.update(_summary(cfg), batch=args.batch, seq=args.seq, preset=args.preset, model=args.model)

        loaded = load_model(model_dir, args.quant, dev, mask, dtype, fingerprint=fingerprint)
        model, sidecar = loaded.model, loaded.sidecar
        if sidecar is None:
            raise RuntimeError("side-car model loaded without a side-car")
        if args.sidecar_mode != "default":
            from shared.sidecar import sidecar_layers

            for _, layer in sidecar_layers(model):
                layer.mode = args.sidecar_mode
        side_bytes = sidecar.nbytes()
        gc.collect()
        meter.reset()
        resident = meter.current() - base  # the loaded side-car model: weights + side-car
        seeds = iter(range(1, 10_000))

        def step_fn() -> Any:
            return spsa_step(model, sidecar, lambda m: batch_loss(m, batch), next(seeds), 1e-3, 1e-6)

        def fwd_fn() -> Any:
            return tail_logits(model, inputs, keep)

        with torch.no_grad():
            fwd_fn()
            fwd_peak = peak_of(fwd_fn)
            step_fn()
            step_peak = peak_of(step_fn)
            fwd_live = live_of(fwd_fn)
            step_live = live_of(step_fn)
            plan = None if args.no_plan else plan_memory(model, 1e6, args.seq, dev, sidecar=sidecar)
            # the plain quantized model (bitsandbytes' own Linear forward) joins only for timing
            plain = load_model(model_dir, args.quant, dev, None, dtype, fingerprint=fingerprint).model
            t = timed_rounds(
                {"plain": lambda: tail_logits(plain, inputs, keep), "fwd": fwd_fn, "step": step_fn}, args.repeats, sync
            )
        (pw, pc), (fw, fc), (sw, scpu) = t["plain"], t["fwd"], t["step"]
        med = statistics.median
        result.update(
            compute_dtype=str(loaded.compute_dtype).replace("torch.", ""),
            nnz=sidecar.nnz,
            repeats=args.repeats,
            plain_fwd_ms=round(med(pw) * 1e3, 2),
            sidecar_fwd_ms=round(med(fw) * 1e3, 2),
            step_ms=round(med(sw) * 1e3, 2),
            step_over_sidecar_fwd=_ratio(sw, fw),
            step_over_plain_fwd=_ratio(sw, pw),
            sidecar_fwd_over_plain=_ratio(fw, pw),
            infer_rss_peak_mib=round(fwd_peak / 2**20, 1),
            step_rss_peak_mib=round(step_peak / 2**20, 1),
            peak_ratio=round(step_live / fwd_live, 4),
            infer_live_mib=round(fwd_live / 2**20, 1),
            step_live_mib=round(step_live / 2**20, 1),
            rss_peak_ratio=round(step_peak / fwd_peak, 4),
            resident_mib=round(resident / 2**20, 1),
            threads=torch.get_num_threads(),
            sidecar_mode=_modes(model),
            params=sum(int(np.prod(s)) for s in _checkpoint_shapes(model_dir)),
        )
        mapped = overhead = 0
        if dev.type == "cpu":
            # the step's need on the planner's basis: private RSS above the libraries', plus the weights
            # that stay file-backed (the planner counts them in `weights`), less what load_model leaves
            # that is no tensor (the model family's modules, kernels' state: ~42 MiB for a 1 MiB model)
            mapped = file_backed_bytes(model)
            at_rest = weight_bytes(model) - mapped + step_sidecar_bytes(sidecar, model) - 8 * sidecar.nnz
            at_rest += sum(t.numel() * t.element_size() for t in mask.values())  # this bench's own mask
            overhead = max(0, resident - at_rest)
        measured = step_peak + mapped - overhead  # CUDA: allocated bytes
        result.update(mapped_weights_mib=round(mapped / 2**20, 1), load_overhead_mib=round(overhead / 2**20, 1),
                      step_need_mib=round(measured / 2**20, 1))  # fmt: skip
        if plan is not None:
            # the planner's need at this batch (safety factor included) vs the measured step need
            result.update(
                planner_need_mib=round(plan.need_bytes(args.batch) / 2**20, 1),
                planner_weights_mib=round(plan.weights_bytes / 2**20, 1),
                planner_sidecar_mib=round(plan.sidecar_bytes / 2**20, 2),
                planner_fixed_mib=round(plan.fixed_bytes / 2**20, 1),
                planner_per_seq_mib=round(plan.per_seq_bytes / 2**20, 2),
                planner_error=round(plan.need_bytes(args.batch) / measured - 1, 4),
            )
        if dev.type == "cpu":
            result.update(
                plain_fwd_cpu_ms=round(med(pc) * 1e3, 2),
                sidecar_fwd_cpu_ms=round(med(fc) * 1e3, 2),
                step_cpu_ms=round(med(scpu) * 1e3, 2),
                cpu_step_over_plain_fwd=_ratio(scpu, pc),
                cpu_step_over_sidecar_fwd=_ratio(scpu, fc),
                load_avg_1m=round(os.getloadavg()[0], 2),
            )
    cpu_note = ""
    if "step_cpu_ms" in result:
        cpu_note = (
            f"; CPU time: step {result['cpu_step_over_plain_fwd']}x plain / "
            f"{result['cpu_step_over_sidecar_fwd']}x side-car fwd (load avg {result['load_avg_1m']})"
        )
    print(
        f"{args.quant} on {result['device']}: plain fwd {result['plain_fwd_ms']} ms, side-car fwd "
        f"{result['sidecar_fwd_ms']} ms, step {result['step_ms']} ms = {result['step_over_plain_fwd']}x plain "
        f"/ {result['step_over_sidecar_fwd']}x side-car fwd; peak {result['step_live_mib']} MiB vs "
        f"{result['infer_live_mib']} MiB ({result['peak_ratio']}x; RSS {result['rss_peak_ratio']}x){cpu_note}"
    )
    if args.json:
        print_json_last(result)
    return 0


def _modes(model: torch.nn.Module) -> str:
    """The side-car mode(s) of the quantized wrapped layers ("none" for an unquantized model)."""
    from shared.sidecar import sidecar_layers

    modes = sorted({layer.mode for _, layer in sidecar_layers(model) if layer.is_quantized})
    return ",".join(modes) or "none"


def _checkpoint_shapes(model_dir: Path) -> list[list[int]]:
    from safetensors import safe_open

    from shared.sidecar import checkpoint_files

    shapes = []
    for key, path in sorted(checkpoint_files(model_dir).items()):
        with safe_open(str(path), framework="pt") as f:
            shapes.append(list(f.get_slice(key).get_shape()))
    return shapes


def file_backed_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters and buffers whose storage lies in a file mapping (/proc/self/maps).

    from_pretrained keeps a tensor the checkpoint already holds in the wanted dtype as a view of the
    mmapped safetensors file: its pages are file-backed, so the private RSS does not count them.
    """
    spans = []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and parts[5].startswith("/"):
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                spans.append((lo, hi))
    seen: set[int] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if t.device.type == "cpu" and ptr not in seen and any(lo <= ptr < hi for lo, hi in spans):
            seen.add(ptr)
            total += storage.nbytes()
    return total


def cpu_live_peak(fn: Callable[[], Any]) -> int:
    """Peak bytes of CPU tensors allocated (and not yet freed) during fn, from the profiler's memory events.

    Allocator-independent, unlike RSS (glibc keeps freed heap around, which inflates RSS peaks by
    whatever fragmentation the call pattern causes). Temporaries freed inside one op are netted out.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    deltas = []
    for e in prof.events():
        delta = e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage
        if delta:
            deltas.append((e.time_range.start, delta))
    live = peak = 0
    for _, delta in sorted(deltas, key=lambda td: td[0]):
        live += delta
        peak = max(peak, live)
    return peak


def _tokens(batch: int, seq: int, vocab: int) -> np.ndarray:
    from shared.prng import raw_u64

    return (raw_u64(7, batch * seq) % np.uint64(vocab)).astype(np.int64).reshape(batch, seq)


def _device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"cpu ({torch.get_num_threads()} threads)"


__all__ = ["add_parser", "run"]
