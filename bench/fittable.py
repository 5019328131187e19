"""docs/DEPLOY.md "Will it fit?": the predicted memory table, from config values alone.

    python -m bench.fittable [--fraction 0.001] [--max-micro-batch 64]

For each device budget below x model shape (bench/step.py PRESETS) x sequence length, the planner's
four components as `edge_client.engine.estimate.estimate_memory` predicts them (nf4, checkpoint bf16),
need at one sequence and the largest micro-batch that fits. Prints a Markdown table. The budgets are
what is left to the model after the OS, the runtime and its libraries (the client's
`memory_budget_gib`): the assumptions are in the DEVICES rows and the doc.
"""

from __future__ import annotations

import argparse
import sys

# name, memory_budget_gib, device kind, compute dtype (what default_compute_dtype picks there)
DEVICES: list[tuple[str, float, str, str]] = [
    ("Jetson Orin Nano 8 GB (unified)", 5.0, "cuda", "bfloat16"),
    ("Jetson Orin NX 16 GB (unified)", 12.0, "cuda", "bfloat16"),
    ("laptop GPU 6 GB", 5.0, "cuda", "bfloat16"),
    ("CPU laptop 8 GB, no AVX512-BF16", 4.0, "cpu", "float32"),
]
SHAPES = ("qwen2.5-0.5b", "llama-3.2-1b", "llama-3.2-3b")
SEQS = (128, 256)


def rows(fraction: float, max_micro_batch: int) -> list[str]:
    from bench.step import PRESETS
    from edge_client.engine.estimate import estimate_memory

    mib = float(1 << 20)
    out = [
        "| device (budget) | shape | seq | weights | side-car | fixed | per seq | need at 1 seq | micro-batch |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for device, budget, kind, dtype in DEVICES:
        for shape in SHAPES:
            cfg = dict(PRESETS[shape], torch_dtype="bfloat16")
            for seq in SEQS:
                e = estimate_memory(cfg, "nf4", seq, budget, compute_dtype=dtype, device=kind, fraction=fraction,
                                    max_micro_batch=max_micro_batch)  # fmt: skip
                fits = str(e.micro_batch) if e.micro_batch else "**does not fit**"
                out.append(
                    f"| {device} ({budget:g} GiB) | {shape} | {seq} | {e.weights_bytes / mib:.0f} MiB | "
                    f"{e.sidecar_bytes / mib:.0f} MiB | {e.fixed_bytes / mib:.0f} MiB | {e.per_seq_bytes / mib:.1f} MiB | "
                    f"{e.need_bytes(1) / mib:.0f} MiB | {fits} |"
                )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.fittable", description=__doc__.split("\n")[0])
    p.add_argument("--fraction", type=float, default=1e-3, help="mask fraction (default 0.1%%)")
    p.add_argument("--max-micro-batch", type=int, default=64, help="the planner's cap (default 64)")
    args = p.parse_args(argv)
    print("\n".join(rows(args.fraction, args.max_micro_batch)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
