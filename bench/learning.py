"""`meerkat bench learning`: does sparse zeroth-order federated fine-tuning learn, and which mask wins?

    meerkat bench learning [--quick] [--json] [--out DIR] [--tasks sentiment,topic] [--seeds 3]

In-process fleet (bench/inproc.py via bench/learning_sim.py: the product's round book, client cores and
engine step, messages through the codec, no MQTT) of 10 clients on
the project's pretrained tiny LM (`meerkat tiny-model`), labelled tasks from bench/tasks.py split with
Dirichlet(alpha=0.5) label skew, plus an "extreme" split where some clients hold a single label.
Every method gets the same budget of local steps per client (rounds = budget / T):

    zero-shot         the pretrained model, no training
    backprop-fedavg   full fp32 model, T local AdamW steps, weights averaged (upper bound)
    fedzo-dense       SPSA on every decoder Linear weight, quantization none
    meerkat           SPSA on the pretrain-gradient mask (coordinator.mask.builder)
    weight-magnitude  SPSA on the top-|w| mask
    random-mask       SPSA on a random mask (new mask per seed)
    meerkat-vp        meerkat + coordinator.drift: drifting clients run 1 local step (T=10 only: at T=1
                      it is meerkat)

Output under --out: learning.json (every run, its curve and bytes), learning.md (the table),
learning_rounds.png and learning_bytes.png. With --json the JSON summary is the last stdout line.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from bench.learning_sim import (
    BPSpec,
    ClientData,
    RunResult,
    ZOSpec,
    eval_accuracy,
    make_data,
    restore,
    run_backprop,
    run_zo,
    snapshot,
)
from coordinator.drift import DriftThresholds, drift_stats
from shared.prng import derive_seed

log = logging.getLogger(__name__)

METHODS = ("zero-shot", "backprop-fedavg", "fedzo-dense", "meerkat", "weight-magnitude", "random-mask", "meerkat-vp")
ZO_MASK = {"fedzo-dense": "dense", "meerkat": "pretrain-grad", "weight-magnitude": "weight-magnitude",
           "random-mask": "random", "meerkat-vp": "pretrain-grad"}


@dataclass(frozen=True)
class LearningConfig:
    """One benchmark run. Learning rates were picked by a sweep on seed 100 (not an eval seed): BENCHMARKS.md."""

    size: str = "demo"  # tiny-model size
    tasks: tuple[str, ...] = ("topic", "sentiment", "claim")
    seeds: int = 3
    Ts: tuple[int, ...] = (1, 10)
    budget: int = 100  # local steps per client (rounds = budget / T)
    n_clients: int = 10
    alpha: float = 0.5
    n_single: int = 4  # extreme setting: clients holding one label
    n_train: int = 1000
    n_eval: int = 200
    batch_size: int = 16
    fraction: float = 0.01  # mask share of the decoder Linear weights (see BENCHMARKS.md on why not 0.1%)
    eps: float = 1e-2
    # Sweep on seed 100, topic, T = 10, demo-377555470863 (BENCHMARKS.md): the largest stable lr of each.
    lr_sparse: float = 2e-2  # meerkat, weight-magnitude, random, meerkat-vp (5e-2 diverges)
    lr_dense: float = 5e-4  # fedzo-dense: variance grows with nnz, so the stable lr is smaller (1e-3 diverges)
    lr_backprop: float = 1e-3  # AdamW
    n_evals: int = 10  # eval points per run (curves)
    calib_seqs: int = 64  # pre-training-like sequences (x 128 tokens) backpropagated for the MEERKAT mask
    methods: tuple[str, ...] = METHODS
    extreme: bool = True  # also run meerkat / meerkat-vp on the extreme split

    @classmethod
    def quick(cls) -> LearningConfig:
        return cls(tasks=("topic",), budget=40, n_evals=4)


def add_parser(sub: Any) -> None:
    p = sub.add_parser("learning", help="federated learning quality: ZO masks vs dense vs backprop, plots + table",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="one task (topic), budget 40 steps per client")
    p.add_argument("--json", action="store_true", help="print the JSON summary as the last stdout line")
    p.add_argument("--out", default="bench-learning", help="dir for learning.json/.md and the PNG plots")
    p.add_argument("--size", default=None, help="tiny-model size (default demo)")
    p.add_argument("--tasks", default=None, help="comma list of tasks (sentiment, topic, claim)")
    p.add_argument("--seeds", type=int, default=None, help="seeds per configuration (>= 1)")
    p.add_argument("--budget", type=int, default=None, help="local steps per client (multiple of every T)")
    p.add_argument("--methods", default=None, help=f"comma list from {','.join(METHODS)}")
    p.add_argument("--T", default=None, help="comma list of local steps per round (default 1,10)")
    p.add_argument("--fraction", type=float, default=None, help="mask fraction of the decoder Linear weights")
    p.add_argument("--lr-sparse", type=float, default=None)
    p.add_argument("--lr-dense", type=float, default=None)
    p.add_argument("--lr-backprop", type=float, default=None)
    p.add_argument("--no-extreme", action="store_true", help="skip the single-label (MEERKAT-VP) setting")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: on a shared 2-core box 2 threads oversubscribe and run 20x slower)")
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> LearningConfig:
    cfg = LearningConfig.quick() if args.quick else LearningConfig()
    over: dict[str, Any] = {}
    if args.size:
        over["size"] = args.size
    if args.tasks:
        over["tasks"] = tuple(t.strip() for t in args.tasks.split(",") if t.strip())
    if args.seeds is not None:
        over["seeds"] = args.seeds
    if args.budget is not None:
        over["budget"] = args.budget
    if args.methods:
        over["methods"] = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    if args.T:
        over["Ts"] = tuple(int(t) for t in args.T.split(","))
    for name in ("fraction", "lr_sparse", "lr_dense", "lr_backprop"):
        if getattr(args, name) is not None:
            over[name] = getattr(args, name)
    if args.no_extreme:
        over["extreme"] = False
    cfg = replace(cfg, **over)
    check_config(cfg)
    return cfg


def check_config(cfg: LearningConfig) -> None:
    bad = [m for m in cfg.methods if m not in METHODS]
    if bad:
        raise SystemExit(f"--methods: unknown {bad}; known: {list(METHODS)}")
    if cfg.seeds < 1:
        raise SystemExit(f"--seeds must be >= 1, got {cfg.seeds}")
    for T in cfg.Ts:
        if T < 1 or cfg.budget % T:
            raise SystemExit(f"--budget {cfg.budget} must be a positive multiple of every T, got T={T}")


# ---------------------------------------------------------------- the experiment grid


def _lr(cfg: LearningConfig, method: str) -> float:
    if method == "backprop-fedavg":
        return cfg.lr_backprop
    return cfg.lr_dense if method == "fedzo-dense" else cfg.lr_sparse


def runs_for(cfg: LearningConfig) -> list[tuple[str, str, int]]:
    """(setting, method, T) of every trained configuration (zero-shot is evaluated once per setting/seed)."""
    out = []
    for method in cfg.methods:
        if method == "zero-shot":
            continue
        for T in cfg.Ts:
            if method == "meerkat-vp" and T == 1:
                continue  # 1 local step already: identical to meerkat
            out.append(("dirichlet", method, T))
    if cfg.extreme:
        for method in ("meerkat", "meerkat-vp"):
            if method in cfg.methods:
                out.extend(("extreme", method, T) for T in cfg.Ts if T > 1)
    return out


class Runner:
    """Holds the model dir, masks and loaded models of one benchmark invocation."""

    def __init__(self, cfg: LearningConfig, workdir: Path) -> None:
        from bench.learning_masks import build_masks
        from bench.tinylm.pretrain import get_model_dir
        from shared.fingerprint import fingerprint_model_dir

        self.cfg, self.workdir = cfg, workdir
        self.model_dir = get_model_dir(cfg.size, progress=False)
        self.fingerprint = fingerprint_model_dir(self.model_dir)
        t0 = time.perf_counter()
        self.masks = build_masks(self.model_dir, self.fingerprint, cfg.fraction, seqs=cfg.calib_seqs,
                                 random_seeds=tuple(range(cfg.seeds)))
        self.mask_seconds = time.perf_counter() - t0
        self._loaded: dict[str, Any] = {}
        self._plain: Any = None

    def loaded(self, key: str) -> Any:
        from shared.modelload import load_model

        if key not in self._loaded:
            if key.startswith("random/"):  # keep one random model at a time
                for k in [k for k in self._loaded if k.startswith("random/")]:
                    del self._loaded[k]
            self._loaded[key] = load_model(self.model_dir, "none", "cpu", self.masks[key], fingerprint=self.fingerprint)
        return self._loaded[key]

    def plain(self) -> tuple[Any, dict[str, torch.Tensor]]:
        from transformers import AutoModelForCausalLM

        if self._plain is None:
            model: Any = AutoModelForCausalLM.from_pretrained(str(self.model_dir), dtype=torch.float32)
            model.eval()
            model.requires_grad_(False)
            self._plain = (model, snapshot(model))
        return self._plain  # type: ignore[no-any-return]

    def data(self, task: str, setting: str, seed: int) -> ClientData:
        tok = self.loaded("pretrain-grad").tokenizer
        n_single = self.cfg.n_single if setting == "extreme" else 0
        return make_data(task, self.workdir / f"{task}-{setting}-{seed}", tok, seed=derive_seed(seed, 4),
                         n_clients=self.cfg.n_clients, alpha=self.cfg.alpha, n_single=n_single,
                         n_train=self.cfg.n_train, n_eval=self.cfg.n_eval)

    def nnz(self, method: str, seed: int) -> int:
        if method == "backprop-fedavg":
            return sum(p.numel() for p in self.plain()[1].values())
        m = self.masks[self._mask_key(method, seed)]
        return int(m.nnz) if hasattr(m, "nnz") else sum(int(t.numel()) for t in m.values())

    @staticmethod
    def _mask_key(method: str, seed: int) -> str:
        key = ZO_MASK[method]
        return f"random/{seed}" if key == "random" else key

    def run(self, method: str, data: ClientData, T: int, seed: int) -> RunResult:
        cfg = self.cfg
        rounds = cfg.budget // T
        run_seed = derive_seed(seed, 100, T)  # directions and batch order: same for every method at (seed, T)
        if method == "backprop-fedavg":
            model, state = self.plain()
            restore(model, state)
            try:
                return run_backprop(model, data, BPSpec(rounds, T, cfg.lr_backprop, cfg.batch_size, run_seed, cfg.n_evals))
            finally:
                restore(model, state)
        key = self._mask_key(method, seed)
        loaded = self.loaded(key)
        mask = self.masks[key]
        grad = mask.flat_grad() if hasattr(mask, "flat_grad") else None
        spec = ZOSpec(rounds, T, _lr(cfg, method), cfg.eps, cfg.batch_size, run_seed,
                      vp=method == "meerkat-vp", n_evals=cfg.n_evals)
        mask_id = mask.mask_id if hasattr(mask, "mask_id") else "d" * 16
        return run_zo(loaded, data, spec, grad, mask_id=mask_id)

    def zero_shot(self, data: ClientData) -> float:
        model, state = self.plain()
        restore(model, state)
        return eval_accuracy(model, data.eval)


def run_grid(cfg: LearningConfig, workdir: Path, progress: bool = True) -> dict[str, Any]:
    """Every (task, setting, method, T, seed); returns the JSON result (rows + runs + VP calibration)."""
    from tqdm import tqdm

    t0 = time.perf_counter()
    runner = Runner(cfg, workdir)
    grid = runs_for(cfg)
    settings = sorted({s for s, _, _ in grid} | {"dirichlet"})
    runs: list[dict[str, Any]] = []
    total = len(cfg.tasks) * cfg.seeds * len(grid)
    bar = tqdm(total=total, desc="bench learning", unit="run", disable=not progress)
    for task in cfg.tasks:
        for seed in range(cfg.seeds):
            for setting in settings:
                data = runner.data(task, setting, seed)
                if "zero-shot" in cfg.methods:
                    acc = runner.zero_shot(data)
                    runs.append({"task": task, "setting": setting, "method": "zero-shot", "T": 0, "seed": seed,
                                 "accuracy": acc, "bytes_up": 0, "bytes_down": 0, "seconds": 0.0, "nnz": 0,
                                 "lr": 0.0, "curve": {"rounds": [0], "accuracy": [acc], "bytes": [0]}})
                for s, method, T in grid:
                    if s != setting:
                        continue
                    res = runner.run(method, data, T, seed)
                    row = {"task": task, "setting": setting, "method": method, "T": T, "seed": seed,
                           "nnz": runner.nnz(method, seed), "lr": _lr(cfg, method), **res.to_json()}
                    if res.gradip:
                        row["drift"] = _drift_rows(res, data)
                    runs.append(row)
                    bar.update(1)
                    bar.set_postfix(task=task, method=method, T=T, acc=f"{res.accuracy:.3f}")
    bar.close()
    return {"bench": "learning", "config": asdict(cfg), "model": {"size": cfg.size, "dir": str(runner.model_dir),
            "fingerprint": runner.fingerprint}, "mask_seconds": round(runner.mask_seconds, 2),
            "rows": summarize(runs), "runs": runs, "vp_calibration": vp_calibration(runs),
            "wall_s": round(time.perf_counter() - t0, 1), "threads": torch.get_num_threads()}


def _drift_rows(res: RunResult, data: ClientData) -> dict[str, dict[str, Any]]:
    """Per client: single-label or not, rho statistics with the default thresholds, GradIP length."""
    th = DriftThresholds()
    out = {}
    for c, hist in res.gradip.items():
        st = drift_stats(hist, th)
        counts = data.label_counts.get(c, [])
        out[c] = {"single_label": sum(1 for n in counts if n > 0) == 1, "n_steps": len(hist),
                  "rho_later": None if st is None or math.isinf(st.rho_later) else st.rho_later,
                  "rho_quie": None if st is None else st.rho_quie, "flagged": bool(st and st.flagged),
                  "limited_round": res.limited.get(c)}
    return out


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (task, setting, method, T): mean +- sample std of the final accuracy over seeds."""
    groups: dict[tuple[str, str, str, int], list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["task"], r["setting"], r["method"], r["T"]), []).append(r)
    rows = []
    for (task, setting, method, T), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], METHODS.index(kv[0][2]), kv[0][3])):
        accs = [r["accuracy"] for r in rs]
        rows.append({"task": task, "setting": setting, "method": method, "T": T, "n_seeds": len(rs),
                     "acc_mean": statistics.fmean(accs), "acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                     "accs": accs, "bytes": int(statistics.fmean(r["bytes_up"] + r["bytes_down"] for r in rs)),
                     "bytes_up": int(statistics.fmean(r["bytes_up"] for r in rs)),
                     "nnz": rs[0]["nnz"], "lr": rs[0]["lr"], "seconds": statistics.fmean(r["seconds"] for r in rs)})
    return rows


