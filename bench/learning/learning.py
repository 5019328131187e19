"""`meerkat bench learning`: does sparse zeroth-order federated fine-tuning learn, and which mask wins?

    meerkat bench learning [--quick] [--json] [--out DIR] [--size small[,medium]] [--model-seed 0] [--tasks topic,news8]
                           [--seeds 3 [--first-seed 0]] [--budget 300] [--lrs DIR/lrs.json] [--resume] [--shard K/N]
                           [--extreme-methods meerkat,meerkat-vp]
    meerkat bench learning --tune [--size ...] [--tasks ...] [--tune-seeds 100,101] --out DIR [--resume]

In-process fleet (bench/inproc.py via bench/learning/sim.py: the product's round book, client cores and
engine step, messages through the codec, no MQTT) of 10 clients on the project's pretrained tiny LM
(`meerkat tiny-model`; `--model-seed N` pretrains another one from recipe seed N), labelled tasks from
bench/tinylm/tasks.py split with Dirichlet(alpha=0.5) label skew, plus an "extreme" split where 4 clients hold a single label. Every method gets the same budget of local
steps per client (rounds = budget / T):

    zero-shot         the pretrained model, no training
    backprop-fedavg   full fp32 model, T local AdamW steps, weights averaged (upper bound)
    fedzo-dense       SPSA on every decoder Linear weight, quantization none
    meerkat           SPSA on the pretrain-gradient mask (coordinator.mask.builder)
    weight-magnitude  SPSA on the top-|w| mask
    random-mask       SPSA on a random mask (new mask per seed)
    meerkat-vp        meerkat + coordinator.drift: drifting clients run 1 local step (T=10 only: at T=1
                      it is meerkat)

Cells: every (size, task, split, method, T, seed, lr) run is written to DIR/cells/<sha256 of its full
config>.json with its wall time; `--resume` reuses finished cells, so a long grid completes over several
invocations, and `--shard K/N` lets N processes share one DIR (then one `--resume` run gathers them).
`--tune` applies the lr rule (bench/learning/cells.py: each method's lr grid on tuning seeds disjoint
from the evaluation seeds; best mean final accuracy among stable lrs, ties to the one whose curve learns
sooner) and writes DIR/lrs.json + lrs.md; the
grid reads it with `--lrs`. Without `--lrs` the defaults below apply (the demo sweep).

Output under --out: learning.json (every run, its curve, bytes, wall time; machine and load average;
"targets": the learning targets of BENCHMARKS.md at T = 10 per size and task: met, not met, missing),
learning.md (the table and the targets), learning_rounds*.png / learning_bytes*.png (per size and split),
learning_gap.png (MEERKAT - dense FedZO vs dense parameter count across sizes), learning_gradip.png
(GradIP of single-label vs other devices). With --json the JSON summary is the last stdout line.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from bench.learning.cells import (
    LR_GRID,
    CellCache,
    LrRule,
    cell_key,
    choose_lr,
    load_lrs,
    lr_markdown,
    lr_table_key,
)
from bench.learning.sim import (
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
    """One benchmark invocation on one model size. Default lrs: the demo sweep on seed 100 (BENCHMARKS.md);
    `--lrs` (from `--tune`) replaces them per (task, method) through `lr_table`."""

    size: str = "demo"  # tiny-model size
    model_seed: int = 0  # its recipe seed (`meerkat tiny-model --seed`): another seed, another pretrained model
    tasks: tuple[str, ...] = ("topic", "sentiment", "claim")
    seeds: int = 3  # evaluation seeds first_seed..first_seed+seeds-1
    first_seed: int = 0
    tune_seeds: tuple[int, ...] = (100, 101)  # the lr rule's seeds: disjoint from the evaluation seeds
    Ts: tuple[int, ...] = (1, 10)
    budget: int = 300  # local steps per client (rounds = budget / T): past saturation, GradIP has time to decay
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
    lr_table: tuple[tuple[str, float], ...] = ()  # ("task/method", lr) from --lrs: overrides the three above
    lr_modes: tuple[str, ...] = ("tuned",)  # --lr: tuned | auto | auto@Nx | Nx (ZO methods; see lr_of)
    n_evals: int = 10  # eval points per run (curves)
    calib_seqs: int = 64  # pre-training-like sequences (x 128 tokens) backpropagated for the MEERKAT mask
    methods: tuple[str, ...] = METHODS
    extreme: bool = True  # also run the extreme (single-label devices) split
    extreme_methods: tuple[str, ...] = METHODS  # the methods run on it
    thresholds: DriftThresholds = field(default_factory=DriftThresholds)  # MEERKAT-VP detector

    @classmethod
    def quick(cls) -> LearningConfig:
        return cls(tasks=("topic",), budget=40, n_evals=4, extreme_methods=("meerkat", "meerkat-vp"))


def add_parser(sub: Any) -> None:
    p = sub.add_parser("learning", help="federated learning quality: ZO masks vs dense vs backprop, plots + table",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="one task (topic), budget 40 steps per client")
    p.add_argument("--json", action="store_true", help="print the JSON summary as the last stdout line")
    p.add_argument("--out", default="bench-learning", help="dir for learning.json/.md, the PNG plots and cells/")
    p.add_argument("--size", default=None, help="tiny-model size, or a comma list (default demo)")
    p.add_argument("--model-seed", type=int, default=None,
                   help="the tiny model's recipe seed (default 0): another seed pretrains (once, cached) another "
                        "model of the same size; its cells are its own (their key holds the model's fingerprint)")
    p.add_argument("--tasks", default=None, help="comma list of tasks (bench/tinylm/tasks.py: topic, sentiment, ...)")
    p.add_argument("--seeds", type=int, default=None, help="evaluation seeds K..K+N-1 (>= 1; K = --first-seed)")
    p.add_argument("--first-seed", type=int, default=None,
                   help="K, the first evaluation seed (default 0; a cell's cache key holds its own seed, so "
                        "`--first-seed 1 --seeds 2` computes the cells `--seeds 3` reads for seeds 1 and 2)")
    p.add_argument("--budget", type=int, default=None, help="local steps per client (multiple of every T)")
    p.add_argument("--methods", default=None, help=f"comma list from {','.join(METHODS)}")
    p.add_argument("--T", default=None, help="comma list of local steps per round (default 1,10)")
    p.add_argument("--fraction", type=float, default=None, help="mask fraction of the decoder Linear weights")
    p.add_argument("--lr-sparse", type=float, default=None)
    p.add_argument("--lr-dense", type=float, default=None)
    p.add_argument("--lr-backprop", type=float, default=None)
    p.add_argument("--lr", default=None, dest="lr_modes",
                   help="comma list of lr modes of the ZO methods, each its own rows: tuned (the method's lr, the "
                        "default), auto (the coordinator's controller, lr = \"auto\"), auto@Nx (the controller "
                        "started at N x the tuned lr), Nx (fixed N x the tuned lr)")
    p.add_argument("--lrs", default=None, help="lrs.json from --tune: the lr of every (size, task, method)")
    p.add_argument("--tune", action="store_true",
                   help="run the lr rule instead of the grid: writes OUT/lrs.json and lrs.md (bench/learning/cells.py)")
    p.add_argument("--tune-seeds", default=None, help="comma list of tuning seeds (default 100,101; not < --seeds)")
    p.add_argument("--resume", action="store_true", help="reuse finished cells under OUT/cells (same config hash)")
    p.add_argument("--shard", default=None, help="K/N: compute every N-th cell from the K-th (parallel processes)")
    p.add_argument("--no-extreme", action="store_true", help="skip the single-label (MEERKAT-VP) setting")
    p.add_argument("--extreme-methods", default=None,
                   help="comma list of the methods also run on the single-label split (default: every method; "
                        "--quick: meerkat,meerkat-vp)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: on a shared 2-core box 2 threads oversubscribe and run 20x slower)")
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace, size: str | None = None) -> LearningConfig:
    cfg = LearningConfig.quick() if args.quick else LearningConfig()
    over: dict[str, Any] = {}
    if size:
        over["size"] = size
    if getattr(args, "model_seed", None) is not None:
        over["model_seed"] = args.model_seed
    if args.tasks:
        over["tasks"] = tuple(t.strip() for t in args.tasks.split(",") if t.strip())
    if args.seeds is not None:
        over["seeds"] = args.seeds
    if getattr(args, "first_seed", None) is not None:
        over["first_seed"] = args.first_seed
    if getattr(args, "tune_seeds", None):
        over["tune_seeds"] = tuple(int(t) for t in args.tune_seeds.split(","))
    if args.budget is not None:
        over["budget"] = args.budget
    if args.methods:
        over["methods"] = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    if args.T:
        over["Ts"] = tuple(int(t) for t in args.T.split(","))
    for name in ("fraction", "lr_sparse", "lr_dense", "lr_backprop"):
        if getattr(args, name) is not None:
            over[name] = getattr(args, name)
    if getattr(args, "lr_modes", None):
        over["lr_modes"] = tuple(m.strip() for m in args.lr_modes.split(",") if m.strip())
    if args.no_extreme:
        over["extreme"] = False
    if getattr(args, "extreme_methods", None):
        over["extreme_methods"] = tuple(m.strip() for m in args.extreme_methods.split(",") if m.strip())
    cfg = replace(cfg, **over)
    if getattr(args, "lrs", None):
        cfg = replace(cfg, lr_table=tuple(sorted(load_lrs(Path(args.lrs), cfg.size).items())))
    check_config(cfg)
    return cfg


def parse_shard(text: str | None) -> tuple[int, int]:
    if not text:
        return (0, 1)
    try:
        k, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise SystemExit(f"--shard: expected K/N with integers, got {text!r}") from None
    if not 0 <= k < n:
        raise SystemExit(f"--shard {text}: need 0 <= K < N")
    return (k, n)


def eval_seeds(cfg: LearningConfig) -> range:
    """The evaluation seeds: --first-seed K .. K + --seeds - 1."""
    return range(cfg.first_seed, cfg.first_seed + cfg.seeds)


def check_config(cfg: LearningConfig) -> None:
    for flag, methods in (("--methods", cfg.methods), ("--extreme-methods", cfg.extreme_methods)):
        bad = [m for m in methods if m not in METHODS]
        if bad:
            raise SystemExit(f"{flag}: unknown {bad}; known: {list(METHODS)}")
    if cfg.seeds < 1:
        raise SystemExit(f"--seeds must be >= 1, got {cfg.seeds}")
    if cfg.first_seed < 0:
        raise SystemExit(f"--first-seed must be >= 0, got {cfg.first_seed}")
    if not 0 <= cfg.model_seed < 2**64:
        raise SystemExit(f"--model-seed must be in [0, 2**64), got {cfg.model_seed}")
    for mode in cfg.lr_modes:
        try:
            lr_of(mode, 1e-3)
        except ValueError as e:
            raise SystemExit(f"--lr: {e}") from None
    for T in cfg.Ts:
        if T < 1 or cfg.budget % T:
            raise SystemExit(f"--budget {cfg.budget} must be a positive multiple of every T, got T={T}")


# ---------------------------------------------------------------- the experiment grid


def lr_for(cfg: LearningConfig, task: str, method: str) -> float:
    """The tuned lr of (task, method) from `--lrs` when there is one, else the config's default."""
    table = dict(cfg.lr_table)
    if f"{task}/{method}" in table:
        return table[f"{task}/{method}"]
    if method == "backprop-fedavg":
        return cfg.lr_backprop
    return cfg.lr_dense if method == "fedzo-dense" else cfg.lr_sparse


