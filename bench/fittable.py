"""docs/DEPLOY.md "Will it fit?": the predicted memory table, from config values alone.

    python -m bench.fittable [--fraction 0.001] [--max-micro-batch 64]

For each model shape (bench/step.py PRESETS) x sequence length x compute (CUDA bf16, CPU fp32), the
planner's four components as `edge_client.engine.estimate.estimate_memory` predicts them (nf4,
checkpoint bf16), the need at one sequence, and per device budget the largest micro-batch that fits. Prints a Markdown table. The budgets are
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
    """One row per shape x seq x compute (CUDA bf16, CPU fp32): the components, then per device the
    micro-batch the budget allows ("-" where the device computes the other way, "no" where not even one
    sequence fits)."""
    from bench.step import PRESETS
    from edge_client.engine.estimate import estimate_memory

    mib = float(1 << 20)
    kinds = sorted({(kind, dtype) for _, _, kind, dtype in DEVICES}, reverse=True)  # cuda first
    heads = " | ".join(f"{name} ({budget:g} GiB)" for name, budget, _, _ in DEVICES)
    out = [
        f"| shape | seq | compute | weights | side-car | fixed | per seq | need at 1 seq | {heads} |",
        "|---|---|---|---|---|---|---|---|" + "---|" * len(DEVICES),
    ]
    for shape in SHAPES:
        cfg = dict(PRESETS[shape], torch_dtype="bfloat16")
        for seq in SEQS:
            for kind, dtype in kinds:
                e = estimate_memory(cfg, "nf4", seq, 1.0, compute_dtype=dtype, device=kind, fraction=fraction)
                cells = []
                for _, budget, dkind, ddtype in DEVICES:
                    if (dkind, ddtype) != (kind, dtype):
                        cells.append("-")
                        continue
                    fit = estimate_memory(cfg, "nf4", seq, budget, compute_dtype=dtype, device=kind,
                                          fraction=fraction, max_micro_batch=max_micro_batch)  # fmt: skip
                    cells.append(str(fit.micro_batch) if fit.micro_batch else "no")
                out.append(
                    f"| {shape} | {seq} | {kind} {dtype.replace('bfloat16', 'bf16').replace('float32', 'fp32')} | "
                    f"{e.weights_bytes / mib:.0f} MiB | {e.sidecar_bytes / mib:.0f} MiB | {e.fixed_bytes / mib:.0f} MiB | "
                    f"{e.per_seq_bytes / mib:.1f} MiB | {e.need_bytes(1) / mib:.0f} MiB | {' | '.join(cells)} |"
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