def vp_calibration(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """rho_later / rho_quie of single-label vs other clients over every run that recorded GradIP."""
    groups: dict[str, dict[str, list[float]]] = {"single": {"rho_later": [], "rho_quie": []},
                                                 "other": {"rho_later": [], "rho_quie": []}}
    for r in runs:
        for d in r.get("drift", {}).values():
            g = groups["single" if d["single_label"] else "other"]
            if d["rho_quie"] is not None:
                g["rho_quie"].append(d["rho_quie"])
                g["rho_later"].append(d["rho_later"] if d["rho_later"] is not None else math.inf)
    out: dict[str, Any] = {"thresholds": asdict(DriftThresholds())}
    for name, g in groups.items():
        out[name] = {k: _quantiles(v) for k, v in g.items()} | {"n": len(g["rho_quie"])}
    return out


def _quantiles(v: list[float]) -> dict[str, float] | None:
    if not v:
        return None
    s = sorted(v)

    def q(p: float) -> float:
        return s[min(len(s) - 1, int(p * (len(s) - 1) + 0.5))]

    return {"min": s[0], "p10": q(0.1), "median": q(0.5), "p90": q(0.9), "max": s[-1]}


# ---------------------------------------------------------------- report


def markdown_table(result: dict[str, Any]) -> str:
    lines = ["| task | setting | method | T | accuracy (mean ± std) | seeds | nnz | comm. bytes / run |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['task']} | {r['setting']} | {r['method']} | {r['T'] or '-'} | "
                     f"{r['acc_mean']:.3f} ± {r['acc_std']:.3f} | {r['n_seeds']} | {r['nnz'] or '-'} | "
                     f"{_fmt_bytes(r['bytes'])} |")
    return "\n".join(lines) + "\n"


def _fmt_bytes(n: int) -> str:
    for unit, k in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= k:
            return f"{n / k:.1f} {unit}"
    return f"{n} B"


def run(args: argparse.Namespace) -> int:
    from bench.cli import print_json_last
    from bench.learning_plots import plot_results

    cfg = config_from_args(args)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:  # -v shows them
        for name in ("coordinator.rounds", "edge_client.service.rounds"):  # ten simulated devices x every round
            logging.getLogger(name).setLevel(logging.WARNING)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="meerkat-learning-") as tmp:
        result = run_grid(cfg, Path(tmp))
    (out / "learning.json").write_text(json.dumps(result, indent=1, sort_keys=True, allow_nan=False) + "\n")
    table = markdown_table(result)
    (out / "learning.md").write_text(table)
    result["plots"] = [str(p) for p in plot_results(result, out)]
    print(table)
    print(f"wall {result['wall_s']} s; results in {out}")
    if args.json:
        print_json_last({k: v for k, v in result.items() if k != "runs"})
    return 0


__all__ = ["LearningConfig", "METHODS", "add_parser", "markdown_table", "run_grid", "runs_for", "summarize"]