def lr_of(mode: str, tuned: float) -> float | str:
    """The lr a cell runs with in lr mode `mode` (--lr) given the method's tuned lr: tuned -> tuned, auto ->
    "auto", auto@4x -> "auto@<4 x tuned>" (the controller started there), 4x -> 4 x tuned (fixed)."""
    try:
        if mode == "tuned":
            return tuned
        if mode == "auto":
            return "auto"
        if mode.startswith("auto@") and mode.endswith("x"):
            return f"auto@{float(mode[5:-1]) * tuned:g}"
        if mode.endswith("x"):
            return float(mode[:-1]) * tuned
    except ValueError:
        pass
    raise ValueError(f"lr mode {mode!r}: expected tuned, auto, auto@Nx or Nx (N a number)")


def runs_for(cfg: LearningConfig) -> list[tuple[str, str, int]]:
    """(setting, method, T) of every trained configuration (zero-shot is evaluated once per setting/seed)."""
    out = []
    for setting, methods in (("dirichlet", cfg.methods), ("extreme", cfg.extreme_methods if cfg.extreme else ())):
        for method in methods:
            if method == "zero-shot" or method not in cfg.methods:
                continue
            for T in cfg.Ts:
                if method == "meerkat-vp" and T == 1:
                    continue  # 1 local step already: identical to meerkat
                out.append((setting, method, T))
    return out


