"""MEERKAT-VP probe: one federated ZO run with every device's per-step g, loss and GradIP recorded.

    python -m bench.learning.vp_probe --size small --task topic --T 10 --budget 200 --lr 1e-2 --seed 0 \
        --setting extreme --out DIR [--vp] [--spike-ratio 10]

Why it exists: the extreme split collapses (MEERKAT 0.965 after round 2 -> 0.26 after round 3 on `small`)
and the detector flags nobody. This records what the coordinator could see (per device per step: g, and
GradIP = g * <grad_pretrain, z>) plus what it cannot (each device's loss, the eval accuracy after every
round, the aggregate's norm), so the collapse can be attributed. Output: DIR/probe.json.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.inproc import SharedModelTrainer
from bench.learning.learning import LearningConfig, Runner
from bench.learning.sim import ZOSpec, run_zo
from coordinator.drift import DriftMonitor, DriftThresholds
from coordinator.scheduler import round_seeds
from edge_client.engine.spsa import StepResult
from shared.dataset import Dataset
from shared.modelload import LoadedModel
from shared.prng import Dist, derive_seed

Steps = dict[str, list[tuple[int, float, float, float]]]  # client -> (seed, g, loss_plus, loss_minus) per step


class RecordingTrainer(SharedModelTrainer):
    """The bench device's trainer, also appending (seed, g, loss_plus, loss_minus) of every step to `log`."""

    def __init__(self, loaded: LoadedModel, dataset: Dataset, client_id: str, mask_id: str, log: Steps) -> None:
        super().__init__(loaded, dataset, client_id, mask_id)
        self.client = client_id
        self.log = log

    def step(self, seed: int, eps: float, lr: float, dist: Dist, batch_size: int,
             data_pointer: int) -> tuple[StepResult, int]:
        res, ptr = super().step(seed, eps, lr, dist, batch_size, data_pointer)
        self.log.setdefault(self.client, []).append((seed, res.g, res.loss_plus, res.loss_minus))
        return res, ptr


def probe(size: str, task: str, T: int, budget: int, lr: float, seed: int, setting: str, vp: bool,
          out: Path, thresholds: DriftThresholds | None = None) -> dict[str, Any]:
    cfg = LearningConfig(size=size, tasks=(task,), seeds=1, Ts=(T,), budget=budget, lr_sparse=lr)
    log: Steps = {}
    with tempfile.TemporaryDirectory(prefix="meerkat-vp-probe-") as tmp:
        runner = Runner(cfg, Path(tmp))
        data = runner.data(task, setting, seed)
        loaded = runner.loaded("pretrain-grad")
        mask = runner.masks["pretrain-grad"]
        rounds = budget // T
        spec = ZOSpec(rounds, T, lr, cfg.eps, cfg.batch_size, derive_seed(seed, 100, T), vp=vp, n_evals=rounds,
                      thresholds=thresholds)
        aggs: list[list[float]] = []
        t0 = time.perf_counter()
        try:
            res = run_zo(loaded, data, spec, mask.flat_grad(), on_round=lambda r, G: aggs.append(G),
                         mask_id=mask.mask_id,
                         trainer=lambda lm, ds, client, mask_id: RecordingTrainer(lm, ds, client, mask_id, log))
        finally:
            loaded.sidecar.set_values(loaded.sidecar.initial_values())
        wall = time.perf_counter() - t0
    singles = {c for c, n in data.label_counts.items() if sum(1 for x in n if x > 0) == 1}
    mon = DriftMonitor(mask.flat_grad(), spec.dist)
    round_of = {s: r for r in range(rounds) for s in round_seeds(spec.seed, r, T)}
    steps = {c: [[round_of[s], s, g, lp, lm, g * mon.coefficient(s)] for s, g, lp, lm in v]
             for c, v in log.items()}
    result = {"size": size, "task": task, "T": T, "budget": budget, "lr": lr, "seed": seed, "setting": setting,
              "vp": vp, "wall_s": round(wall, 1), "curve": res.curve.accuracy, "curve_rounds": res.curve.rounds,
              "label_counts": data.label_counts, "single_label": sorted(singles), "limited": res.limited,
              "aggregate": aggs, "agg_norm": [math.sqrt(math.fsum(g * g for g in G)) for G in aggs],
              "gradip": res.gradip, "spikes": {c: [[rr, x if math.isfinite(x) else None] for rr, x in v]
                                                     for c, v in res.spikes.items()},
              "thresholds": dict(vars(spec.thresholds or DriftThresholds())),
              "steps": steps,
              "threads": torch.get_num_threads()}
    out.mkdir(parents=True, exist_ok=True)
    (out / "probe.json").write_text(json.dumps(result, allow_nan=False) + "\n")
    return result


