"""The learning grid's cell cache and its learning-rate rule.

A cell is one trained run (task, setting, method, T, seed, lr) of one model. Its key is the sha256 of
everything that shapes the result: the cell itself, the model fingerprint and every LearningConfig field
a run reads (budget, clients, split, batch, eps, mask fraction, eval points, VP thresholds, ...). Each
finished cell is written to `<cells>/<key>.json` (temp file + rename: a killed grid never leaves a half
cell), with its wall time. `--resume` reads finished cells instead of recomputing them, so a long grid can
be completed over several runs (or by several processes sharing one cell dir, `--shard K/N`).

The lr rule (`--tune`), the same for every method: each lr of the method's grid runs on the tuning seeds
(never evaluation seeds) in the Dirichlet setting at the grid's budget. A run is *stable* when its final
loss is finite and its final accuracy is within `drop_tol` of the best accuracy on its own curve (a run
that learned and then collapsed is unstable, wherever it ended). An lr is stable when every tuning seed's
run is. The chosen lr is the stable lr with the highest mean final accuracy over the tuning seeds; lrs
within `tie_tol` of that count as tied and the smallest of them wins (the safer step). With no stable lr
the smallest lr of the grid is chosen and marked unstable.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CELL_VERSION = 1  # bump when what a cell's result means changes (invalidates every cached cell)

# lr grids per method (log spaced, x2-2.5): wide enough to bracket the probes on demo and small
LR_GRID: dict[str, tuple[float, ...]] = {
    "backprop-fedavg": (1e-4, 3e-4, 1e-3, 3e-3),
    "fedzo-dense": (1e-4, 2e-4, 5e-4, 1e-3, 2e-3),
    "meerkat": (2e-3, 5e-3, 1e-2, 2e-2, 5e-2),
    "weight-magnitude": (1e-2, 2e-2, 5e-2, 1e-1, 2e-1),
    "random-mask": (5e-3, 1e-2, 2e-2, 5e-2, 1e-1),
}
TUNED_BY = {"meerkat-vp": "meerkat"}  # VP = meerkat + the detector: same lr, so only the detector differs


@dataclass(frozen=True)
class LrRule:
    drop_tol: float = 0.1  # final accuracy >= peak of the curve - drop_tol, else the run collapsed
    tie_tol: float = 0.005  # lrs this close to the best mean final accuracy count as tied
    # among tied lrs: "faster" = the best mean accuracy over the curve (learns sooner; then the smaller lr),
    # "smaller" = the smallest lr. On a task every method saturates, "smaller" picks each method's slowest
    # lr that still saturates (BENCHMARKS.md, the small/topic grid), so the methods' speed is not compared.
    tie_break: str = "faster"

    def __post_init__(self) -> None:
        if self.tie_break not in ("faster", "smaller"):
            raise ValueError(f"LrRule.tie_break: expected 'faster' or 'smaller', got {self.tie_break!r}")


def cell_key(fields: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of a cell's full config (version included)."""
    blob = json.dumps({"cell_version": CELL_VERSION, **fields}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


class CellCache:
    """Finished cells on disk, one JSON file per key."""

    def __init__(self, root: Path, resume: bool) -> None:
        self.root, self.resume = root, resume
        root.mkdir(parents=True, exist_ok=True)
        self.hits = self.computed = 0

    def path(self, key: str) -> Path:
        return self.root / f"{key}.json"

    def get(self, key: str) -> dict[str, Any] | None:
        """The cached row, when resuming and the cell is finished (a corrupt file counts as missing)."""
        if not self.resume:
            return None
        p = self.path(key)
        try:
            doc = json.loads(p.read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(doc, dict) or doc.get("key") != key or "row" not in doc:
            return None
        self.hits += 1
        return dict(doc["row"])

    def put(self, key: str, fields: Mapping[str, Any], row: Mapping[str, Any]) -> None:
        self.computed += 1
        tmp = self.root / f".{key}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps({"key": key, "config": dict(fields), "row": dict(row)}, allow_nan=False) + "\n")
        os.replace(tmp, self.path(key))


# ---------------------------------------------------------------- the lr rule


def run_stable(row: Mapping[str, Any], rule: LrRule) -> bool:
    """Finite final loss and no collapse: final accuracy >= the curve's best - drop_tol."""
    loss = row.get("final_loss")
    if loss is None or (isinstance(loss, float) and not math.isfinite(loss)):
        return False
    accs = row["curve"]["accuracy"]
    return bool(accs) and accs[-1] >= max(accs) - rule.drop_tol


def choose_lr(by_lr: Mapping[float, Sequence[Mapping[str, Any]]], rule: LrRule) -> dict[str, Any]:
    """{lr, stable, tried: {lr: {acc_mean, stable, accs}}} from the tuning runs of each lr."""
    if not by_lr or any(not rows for rows in by_lr.values()):
        raise ValueError("choose_lr: every lr needs at least one tuning run")
    tried: dict[float, dict[str, Any]] = {}
    for lr in sorted(by_lr):
        rows = by_lr[lr]
        accs = [float(r["accuracy"]) for r in rows]
        tried[lr] = {"acc_mean": statistics.fmean(accs), "accs": accs,
                     "curve_mean": statistics.fmean(statistics.fmean(r["curve"]["accuracy"]) for r in rows),
                     "stable": all(run_stable(r, rule) for r in rows)}
    stable = {lr: t for lr, t in tried.items() if t["stable"]}
    if not stable:
        return {"lr": min(tried), "stable": False, "tried": tried}
    best = max(t["acc_mean"] for t in stable.values())
    tied = [lr for lr, t in stable.items() if t["acc_mean"] >= best - rule.tie_tol]
    if rule.tie_break == "faster":
        lr = min(tied, key=lambda x: (-round(stable[x]["curve_mean"], 9), x))
    else:
        lr = min(tied)
    return {"lr": lr, "stable": True, "tried": tried}


def lr_table_key(size: str, task: str, method: str) -> str:
    return f"{size}/{task}/{method}"


def load_lrs(path: Path, size: str) -> dict[str, float]:
    """{"task/method": lr} for `size` from a `--tune` lrs.json (meerkat-vp inherits meerkat's)."""
    doc = json.loads(path.read_text())
    chosen = doc.get("chosen")
    if not isinstance(chosen, dict):
        raise SystemExit(f"--lrs {path}: no 'chosen' table (write one with `meerkat bench learning --tune`)")
    out: dict[str, float] = {}
    for key, v in chosen.items():
        s, task, method = key.split("/")
        if s == size:
            out[f"{task}/{method}"] = float(v["lr"])
    for k in list(out):
        task, method = k.split("/")
        for child, parent in TUNED_BY.items():
            if method == parent:
                out.setdefault(f"{task}/{child}", out[k])
    return out


def _curve(t: Mapping[str, Any]) -> str:
    return f" [{t['curve_mean']:.3f}]" if "curve_mean" in t else ""


def lr_markdown(doc: Mapping[str, Any]) -> str:
    lines = ["| size / task / method | chosen lr | stable | lr -> mean final accuracy [mean over the curve] "
             "(tuning seeds; * = unstable) |", "|---|---|---|---|"]
    for key, v in sorted(doc["chosen"].items()):
        tried = ", ".join(f"{float(lr):g} -> {t['acc_mean']:.3f}{_curve(t)}{'' if t['stable'] else '*'}"
                          for lr, t in sorted(v["tried"].items(), key=lambda kv: float(kv[0])))
        lines.append(f"| {key} | {v['lr']:g} | {'yes' if v['stable'] else 'NO'} | {tried} |")
    return "\n".join(lines) + "\n"


__all__ = ["CELL_VERSION", "LR_GRID", "TUNED_BY", "CellCache", "LrRule", "cell_key", "choose_lr", "load_lrs",
           "lr_markdown", "lr_table_key", "run_stable"]