def cell_fields(cfg: LearningConfig, fingerprint: str, task: str, setting: str, method: str, T: int, seed: int,
                lr: float | str) -> dict[str, Any]:
    """Everything that shapes one cell's result: its cache key is the hash of this (bench/learning/cells.py)."""
    f: dict[str, Any] = {"size": cfg.size, "fingerprint": fingerprint, "task": task, "setting": setting,
                         "method": method, "seed": seed, "n_clients": cfg.n_clients, "alpha": cfg.alpha,
                         "n_train": cfg.n_train, "n_eval": cfg.n_eval}
    if setting == "extreme":
        f["n_single"] = cfg.n_single
    if method != "zero-shot":
        f |= {"T": T, "lr": lr, "budget": cfg.budget, "batch_size": cfg.batch_size, "n_evals": cfg.n_evals}
    if method in ZO_MASK:
        f |= {"eps": cfg.eps, "fraction": cfg.fraction}
    if ZO_MASK.get(method) == "pretrain-grad":
        f |= {"calib_seqs": cfg.calib_seqs, "thresholds": asdict(cfg.thresholds)}
    return f


class Runner:
    """Holds the model dir, masks and loaded models of one benchmark invocation (masks built on first use)."""

    def __init__(self, cfg: LearningConfig, workdir: Path) -> None:
        from bench.tinylm.pretrain import get_model_dir
        from shared.fingerprint import fingerprint_model_dir

        self.cfg, self.workdir = cfg, workdir
        self.model_dir = get_model_dir(cfg.size, cfg.model_seed, progress=False)
        self.fingerprint = fingerprint_model_dir(self.model_dir)
        self.mask_seconds = 0.0
        self._masks: dict[str, Any] | None = None
        self._loaded: dict[str, Any] = {}
        self._plain: Any = None
        self._data: dict[tuple[str, str, int], ClientData] = {}

    @property
    def masks(self) -> dict[str, Any]:
        from bench.learning.masks import build_masks

        if self._masks is None:
            t0 = time.perf_counter()
            seeds = tuple(sorted(set(eval_seeds(self.cfg)) | set(self.cfg.tune_seeds)))
            self._masks = build_masks(self.model_dir, self.fingerprint, self.cfg.fraction, seqs=self.cfg.calib_seqs,
                                      random_seeds=seeds)
            self.mask_seconds = time.perf_counter() - t0
        return self._masks

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
        """The split (written on first use; the last one is kept)."""
        key = (task, setting, seed)
        if key not in self._data:
            tok = self.loaded("pretrain-grad").tokenizer
            n_single = self.cfg.n_single if setting == "extreme" else 0
            self._data = {key: make_data(task, self.workdir / f"{task}-{setting}-{seed}", tok,
                                         seed=derive_seed(seed, 4), n_clients=self.cfg.n_clients,
                                         alpha=self.cfg.alpha, n_single=n_single, n_train=self.cfg.n_train,
                                         n_eval=self.cfg.n_eval)}
        return self._data[key]

    def nnz(self, method: str, seed: int) -> int:
        if method == "backprop-fedavg":
            return sum(p.numel() for p in self.plain()[1].values())
        m = self.masks[self._mask_key(method, seed)]
        return int(m.nnz) if hasattr(m, "nnz") else sum(int(t.numel()) for t in m.values())

    @staticmethod
    def _mask_key(method: str, seed: int) -> str:
        key = ZO_MASK[method]
        return f"random/{seed}" if key == "random" else key

    def run(self, method: str, data: ClientData, T: int, seed: int, lr: float | str) -> RunResult:
        cfg = self.cfg
        rounds = cfg.budget // T
        run_seed = derive_seed(seed, 100, T)  # directions and batch order: same for every method at (seed, T)
        if method == "backprop-fedavg":
            if isinstance(lr, str):
                raise ValueError(f"backprop-fedavg takes a fixed lr, not {lr!r}")
            model, state = self.plain()
            restore(model, state)
            try:
                return run_backprop(model, data, BPSpec(rounds, T, lr, cfg.batch_size, run_seed, cfg.n_evals))
            finally:
                restore(model, state)
        key = self._mask_key(method, seed)
        loaded = self.loaded(key)
        mask = self.masks[key]
        grad = mask.flat_grad() if hasattr(mask, "flat_grad") else None
        spec = ZOSpec(rounds, T, lr, cfg.eps, cfg.batch_size, run_seed, vp=method == "meerkat-vp",
                      n_evals=cfg.n_evals, thresholds=cfg.thresholds)
        mask_id = mask.mask_id if hasattr(mask, "mask_id") else "d" * 16
        try:
            return run_zo(loaded, data, spec, grad, mask_id=mask_id)
        finally:
            loaded.sidecar.set_values(loaded.sidecar.initial_values())

    def zero_shot(self, data: ClientData) -> float:
        model, state = self.plain()
        restore(model, state)
        return eval_accuracy(model, data.eval)

    def cell(self, cache: CellCache | None, task: str, setting: str, method: str, T: int, seed: int,
             lr: float | str, compute: bool = True, lr_mode: str = "tuned") -> dict[str, Any] | None:
        """One cell's row: from the cache (`--resume`) or computed and written there. None: not finished
        and `compute` is off (another shard's cell)."""
        fields = cell_fields(self.cfg, self.fingerprint, task, setting, method, T, seed, lr)
        key = cell_key(fields)
        if cache is not None and (row := cache.get(key)) is not None:
            return row | {"cached": True, "lr_mode": lr_mode}
        if not compute:
            return None
        t0 = time.perf_counter()
        data = self.data(task, setting, seed)
        base = {"size": self.cfg.size, "task": task, "setting": setting, "method": method, "seed": seed, "key": key,
                "lr_mode": lr_mode}
        if method == "zero-shot":
            acc = self.zero_shot(data)
            row = base | {"T": 0, "accuracy": acc, "bytes_up": 0, "bytes_down": 0, "seconds": 0.0, "nnz": 0,
                          "lr": 0.0, "final_loss": 0.0, "curve": {"rounds": [0], "accuracy": [acc], "bytes": [0]}}
        else:
            res = self.run(method, data, T, seed, lr)
            row = base | {"T": T, "nnz": self.nnz(method, seed), "lr": lr, **res.to_json()}
            if not math.isfinite(res.final_loss):
                row["final_loss"] = None  # JSON has no NaN; run_stable reads None as diverged
            if res.gradip:
                row["drift"] = _drift_rows(res, data, self.cfg.thresholds)
                row["gradip"] = {c: [round(h, 6) for h in v] for c, v in res.gradip.items()}
        row["wall_s"] = round(time.perf_counter() - t0, 2)
        if cache is not None:
            cache.put(key, fields, row)
        return row | {"cached": False}


