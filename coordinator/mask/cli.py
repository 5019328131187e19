"""`meerkat mask build` and `meerkat mask report`: thin argument handling around the builder and report."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from coordinator.mask.builder import METHODS, MaskBuildError

log = logging.getLogger(__name__)


def _add_model_args(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument(
        "--model", required=required, help="Hugging Face causal-LM directory (full precision is loaded)"
    )
    p.add_argument("--tokenizer", default=None, help="tokenizer directory when it is not the model directory")
    p.add_argument(
        "--calib", nargs="+", default=[], metavar="FILE", help="calibration text (.txt) or JSONL files"
    )
    p.add_argument(
        "--seqs", type=int, default=128, help="calibration sequences, backprop one at a time (default: %(default)s)"
    )
    p.add_argument("--seq-len", type=int, default=512, help="tokens per calibration sequence (default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "float32", "bfloat16"),
        help="model dtype for backprop (default: %(default)s = the checkpoint's; fp16 is widened to fp32)",
    )
    p.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="recompute activations: less memory, ~30%% slower",
    )


def register(sub: Any) -> None:
    mask = sub.add_parser("mask", help="build or inspect a sparse mask (server side)")
    msub = mask.add_subparsers(dest="mask_command", metavar="{build,report}")
    mask.set_defaults(func=lambda args: (mask.print_help(), 2)[1])

    b = msub.add_parser("build", help="pick the top fraction of weights and write a mask file")
    _add_model_args(b, required=True)
    b.add_argument(
        "--fraction", type=float, default=0.001, help="share of eligible weights to mask (default: %(default)s)"
    )
    b.add_argument(
        "--method", default="pretrain-grad", choices=METHODS, help="how weights are scored (default: %(default)s)"
    )
    b.add_argument("--seed", type=int, default=0, help="seed of the random method, uint64 (default: %(default)s)")
    b.add_argument(
        "--passes",
        default="auto",
        choices=("auto", "1", "2"),
        help="backprop passes over the calibration text: 1 keeps g and g^2 for every weight (6 bytes per"
        " bf16 parameter beside the model); 2 keeps g^2 only, then reruns the sequences for g at the mask"
        " (4 bytes, twice the time); auto = 1 when it fits 80%% of the available memory"
        " (default: %(default)s)",
    )
    b.add_argument("--out", required=True, help="mask file to write (.safetensors)")
    b.add_argument("--overwrite", action="store_true", help="replace --out if it already exists")
    b.set_defaults(func=cmd_build)

    r = msub.add_parser("report", help="per-layer shares, overlap and gradient concentration of masks")
    r.add_argument("masks", nargs="+", help="mask files; overlaps are reported for every pair")
    _add_model_args(r, required=False)
    r.add_argument("--json", action="store_true", help="print the report as one JSON line instead of tables")
    r.add_argument("--png", default=None, help="also draw the per-layer shares into this PNG")
    r.set_defaults(func=cmd_report)


def _fail(cmd: str, exc: Exception) -> int:
    print(f"meerkat mask {cmd}: error: {exc}", file=sys.stderr)
    return 2


def _load_model(args: argparse.Namespace) -> tuple[Any, Callable[[str], list[int]], int | None]:
    """(model, encode, eos id) from the --model/--tokenizer/--device/--dtype/--gradient-checkpointing args."""
    from coordinator.mask.builder import load_for_mask, tokenizer_encoder

    model, tok = load_for_mask(
        args.model,
        device=args.device,
        dtype=args.dtype,
        checkpointing=args.gradient_checkpointing,
        tokenizer_dir=args.tokenizer,
    )
    encode, eos = tokenizer_encoder(tok)
    return model, encode, eos


def _calibrated_stats(args: argparse.Namespace, include_embeddings: bool) -> tuple[Any, dict[str, Any]]:
    from coordinator.mask.builder import calibrate, eligible_weights, read_calibration

    calib = [read_calibration(f) for f in args.calib]  # bad files fail before the model is loaded
    model, encode, eos = _load_model(args)
    weights = eligible_weights(model, include_embeddings)
    return calibrate(model, encode, eos, calib, weights, seqs=args.seqs, seq_len=args.seq_len)


def _passes(choice: str, model: Any) -> int:
    """--passes: 1 or 2 as given, or auto (`passes_for` against the free memory of the model's device)."""
    if choice != "auto":
        return int(choice)
    import psutil

    from coordinator.mask.builder import eligible_weights, passes_for

    weights = eligible_weights(model)
    dev = next(iter(weights.values())).device
    if dev.type == "cuda":
        import torch

        available = int(torch.cuda.mem_get_info(dev)[0])
    else:
        available = int(psutil.virtual_memory().available)
    passes = passes_for(weights, available)
    log.info("mask: %d backprop pass(es) (%.1f GiB available)", passes, available / 2**30)
    return passes


def cmd_build(args: argparse.Namespace) -> int:
    from coordinator.mask.builder import build_mask, read_calibration, to_mask
    from coordinator.mask.loading import check_supported
    from shared.fingerprint import FingerprintError, fingerprint_model_dir
    from shared.maskfile import MaskError, save_mask

    try:
        out = Path(args.out)
        if not out.parent.is_dir():
            raise MaskBuildError(f"--out {out}: directory {out.parent} does not exist")
        if out.exists() and not args.overwrite:  # checked before minutes of backprop, not after
            raise MaskBuildError(f"--out {out} already exists (pass --overwrite to replace it)")
        calib = [read_calibration(f) for f in args.calib]
        check_supported(args.model)  # before hashing gigabytes of a model that cannot be used
        fingerprint = fingerprint_model_dir(args.model)
        model, encode, eos = _load_model(args)
        passes = _passes(args.passes, model)
        result = build_mask(
            model,
            encode,
            eos,
            calib,
            method=args.method,
            fraction=args.fraction,
            seqs=args.seqs,
            seq_len=args.seq_len,
            seed=args.seed,
            passes=passes,
        )
        n_weights = sum(a * b for a, b in result.shapes.values())
        extra = {
            "seed": args.seed if args.method == "random" else None,
            "eligible_weights": n_weights,
            "eligible_layers": len(result.shapes),
            "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        }
        created = datetime.now(timezone.utc).replace(microsecond=0).isoformat()
        mask = to_mask(result, fingerprint, extra, created=created)
        save_mask(mask, out)
    except (MaskBuildError, MaskError, FingerprintError) as exc:
        return _fail("build", exc)
    conc = result.stats.get("concentration")
    ratio = (
        f", concentration {conc['ratio_next_tier']:.3g}x next tier"
        if conc and conc["ratio_next_tier"]
        else ""
    )
    print(f"wrote {out}: {mask.nnz} of {n_weights} weights ({args.method}), mask_id {mask.mask_id}{ratio}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from coordinator.mask.report import build_report, format_report, recompute, save_png
    from shared.fingerprint import FingerprintError, fingerprint_model_dir
    from shared.maskfile import MaskError, load_mask

    try:
        if args.calib and not args.model:
            raise MaskBuildError("--calib needs --model (the gradients are recomputed on that model)")
        expected = fingerprint_model_dir(args.model) if args.model else None
        masks = []
        for path in args.masks:
            try:
                masks.append(load_mask(path, expected_fingerprint=expected))
            except MaskError as exc:
                if expected is not None and "does not match" in str(exc):
                    raise MaskError(
                        f"{exc} (--model {args.model}); refusing to report it against this model"
                    ) from exc
                raise
        recomputed = None
        if args.calib:
            emb = any(_uses_embeddings(m) for m in masks)
            stats, desc = _calibrated_stats(args, include_embeddings=emb)
            recomputed = {"calibration": desc, **recompute(masks, stats.sq)}
        report = build_report(masks, list(args.masks), recomputed)
        if args.png:
            save_png(report, args.png)
    except (MaskBuildError, MaskError, FingerprintError) as exc:
        return _fail("report", exc)
    if args.json:
        print(json.dumps(report, sort_keys=True))
    else:
        print(format_report(report))
        if args.png:
            print(f"wrote {args.png}")
    return 0


def _uses_embeddings(mask: Any) -> bool:
    from coordinator.mask.builder import parse_description

    body = parse_description(mask.meta.calibration) or {}
    return bool(body.get("include_embeddings"))
