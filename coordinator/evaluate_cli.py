"""`meerkat evaluate`: loss (and accuracy on labelled data) of a model on a data file.

    meerkat evaluate --model EXPORT_DIR --data task.json            # an export (or any HF causal LM)
    meerkat evaluate --model BASE --data eval.jsonl                 # the base model as is
    meerkat evaluate --model BASE --mask M --state-dir STATE        # the fleet's model at its last round
    meerkat evaluate --model BASE --mask M --values values-r00000004.safetensors   # a checkpoint

With a mask the model is the one the fleet and `meerkat export` compute with (quantized base + fp32
side-car, fp32 compute); without one it is loaded unquantized in fp32 (`--quant` to change). The
numbers are those of the coordinator's own evaluation (`eval_data`, same `--seq-len` and `--max`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def register(sub: Any) -> None:
    p = sub.add_parser("evaluate", help="loss/accuracy of a model (base, + mask and values, or an export) on a data file",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--model", type=Path, required=True, help="HF model dir: a base model or a `meerkat export`")
    p.add_argument("--data", type=Path, required=True, help="task.json (its 'eval' file) or a JSONL file")
    p.add_argument("--mask", type=Path, help="mask file: evaluate the side-car model with --values/--state-dir")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--values", type=Path, help="values safetensors (a coordinator checkpoint; tensor 'values')")
    g.add_argument("--state-dir", type=Path, help="coordinator state_dir: values of its last closed round")
    p.add_argument("--quant", choices=("nf4", "int8", "none"), help="base quantisation (default: nf4 with --mask, else none)")
    p.add_argument("--seq-len", type=int, default=256, help="max tokens per example (default 256, as eval_seq_len)")
    p.add_argument("--max", type=int, default=256, help="evaluate at most this many examples (default 256, as eval_max)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    try:
        out = evaluate_cmd(args.model, args.data, mask_path=args.mask, values_path=args.values,
                           state_dir=args.state_dir, quant=args.quant, seq_len=args.seq_len, limit=args.max)  # fmt: skip
    except (ValueError, OSError, RuntimeError) as exc:
        print(f"evaluate: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(out))
    else:
        acc = "-" if out["accuracy"] is None else f"{out['accuracy']:.4f}"
        rnd = "" if out["round"] is None else f"  (values after round {out['round']})"
        print(f"loss {out['loss']:.6f}  accuracy {acc}  examples {out['n']}{rnd}")
    return 0


def evaluate_cmd(
    model: Path, data: Path, *, mask_path: Path | None = None, values_path: Path | None = None,
    state_dir: Path | None = None, quant: str | None = None, seq_len: int = 256, limit: int = 256,
) -> dict[str, Any]:  # fmt: skip
    import torch

    from shared.evaluation import evaluate_model, load_eval_data
    from shared.modelload import load_model

    if mask_path is None and (values_path or state_dir):
        raise ValueError("--values/--state-dir need --mask")
    round_: int | None = None
    if mask_path is None:
        loaded = load_model(model, quant or "none", "cpu", None, compute_dtype=torch.float32)  # type: ignore[arg-type]
    else:
        from shared.fingerprint import fingerprint_model_dir
        from shared.maskfile import load_mask

        fp = fingerprint_model_dir(model)
        mask = load_mask(mask_path, expected_fingerprint=fp)
        loaded = load_model(model, quant or "nf4", "cpu", mask, compute_dtype=torch.float32, fingerprint=fp)  # type: ignore[arg-type]
        assert loaded.sidecar is not None
        if values_path is not None:
            from coordinator.checkpoint import read_checkpoint

            ck = read_checkpoint(values_path, mask.mask_id, fp, mask.nnz)
            loaded.sidecar.set_values(ck.values)
            round_ = ck.round
        elif state_dir is not None:
            from coordinator.export import values_from_state

            values, round_ = values_from_state(state_dir, mask, model, fp)
            loaded.sidecar.set_values(values)
    if loaded.tokenizer is None:
        raise ValueError(f"--model {model} has no tokenizer files")
    dataset = load_eval_data(data, loaded.tokenizer, seq_len)
    res = evaluate_model(loaded.model, dataset, limit=limit)
    return {"loss": res.loss, "accuracy": res.accuracy, "n": res.n, "round": round_, "model": str(model),
            "data": str(data)}  # fmt: skip