def _cells(cfg: LearningConfig) -> list[tuple[str, str, str, int, int, str]]:
    """(task, setting, method, T, seed, lr mode) of the evaluation grid, in run order (zero-shot first per
    split; the lr modes other than tuned only for the ZO methods)."""
    grid = runs_for(cfg)
    settings = sorted({s for s, _, _ in grid} | {"dirichlet"})
    out = []
    for task in cfg.tasks:
        for seed in eval_seeds(cfg):
            for setting in settings:
                if "zero-shot" in cfg.methods:
                    out.append((task, setting, "zero-shot", 0, seed, "tuned"))
                out.extend((task, setting, m, T, seed, mode) for s, m, T in grid if s == setting
                           for mode in (cfg.lr_modes if m in ZO_MASK else ("tuned",)))  # fmt: skip
    return out


def run_grid(cfg: LearningConfig, workdir: Path, progress: bool = True, cells_dir: Path | None = None,
             resume: bool = False, shard: tuple[int, int] = (0, 1)) -> dict[str, Any]:
    """Every (task, setting, method, T, seed) cell; returns the JSON result (rows + runs + VP calibration).

    `cells_dir`: cache every finished cell there; `resume`: reuse the finished ones. `shard=(k, n)`:
    compute only the k-th of every n cells (others are read when finished, else left out)."""
    from tqdm import tqdm

    t0 = time.perf_counter()
    runner = Runner(cfg, workdir)
    cfg = runner.cfg = known_tasks(cfg, runner.model_dir)
    cache = CellCache(cells_dir, resume) if cells_dir is not None else None
    cells = _cells(cfg)
    runs: list[dict[str, Any]] = []
    missing = 0
    bar = tqdm(total=len(cells), desc=f"bench learning {cfg.size}", unit="cell", disable=not progress)
    for i, (task, setting, method, T, seed, mode) in enumerate(cells):
        row = runner.cell(cache, task, setting, method, T, seed, lr_of(mode, lr_for(cfg, task, method)),
                          compute=i % shard[1] == shard[0], lr_mode=mode)
        bar.update(1)
        if row is None:
            missing += 1
            continue
        runs.append(row)
        bar.set_postfix(task=task, method=method, T=T, acc=f"{row['accuracy']:.3f}")
    bar.close()
    return {"bench": "learning", "config": _config_json(cfg), "model": {"size": cfg.size,
            "seed": cfg.model_seed, "dir": str(runner.model_dir), "fingerprint": runner.fingerprint},
            "mask_seconds": round(runner.mask_seconds, 2), "rows": summarize(runs), "runs": runs,
            "vp_calibration": vp_calibration(runs, cfg.thresholds),
            "cells": {"total": len(cells), "cached": sum(1 for r in runs if r["cached"]),
                      "computed": sum(1 for r in runs if not r["cached"]), "missing": missing},
            "wall_s": round(time.perf_counter() - t0, 1), "threads": torch.get_num_threads(), **machine()}


