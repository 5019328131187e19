"""MEERKAT-VP probe: one federated ZO run with every device's per-step g, loss and GradIP recorded.

    python -m bench.learning_vp_probe --size small --task topic --T 10 --budget 200 --lr 1e-2 --seed 0 \
        --setting extreme --out DIR [--vp]

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
from bench.learning import LearningConfig, Runner
from bench.learning_sim import ZOSpec, run_zo
from edge_client.engine.spsa import StepResult
from shared.prng import Dist, derive_seed


class RecordingTrainer(SharedModelTrainer):
    """The bench device's trainer, also appending (seed, g, loss_plus, loss_minus) of every step."""

    log: dict[str, list[tuple[int, float, float, float]]] = {}

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.client = a[2] if len(a) > 2 else kw["client_id"]

    def step(self, seed: int, eps: float, lr: float, dist: Dist, batch_size: int,
             data_pointer: int) -> tuple[StepResult, int]:
        res, ptr = super().step(seed, eps, lr, dist, batch_size, data_pointer)
        self.log.setdefault(self.client, []).append((seed, res.g, res.loss_plus, res.loss_minus))
        return res, ptr


def probe(size: str, task: str, T: int, budget: int, lr: float, seed: int, setting: str, vp: bool,
          out: Path) -> dict[str, Any]:
    import bench.learning_sim as sim

    cfg = LearningConfig(size=size, tasks=(task,), seeds=1, Ts=(T,), budget=budget, lr_sparse=lr)
    with tempfile.TemporaryDirectory(prefix="meerkat-vp-probe-") as tmp:
        runner = Runner(cfg, Path(tmp))
        data = runner.data(task, setting, seed)
        loaded = runner.loaded("pretrain-grad")
        mask = runner.masks["pretrain-grad"]
        rounds = budget // T
        spec = ZOSpec(rounds, T, lr, cfg.eps, cfg.batch_size, derive_seed(seed, 100, T), vp=vp, n_evals=rounds)
        RecordingTrainer.log = {}
        aggs: list[list[float]] = []
        orig = sim.SharedModelTrainer
        sim.SharedModelTrainer = RecordingTrainer  # type: ignore[misc]
        t0 = time.perf_counter()
        try:
            res = run_zo(loaded, data, spec, mask.flat_grad(), on_round=lambda r, G: aggs.append(G),
                         mask_id=mask.mask_id)
        finally:
            sim.SharedModelTrainer = orig  # type: ignore[misc]
            loaded.sidecar.set_values(loaded.sidecar.initial_values())
        wall = time.perf_counter() - t0
    singles = {c for c, n in data.label_counts.items() if sum(1 for x in n if x > 0) == 1}
    result = {"size": size, "task": task, "T": T, "budget": budget, "lr": lr, "seed": seed, "setting": setting,
              "vp": vp, "wall_s": round(wall, 1), "curve": res.curve.accuracy, "curve_rounds": res.curve.rounds,
              "label_counts": data.label_counts, "single_label": sorted(singles), "limited": res.limited,
              "aggregate": aggs, "agg_norm": [math.sqrt(math.fsum(g * g for g in G)) for G in aggs],
              "gradip": res.gradip,
              "steps": {c: [list(s) for s in v] for c, v in RecordingTrainer.log.items()},
              "threads": torch.get_num_threads()}
    out.mkdir(parents=True, exist_ok=True)
    (out / "probe.json").write_text(json.dumps(result, allow_nan=False) + "\n")
    return result


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
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    r = probe(a.size, a.task, a.T, a.budget, a.lr, a.seed, a.setting, a.vp, Path(a.out))
    print(json.dumps({k: r[k] for k in ("curve", "single_label", "limited", "wall_s")}))


if __name__ == "__main__":
    main()