def mean(v: list[float]) -> float:
    return sum(v) / len(v) if v else math.nan


def alignment(result: dict[str, Any], r: int) -> dict[str, float]:
    """Per device: cosine between its g vector of round r and the sum of the other devices' (same seeds,
    so <update_k, update_j> ~ nnz * sum_t g_kt g_jt: what the coordinator can compute without the model)."""
    vec: dict[str, dict[int, float]] = {}
    for c, st in result["steps"].items():
        vec[c] = {x[1]: x[2] for x in st if x[0] == r}
    seeds = sorted({s for v in vec.values() for s in v})
    out = {}
    for c, v in vec.items():
        if not v:
            continue
        others = {s: sum(w.get(s, 0.0) for k, w in vec.items() if k != c) for s in seeds}
        dot = sum(v.get(s, 0.0) * others[s] for s in seeds)
        n1 = math.sqrt(sum(x * x for x in v.values()))
        n2 = math.sqrt(sum(x * x for x in others.values()))
        out[c] = dot / (n1 * n2) if n1 > 0 and n2 > 0 else 0.0
    return out


def per_round(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Per round: eval accuracy, aggregate norm, and per group (single-label / other) the mean |g|, the loss
    at the round's first and last local step (mean of loss+ and loss-), the mean |GradIP| and the mean
    alignment (cosine of a device's g vector with the rest of the fleet's)."""
    singles = set(result["single_label"])
    out = []
    for r, acc in enumerate(result["curve"]):
        row: dict[str, Any] = {"round": r + 1, "acc": acc, "agg_norm": result["agg_norm"][r]}
        cos = alignment(result, r)
        for name, members in (("single", singles), ("other", set(result["steps"]) - singles)):
            g, l0, l1, gi = [], [], [], []
            for c in members:
                st = [x for x in result["steps"][c] if x[0] == r]  # (round, seed, g, loss+, loss-, gradip)
                if not st:
                    continue
                g += [abs(x[2]) for x in st]
                l0.append((st[0][3] + st[0][4]) / 2)
                l1.append((st[-1][3] + st[-1][4]) / 2)
                gi += [abs(x[5]) for x in st]
            ratios = {c: math.inf if x is None else x for c in members for rr, x in result["spikes"].get(c, [])
                      if rr == r}
            top = max(ratios, key=lambda c: ratios[c]) if ratios else None
            row[name] = {"max_ratio": None if top is None else [top, round(ratios[top], 2)],
                         "cos": mean([cos[c] for c in members if c in cos]), "abs_g": mean(g), "max_abs_g": max(g) if g else math.nan, "loss_first": mean(l0),
                         "loss_last": mean(l1), "abs_gradip": mean(gi)}
        out.append(row)
    return out


def as_run_row(result: dict[str, Any]) -> dict[str, Any]:
    """The probe in the grid's row shape, for bench.learning.plots.plot_gradip."""
    singles = set(result["single_label"])
    return {"size": result["size"], "task": result["task"], "setting": result["setting"],
            "method": "meerkat-vp" if result["vp"] else "meerkat", "T": result["T"], "seed": result["seed"],
            "accuracy": result["curve"][-1], "gradip": {c: [x[5] for x in st] for c, st in result["steps"].items()},
            "drift": {c: {"single_label": c in singles} for c in result["steps"]}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="small")
    p.add_argument("--task", default="topic")
    p.add_argument("--T", type=int, default=10)
    p.add_argument("--budget", type=int, default=200)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--setting", default="extreme", choices=("extreme", "dirichlet"))
    p.add_argument("--vp", action="store_true")
    p.add_argument("--out", default="vp-probe")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--spike-ratio", type=float, default=DriftThresholds().spike_ratio,
                   help="MEERKAT-VP divergence threshold (max |g| / round median |g|; 0 = off)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    r = probe(a.size, a.task, a.T, a.budget, a.lr, a.seed, a.setting, a.vp, Path(a.out),
              DriftThresholds(spike_ratio=a.spike_ratio))
    from bench.learning.plots import plot_gradip

    plot_gradip([as_run_row(r)], Path(a.out) / "gradip.png", window=a.T)
    for row in per_round(r):
        print(json.dumps(row))
    print(json.dumps({k: r[k] for k in ("curve", "single_label", "limited", "wall_s")}))
    print(json.dumps({"spikes": {c: [x for _, x in v] for c, v in r["spikes"].items()}}))


if __name__ == "__main__":
    main()