def run_tune(cfg: LearningConfig, workdir: Path, progress: bool = True, cells_dir: Path | None = None,
             resume: bool = False, rule: LrRule | None = None,
             grid: dict[str, tuple[float, ...]] | None = None, shard: tuple[int, int] = (0, 1)) -> dict[str, Any]:
    """The lr rule (bench/learning/cells.py): each method's lr grid on the tuning seeds, Dirichlet split,
    T = max(Ts), the grid's budget; returns {"chosen": {"size/task/method": ...}, ...}. With `shard`, cells
    of other shards that are not finished yet leave "chosen" empty and count in "missing"."""
    from tqdm import tqdm

    rule = rule or LrRule()
    seeds = eval_seeds(cfg)
    overlap = set(cfg.tune_seeds) & set(seeds)
    if overlap:
        raise SystemExit(f"tuning seeds {sorted(overlap)} are also evaluation seeds {seeds.start}..{seeds.stop - 1}: "
                         "choose --tune-seeds outside them")
    t0 = time.perf_counter()
    runner = Runner(cfg, workdir)
    cfg = runner.cfg = known_tasks(cfg, runner.model_dir)
    cache = CellCache(cells_dir, resume) if cells_dir is not None else None
    T = max(cfg.Ts)
    grid = LR_GRID if grid is None else grid
    methods = [m for m in cfg.methods if m in grid]
    todo = [(task, m, lr, s) for task in cfg.tasks for m in methods for lr in grid[m] for s in cfg.tune_seeds]
    bar = tqdm(total=len(todo), desc=f"bench learning --tune {cfg.size}", unit="cell", disable=not progress)
    by: dict[tuple[str, str], dict[float, list[dict[str, Any]]]] = {}
    missing = 0
    for i, (task, m, lr, s) in enumerate(todo):
        row = runner.cell(cache, task, "dirichlet", m, T, s, lr, compute=i % shard[1] == shard[0])
        bar.update(1)
        if row is None:
            missing += 1
            continue
        by.setdefault((task, m), {}).setdefault(lr, []).append(row)
        bar.set_postfix(task=task, method=m, lr=lr, acc=f"{row['accuracy']:.3f}")
    bar.close()
    chosen = {} if missing else {lr_table_key(cfg.size, task, m): choose_lr(rows, rule) for (task, m), rows in by.items()}
    return {"bench": "learning-tune", "missing": missing, "rule": asdict(rule), "tuning_seeds": list(cfg.tune_seeds), "T": T,
            "setting": "dirichlet", "budget": cfg.budget, "chosen": chosen, "config": _config_json(cfg),
            "wall_s": round(time.perf_counter() - t0, 1), **machine()}


