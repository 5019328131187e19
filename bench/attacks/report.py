"""The attack matrix's summary: every attack against the clean run of the same rule and seed, the verdicts
of issue 26, and the markdown table for BENCHMARKS.md.

Accuracy deltas are in accuracy units (0.02 = 2 points) of the final round's held-out accuracy, attack
minus the clean run with the same rule and seed (same data split, same directions, same batches: only the
hostile devices' messages differ).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

from bench.attacks.run import CellResult


def _final(r: CellResult) -> tuple[float, float]:
    return r.accuracy[-1], r.loss[-1]


def summarize(results: Sequence[CellResult], *, default_rule: str, tolerance: float = 0.02,
              clean_tolerance: float = 0.01) -> dict[str, Any]:
    """{"rows": one per (rule, attack, hostile), "clean_cost": default rule vs fedavg without attack,
    "verdicts": the issue's questions answered from the rows}."""
    clean: dict[tuple[str, int], CellResult] = {(r.cell.rule, r.cell.seed): r for r in results if r.cell.attack == "none"}
    absent: dict[tuple[str, int, int], CellResult] = {
        (r.cell.rule, r.cell.hostile, r.cell.seed): r for r in results if r.cell.attack == "absent"}
    groups: dict[tuple[str, str, int], list[CellResult]] = {}
    for r in results:
        if r.cell.attack != "none":
            groups.setdefault((r.cell.rule, r.cell.attack, r.cell.hostile), []).append(r)
    rows: list[dict[str, Any]] = []
    for (rule, attack, hostile), runs in sorted(groups.items()):
        base = [clean[(rule, r.cell.seed)] for r in runs if (rule, r.cell.seed) in clean]
        if len(base) != len(runs):
            raise ValueError(f"{rule}/{attack}: a seed has no clean run of the same rule")
        deltas = [_final(r)[0] - _final(b)[0] for r, b in zip(runs, base, strict=True)]
        gaps = [max(bacc - acc for acc, bacc in zip(r.accuracy, b.accuracy, strict=True))
                for r, b in zip(runs, base, strict=True)]  # worst round: how far it fell behind meanwhile
        rows.append({
            "rule": rule, "attack": attack, "hostile": hostile, "seeds": [r.cell.seed for r in runs],
            "accuracy": statistics.fmean(_final(r)[0] for r in runs),
            "clean_accuracy": statistics.fmean(_final(b)[0] for b in base),
            "delta_mean": statistics.fmean(deltas), "delta_worst": min(deltas),
            "worst_round_gap": max(gaps),
            "loss": statistics.fmean(_final(r)[1] for r in runs),
            "clean_loss": statistics.fmean(_final(b)[1] for b in base),
            "within_tolerance": min(deltas) >= -tolerance,
            "delta_vs_absent": _vs_absent(runs, absent),
            "refused": sum(sum(r.attacker.get("refused", {}).values()) for r in runs),
            "max_abs_unrefused": max(float(r.attacker.get("max_abs_unrefused", 0.0)) for r in runs),
            "max_abs_sent": max(float(r.attacker.get("max_abs_sent", 0.0)) for r in runs),
            "share": [r.attacker.get("share") for r in runs],  # the hostile devices' share of the data, per seed
            "lr_final": _last_lr(runs), "clean_lr_final": _last_lr(base),  # the last round's applied lr, mean
        })  # fmt: skip
    cost = _clean_cost(clean, default_rule)
    verdicts: dict[str, Any] = {}
    for rule in sorted({row["rule"] for row in rows}):
        for hostile in sorted({row["hostile"] for row in rows if row["rule"] == rule}):
            sel = [row for row in rows if row["rule"] == rule and row["hostile"] == hostile and row["attack"] != "absent"]
            verdicts[f"{rule}/{hostile}"] = {
                "all_within": all(row["within_tolerance"] for row in sel),
                "held": [row["attack"] for row in sel if row["within_tolerance"]],
                "broke": [row["attack"] for row in sel if not row["within_tolerance"]],
            }
    if cost is not None:
        verdicts["clean_cost_within"] = cost["delta_mean"] >= -clean_tolerance
    return {"rows": rows, "clean_cost": cost, "verdicts": verdicts, "tolerance": tolerance,
            "clean_tolerance": clean_tolerance}


def _vs_absent(runs: Sequence[CellResult], absent: dict[tuple[str, int, int], CellResult]) -> float | None:
    """Mean final accuracy minus the run where the same devices joined and stayed silent (their data lost,
    nothing sent): what the messages did beyond losing the data. None when not every seed has that run."""
    keys = [(r.cell.rule, r.cell.hostile, r.cell.seed) for r in runs]
    if not all(k in absent for k in keys):
        return None
    return statistics.fmean(_final(r)[0] - _final(absent[k])[0] for r, k in zip(runs, keys, strict=True))


def _clean_cost(clean: dict[tuple[str, int], CellResult], default_rule: str) -> dict[str, Any] | None:
    """The default rule's clean final accuracy minus plain FedAvg's, per seed (None: one of them not run)."""
    seeds = sorted(s for (rule, s) in clean if rule == default_rule and ("fedavg", s) in clean)
    if default_rule == "fedavg" or not seeds:
        return None
    deltas = [_final(clean[(default_rule, s)])[0] - _final(clean[("fedavg", s)])[0] for s in seeds]
    return {"rule": default_rule, "seeds": seeds, "deltas": deltas, "delta_mean": statistics.fmean(deltas),
            "accuracy": statistics.fmean(_final(clean[(default_rule, s)])[0] for s in seeds),
            "fedavg_accuracy": statistics.fmean(_final(clean[("fedavg", s)])[0] for s in seeds)}


def _last_lr(runs: Sequence[CellResult]) -> float | None:
    """The mean over seeds of the lr the last round was applied with (None: a run cached before it was kept)."""
    if not runs or not all(r.lr for r in runs):
        return None
    return statistics.fmean(r.lr[-1] for r in runs)


def _lr_pair(r: dict[str, Any]) -> str:
    a, b = r.get("lr_final"), r.get("clean_lr_final")
    return "-" if a is None or b is None else f"{a:.3g} ({b:.3g})"


def _shares(shares: Sequence[float | None]) -> str:
    """The hostile devices' data share per seed ("8/10/9 %"); "-" when a run did not record it."""
    if any(x is None for x in shares):
        return "-"
    return "/".join(f"{100 * float(x):.0f}" for x in shares if x is not None) + " %"


def markdown(summary: dict[str, Any]) -> str:
    """The table of BENCHMARKS.md: one row per (rule, attack, hostile)."""
    tol = summary["tolerance"]
    lines = [
        "| rule | attack | hostile of 10 | final acc | clean acc | delta mean / worst seed | worst round gap "
        "| vs absent | final loss (clean) | refused | max \\|g\\| sent | data share | last lr (clean) | within "
        + f"{tol * 100:g} pts |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary["rows"]:
        lines.append(
            f"| {r['rule']} | {r['attack']} | {r['hostile']} | {r['accuracy']:.3f} | {r['clean_accuracy']:.3f} "
            f"| {r['delta_mean']:+.3f} / {r['delta_worst']:+.3f} | {r['worst_round_gap']:.3f} "
            f"| {'-' if r['delta_vs_absent'] is None else format(r['delta_vs_absent'], '+.3f')} "
            f"| {r['loss']:.3f} ({r['clean_loss']:.3f}) | {r['refused']} | {r['max_abs_sent']:.3g} "
            f"| {_shares(r['share'])} | {_lr_pair(r)} | {'yes' if r['within_tolerance'] else '**no**'} |"
        )
    cost = summary["clean_cost"]
    if cost is not None:
        lines.append("")
        lines.append(f"Clean run, {cost['rule']} vs fedavg: {cost['accuracy']:.3f} vs {cost['fedavg_accuracy']:.3f} "
                     f"(delta {cost['delta_mean']:+.3f}; per seed "
                     + ", ".join(f"{d:+.3f}" for d in cost["deltas"]) + ").")
    return "\n".join(lines) + "\n"


__all__ = ["markdown", "summarize"]
