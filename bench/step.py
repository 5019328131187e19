"""`meerkat bench step`: cost of one masked SPSA step vs one inference forward, in one run.

    meerkat bench step [--quant nf4|int8|none] [--layers 6 --hidden 384 --batch 8 --seq 128]
                       [--device cpu|cuda] [--preset llama-3.2-1b] [--loss lm|label] --json

Builds a random-init Llama of the given shape in a temp dir (speed does not depend on the weights),
a random mask of `--mask-fraction` of every decoder Linear (from shared.prng), and measures:
- plain_fwd: the quantized model without side-car (bitsandbytes' own forward);
- sidecar_fwd: the deployed side-car model's forward (what inference costs on the device);
- step: one spsa_step (2 forwards + losses + exact restore + update) on the same batch;
- peaks: peak memory of an inference forward and of a step and their ratio (`peak_ratio`). CUDA:
  torch's peak allocated bytes. CPU: weights + side-car + the peak of live torch tensors during the
  call (profiler memory events: what the model needs, independent of the allocator); the RSS view is
  reported too (`*_rss_*`: peak RSS above the process's RSS once the libraries are imported; glibc's
  retained heap makes it noisier).
`--loss lm`: loss over every position, inference computes every logit. `--loss label`: one target
token per sequence (classification), inference computes the last position's logits only.
Times are medians over `--repeats` interleaved rounds; ratios are medians of per-round ratios.
The JSON line is printed last.
"""

from __future__ import annotations

import argparse
import gc
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

PRESETS: dict[str, dict[str, Any]] = {
    # Llama-3.2-1B shape (random init): what the GPU numbers in BENCHMARKS.md use
    "llama-3.2-1b": dict(
        layers=16, hidden=2048, intermediate=8192, heads=32, kv_heads=8, vocab=128256, tie=True
    ),
}


def add_parser(sub: Any) -> None:
    p = sub.add_parser("step", help="ZO step time / inference forward time and peak memory ratio")
    p.add_argument("--quant", choices=("nf4", "int8", "none"), default="nf4")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None, help="a named model shape (overrides sizes)")
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
    if args.preset:
        return dict(PRESETS[args.preset])
    heads = args.heads or max(1, args.hidden // 64)
    return dict(
        layers=args.layers,
        hidden=args.hidden,
        intermediate=args.intermediate or 4 * args.hidden,
        heads=heads,
        kv_heads=max(1, heads // 4) if heads % 4 == 0 else heads,
        vocab=args.vocab,
        tie=False,
    )


def build_model_dir(cfg: dict[str, Any], path: Path) -> None:
    """Random-init Llama saved as bf16 safetensors (global-RNG init is fine: only speed is measured)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=cfg["hidden"],
        intermediate_size=cfg["intermediate"],
        num_hidden_layers=cfg["layers"],
        num_attention_heads=cfg["heads"],
        num_key_value_heads=cfg["kv_heads"],
        vocab_size=cfg["vocab"],
        tie_word_embeddings=cfg["tie"],
        max_position_embeddings=4096,
    )
    with torch.device("cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)  # type: ignore[arg-type]
    model.save_pretrained(str(path))
    del model
    gc.collect()


def random_mask(model_dir: Path, fraction: float, seed: int = 1234) -> dict[str, torch.Tensor]:
    """Top-`fraction` of each decoder Linear by a shared.prng key: sorted int64 flat indices per layer."""
    from safetensors import safe_open

    from shared.prng import derive_seed, raw_u64
    from shared.sidecar import checkpoint_files

    mask: dict[str, torch.Tensor] = {}
    files = checkpoint_files(model_dir)
    for i, key in enumerate(sorted(k for k in files if ".layers." in k and k.endswith("proj.weight"))):
        with safe_open(str(files[key]), framework="pt") as f:
            n = int(np.prod(f.get_slice(key).get_shape()))
        k = max(1, int(n * fraction))
        keys = raw_u64(derive_seed(seed, i), n)
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
    from edge_client.engine.planner import MemoryMeter
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
        model_dir = Path(tmp)
        t0 = time.perf_counter()
        build_model_dir(cfg, model_dir)
        mask = random_mask(model_dir, args.mask_fraction)
        log.info("built model %s in %.1fs", cfg, time.perf_counter() - t0)
        fingerprint = "0" * 64  # not needed for timing: skips hashing a large checkpoint
        ids = [tuple(int(x) for x in raw) for raw in _tokens(args.batch, args.seq, cfg["vocab"])]
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
        result.update({f"model_{k}": v for k, v in cfg.items()}, batch=args.batch, seq=args.seq)

        loaded = load_model(model_dir, args.quant, dev, mask, dtype, fingerprint=fingerprint)
        model, sidecar = loaded.model, loaded.sidecar
        if sidecar is None:
            raise RuntimeError("side-car model loaded without a side-car")
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