def known_tasks(cfg: LearningConfig, model_dir: Path) -> LearningConfig:
    """Drop the tasks this model was not pretrained for (demo has no news8/polarity/nli), with a warning;
    a size list shares one --tasks list."""
    from bench.tinylm.pretrain import model_tasks

    known = set(model_tasks(model_dir))
    keep = tuple(t for t in cfg.tasks if t in known)
    if not keep:
        raise SystemExit(f"--tasks {','.join(cfg.tasks)}: none is a task of the {cfg.size} model ({sorted(known)})")
    if keep != cfg.tasks:
        log.warning("size %s: skipping tasks %s (not in its corpus)", cfg.size, [t for t in cfg.tasks if t not in keep])
    return replace(cfg, tasks=keep)


def _config_json(cfg: LearningConfig) -> dict[str, Any]:
    d = asdict(cfg)
    d["lr_table"] = dict(cfg.lr_table)
    return d


def machine() -> dict[str, Any]:
    """Where the numbers came from: CPU count, load average at the end, platform."""
    import os
    import platform

    return {"machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                        "cpus": os.cpu_count(), "loadavg": [round(x, 2) for x in os.getloadavg()],
                        "torch": torch.__version__}}


def _drift_rows(res: RunResult, data: ClientData, th: DriftThresholds) -> dict[str, dict[str, Any]]:
    """Per client: single-label or not, rho statistics with the run's thresholds, GradIP length."""
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
    """One row per (task, setting, method, T, lr mode): mean +- sample std of the final accuracy over seeds."""
    groups: dict[tuple[str, str, str, str, int, str], list[dict[str, Any]]] = {}
    for r in runs:
        key = (r.get("size", "?"), r["task"], r["setting"], r["method"], r["T"], r.get("lr_mode", "tuned"))
        groups.setdefault(key, []).append(r)
    rows = []
    order = sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2], METHODS.index(kv[0][3]), kv[0][4],
                                                   kv[0][5] != "tuned", kv[0][5]))  # fmt: skip
    for (size, task, setting, method, T, mode), rs in order:
        accs = [r["accuracy"] for r in rs]
        rows.append({"size": size, "task": task, "setting": setting, "method": method, "T": T, "lr_mode": mode,
                     "n_seeds": len(rs),
                     "acc_mean": statistics.fmean(accs), "acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                     "accs": accs, "bytes": int(statistics.fmean(r["bytes_up"] + r["bytes_down"] for r in rs)),
                     "bytes_up": int(statistics.fmean(r["bytes_up"] for r in rs)),
                     "nnz": rs[0]["nnz"], "lr": rs[0]["lr"], "seconds": statistics.fmean(r["seconds"] for r in rs),
                     "wall_s": math.fsum(r.get("wall_s", 0.0) for r in rs)})
    return rows


def vp_calibration(runs: list[dict[str, Any]], th: DriftThresholds) -> dict[str, Any]:
    """rho_later / rho_quie of single-label vs other clients over every run that recorded GradIP."""
    groups: dict[str, dict[str, list[float]]] = {"single": {"rho_later": [], "rho_quie": []},
                                                 "other": {"rho_later": [], "rho_quie": []}}
    for r in runs:
        for d in r.get("drift", {}).values():
            g = groups["single" if d["single_label"] else "other"]
            if d["rho_quie"] is not None:
                g["rho_quie"].append(d["rho_quie"])
                g["rho_later"].append(d["rho_later"] if d["rho_later"] is not None else math.inf)
    out: dict[str, Any] = {"thresholds": asdict(th)}
    for name, g in groups.items():
        out[name] = {k: _quantiles(v) for k, v in g.items()} | {"n": len(g["rho_quie"])}
    return out


TARGET_T = 10  # the targets are stated at T = 10


def targets(rows: list[dict[str, Any]], runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The learning targets per (size, task), from the T = 10 means over seeds (value None, met None where
    a cell is missing): MEERKAT >= dense FedZO + 3 points and above both other masks on the Dirichlet
    split; MEERKAT-VP on the extreme split >= 90% of MEERKAT on Dirichlet; MEERKAT >= 90% of backprop's
    gain over zero-shot; MEERKAT-VP flags on single-label devices >= flags on the others (the grid records
    who was flagged, not who diverged, so single-label stands in for "true")."""
    acc = {(r["size"], r["task"], r["setting"], r["method"], r["T"]): r["acc_mean"] for r in rows}
    out: list[dict[str, Any]] = []
    for size, task in sorted({(r["size"], r["task"]) for r in rows}):
        a = {(setting, m): acc.get((size, task, setting, m, 0 if m == "zero-shot" else TARGET_T))
             for setting in ("dirichlet", "extreme") for m in METHODS}
        mk, zero = a["dirichlet", "meerkat"], a["dirichlet", "zero-shot"]
        # (check, value, goal, threshold, strict)
        checks: list[tuple[str, float | None, str, float, bool]] = [
            ("meerkat - fedzo-dense (Dirichlet)", _diff(mk, a["dirichlet", "fedzo-dense"]), ">= +0.03", 0.03, False),
            ("meerkat - weight-magnitude (Dirichlet)", _diff(mk, a["dirichlet", "weight-magnitude"]), "> 0", 0.0, True),
            ("meerkat - random-mask (Dirichlet)", _diff(mk, a["dirichlet", "random-mask"]), "> 0", 0.0, True),
            ("meerkat-vp extreme / meerkat Dirichlet", _share(a["extreme", "meerkat-vp"], mk, 0.0), ">= 0.90", 0.9,
             False),
            ("(meerkat - zero-shot) / (backprop - zero-shot)", _share(mk, a["dirichlet", "backprop-fedavg"], zero),
             ">= 0.90", 0.9, False),
        ]
        for name, value, goal, cut, strict in checks:
            met = None if value is None else bool(value > cut if strict else value >= cut)
            out.append({"size": size, "task": task, "check": name, "value": value, "goal": goal, "met": met})
        vp = [r for r in runs
              if (r.get("size", "?"), r["task"], r["method"], r["T"]) == (size, task, "meerkat-vp", TARGET_T)]
        flagged = [d["single_label"] for r in vp for d in r.get("drift", {}).values()
                   if d.get("limited_round") is not None]
        single, other = sum(flagged), len(flagged) - sum(flagged)
        out.append({"size": size, "task": task, "check": "meerkat-vp flags: single-label / other devices",
                    "value": [single, other] if vp else None, "goal": "other <= single-label",
                    "met": other <= single if vp else None})
    return out


def _diff(x: float | None, y: float | None) -> float | None:
    return None if x is None or y is None else x - y


def _share(x: float | None, y: float | None, base: float | None) -> float | None:
    """(x - base) / (y - base); None when a value is missing or y is not above base."""
    if x is None or y is None or base is None or y - base <= 0:
        return None
    return (x - base) / (y - base)


def targets_markdown(checks: list[dict[str, Any]]) -> str:
    lines = [f"Targets (T = {TARGET_T}, means over seeds):", "",
             "| size | task | check | value | goal | met |", "|---|---|---|---|---|---|"]
    for c in checks:
        v = c["value"]
        if v is None:
            text = "missing"
        elif isinstance(v, list):
            text = f"{v[0]} / {v[1]}"
        else:
            text = f"{v:+.3f}" if c["check"].startswith("meerkat - ") else f"{v:.3f}"
        met = "-" if c["met"] is None else ("yes" if c["met"] else "**no**")
        lines.append(f"| {c['size']} | {c['task']} | {c['check']} | {text} | {c['goal']} | {met} |")
    return "\n".join(lines) + "\n"


def _quantiles(v: list[float]) -> dict[str, float] | None:
    if not v:
        return None
    s = sorted(v)

    def q(p: float) -> float:
        return s[min(len(s) - 1, int(p * (len(s) - 1) + 0.5))]

    return {"min": s[0], "p10": q(0.1), "median": q(0.5), "p90": q(0.9), "max": s[-1]}


# ---------------------------------------------------------------- report


def markdown_table(result: dict[str, Any]) -> str:
    lines = ["| size | task | setting | method | T | lr | accuracy (mean ± std) | seeds | nnz | comm. bytes / run "
             "| wall s (all seeds) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lr = r["lr"] if isinstance(r["lr"], str) else format(r["lr"], "g") if r["lr"] else "-"
        lines.append(f"| {r['size']} | {r['task']} | {r['setting']} | {r['method']} | {r['T'] or '-'} | "
                     f"{lr} | {r['acc_mean']:.3f} ± {r['acc_std']:.3f} | {r['n_seeds']} | "
                     f"{r['nnz'] or '-'} | {_fmt_bytes(r['bytes'])} | {r.get('wall_s', 0.0):.0f} |")
    return "\n".join(lines) + "\n"


def _fmt_bytes(n: int) -> str:
    for unit, k in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= k:
            return f"{n / k:.1f} {unit}"
    return f"{n} B"


def run(args: argparse.Namespace) -> int:
    """`meerkat bench learning`; the round loggers' levels it quiets are put back when it returns (a test
    or a caller in the same process keeps its own logging)."""
    quiet = ("coordinator.rounds", "edge_client.service.rounds")  # ten simulated devices x every round
    levels = {name: logging.getLogger(name).level for name in quiet}
    try:
        return _run(args, quiet)
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def _run(args: argparse.Namespace, quiet: tuple[str, ...]) -> int:
    from bench.cli import print_json_last
    from bench.learning.plots import plot_results

    sizes = [x.strip() for x in (args.size or "demo").split(",") if x.strip()]
    cfgs = [config_from_args(args, size) for size in sizes]
    shard = parse_shard(args.shard)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:  # -v shows them
        for name in quiet:
            logging.getLogger(name).setLevel(logging.WARNING)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cells = out / "cells"
    with tempfile.TemporaryDirectory(prefix="meerkat-learning-") as tmp:
        if args.tune:
            docs = [run_tune(cfg, Path(tmp) / cfg.size, cells_dir=cells, resume=args.resume, shard=shard)
                    for cfg in cfgs]
            doc = {**docs[0], "chosen": {k: v for d in docs for k, v in d["chosen"].items()},
                   "wall_s": round(sum(d["wall_s"] for d in docs), 1), "missing": sum(d["missing"] for d in docs)}
            if doc["missing"]:
                print(f"{doc['missing']} tuning cells left to other shards: run --tune --resume once they finish")
                return 0
            (out / "lrs.json").write_text(json.dumps(doc, indent=1, sort_keys=True, allow_nan=False) + "\n")
            (out / "lrs.md").write_text(lr_markdown(doc))
            print(lr_markdown(doc))
            print(f"wall {doc['wall_s']} s; chosen lrs in {out / 'lrs.json'} (pass it to the grid with --lrs)")
            if args.json:
                print_json_last({k: v for k, v in doc.items() if k != "config"})
            return 0
        results = [run_grid(cfg, Path(tmp) / cfg.size, cells_dir=cells, resume=args.resume, shard=shard)
                   for cfg in cfgs]
    result = merge_results(results)
    (out / "learning.json").write_text(json.dumps(result, indent=1, sort_keys=True, allow_nan=False) + "\n")
    tuned = [r for r in result["rows"] if r.get("lr_mode", "tuned") == "tuned"]
    result["targets"] = targets(tuned, [r for r in result["runs"] if r.get("lr_mode", "tuned") == "tuned"])
    table = markdown_table(result) + "\n" + targets_markdown(result["targets"])
    (out / "learning.md").write_text(table)
    result["plots"] = [str(p) for p in plot_results(result, out)]
    print(table)
    c = result["cells"]
    print(f"wall {result['wall_s']} s; cells: {c['computed']} computed, {c['cached']} cached, {c['missing']} left "
          f"to other shards; results in {out}")
    if args.json:
        print_json_last({k: v for k, v in result.items() if k != "runs"})
    return 0


def merge_results(results: list[dict[str, Any]]) -> dict[str, Any]:
    """One result over several model sizes (the first size's config; `sizes` lists them all)."""
    if len(results) == 1:
        return results[0] | {"sizes": [results[0]["config"]["size"]]}
    runs = [r for res in results for r in res["runs"]]
    first = results[0]
    return first | {"runs": runs, "rows": summarize(runs), "sizes": [r["config"]["size"] for r in results],
                    "models": [r["model"] for r in results],
                    "vp_calibration": vp_calibration(runs, DriftThresholds(**first["config"]["thresholds"])),
                    "cells": {k: sum(r["cells"][k] for r in results) for k in first["cells"]},
                    "wall_s": round(sum(r["wall_s"] for r in results), 1)}


__all__ = ["LearningConfig", "METHODS", "add_parser", "cell_fields", "lr_for", "markdown_table", "merge_results",
           "run_grid", "run_tune", "runs_for", "summarize", "targets", "targets_markdown"]
