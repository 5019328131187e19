"""`meerkat bench attacks`: can one valid device (or three colluding) steer the model? (issue 26)

    meerkat bench attacks [--json] [--out DIR] [--seeds 3] [--rounds R] [--steps T] [--task topic]
                          [--lr 0.05|auto|auto@X] [--model-dir DIR] [--attacks ratchet,scaling,...] [--hostile 1,3]
                          [--rules fedavg,<default>] [--clean-rules RULES] [--resume] [--shard K/N]

In-process fleet (bench/inproc.py: the product's RoundBook, 10 device cores with the client's engine step,
every message through the codec) on the tiny model (`meerkat tiny-model`, or --model-dir; MEERKAT mask), a
labelled task split Dirichlet(0.5) over 10 devices. Hostile devices are the 1 or 3 of median data share
(a typical participant, not the device the split made largest); they train honestly and hand their Join /
Updates to an attack strategy (bench/attacks/strategies.py: ratchet, scaling, sign-flip, bias, rejoin,
alternating; and absent, the silent baseline; loss, a device lying about its training loss, only on request:
it is what `--lr auto`'s controller reads), so the coordinator's real intake, admission, aggregation and
lr controller judge them. Each (rule, attack, hostile, seed) is one run; each rule also runs clean (no attack) per seed,
and so does each of --clean-rules (clean only: e.g. the fedavg baseline of the clean cost without its attack
rows). After every round the coordinator's values are evaluated on the held-out set.

Reported (DIR/attacks.json, DIR/attacks.md, the JSON summary last on stdout with --json): per run the
held-out accuracy and loss after every round and the lr each round was applied with; per (rule, attack, hostile) the final accuracy against the
clean run of the same rule and seed (mean and worst seed) and against the absent run, the worst per-round
gap, what the coordinator refused; the verdicts: with 1 hostile every attack within 2 points of clean, which
hold with 3, and the clean run of the default rule within 1 point of plain FedAvg. Runs are cached in
DIR/cells/ (`--resume`); `--shard K/N` lets N processes share one DIR, one `--resume` run then gathers them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, cast

import torch

from bench.attacks.report import markdown, summarize
from bench.attacks.run import Cell, CellResult, book_config, run_cell
from bench.attacks.strategies import ATTACKS, KNOWN
from bench.cli import add_defaults, print_json_last
from bench.learning.learning import parse_shard
from bench.learning.sim import ZOSpec, lr_fields
from coordinator.aggregate import RULES
from coordinator.config import Aggregation, CoordinatorConfig
from shared.prng import derive_seed

log = logging.getLogger(__name__)

CELL_VERSION = 2  # bump when a change to the strategies or the run alters results (invalidates DIR/cells)


def default_rule() -> Aggregation:
    """The coordinator's default aggregation rule (what an operator gets without choosing)."""
    return CoordinatorConfig().aggregation


@dataclass(frozen=True)
class AttacksConfig:
    """One matrix. Rounds x steps x lr: the clean run learns the demo model's topic task clearly (0.53 before,
    0.975 after 5 rounds x 4 steps at seed 0) in a run short enough (~20 s on 2 loaded cores) for the whole
    matrix (90 runs at the defaults)."""

    size: str = "demo"  # tiny-model size
    model_dir: str = ""  # a tiny-model dir instead of the cached build of `size` ("": that build)
    task: str = "topic"
    seeds: int = 3  # seeds 0..seeds-1: data split, directions and batches
    rounds: int = 5
    steps: int = 4  # local SPSA steps T per round
    lr: float | str = 5e-2  # within the lr rule's tie of MEERKAT's 2e-2 on demo/topic (BENCHMARKS.md): learns in 20 steps;
    #                          "auto" / "auto@X": the coordinator's controller (coordinator/lrctl.py)
    eps: float = 1e-2
    batch_size: int = 16
    n_clients: int = 10
    alpha: float = 0.5
    n_train: int = 1000
    n_eval: int = 200
    fraction: float = 0.01  # mask share of the decoder Linear weights (the learning bench's)
    calib_seqs: int = 64
    attacks: tuple[str, ...] = ATTACKS
    hostile: tuple[int, ...] = (1, 3)
    rules: tuple[str, ...] = ()  # () = fedavg and the default rule
    clean_rules: tuple[str, ...] = ()  # more rules run clean only (the clean-cost baseline without its attack rows)
    tolerance: float = 0.02  # an attack "holds" when every seed ends within this of the clean run
    clean_tolerance: float = 0.01  # the default rule's clean cost vs plain FedAvg

    def rule_list(self) -> tuple[Aggregation, ...]:
        rules = self.rules or tuple(dict.fromkeys(("fedavg", default_rule())))
        return cast("tuple[Aggregation, ...]", rules)

    def cells(self) -> list[Cell]:
        out = []
        rules = self.rule_list()
        for seed in range(self.seeds):
            for rule in rules:
                out.append(Cell(rule, "none", 0, seed))
                out += [Cell(rule, a, h, seed) for a in self.attacks for h in self.hostile]
            out += [Cell(cast("Aggregation", r), "none", 0, seed) for r in self.clean_rules if r not in rules]
        return out


def add_parser(sub: Any) -> None:
    d = AttacksConfig()
    p = sub.add_parser("attacks", help="hostile devices vs the aggregation rules (issue 26): accuracy vs clean",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print the JSON summary as the last stdout line")
    p.add_argument("--out", type=Path, default=Path("bench-attacks"), help="dir for attacks.json/.md and cells/")
    add_defaults(
        p, d, ("--size", "size", "tiny-model size"), ("--task", "task", "task (bench/tinylm/tasks.py)"),
        ("--seeds", "seeds", "seeds 0..N-1"), ("--rounds", "rounds", "rounds per run"),
        ("--steps", "steps", "local SPSA steps per round"),
        ("--n-train", "n_train", "training examples over all devices"), ("--n-eval", "n_eval", "held-out examples"),
    )  # fmt: skip
    p.add_argument("--lr", type=bench_lr, default=d.lr,
                   help=f"learning rate: a number, auto or auto@X (the controller, started at X) (default {d.lr})")
    p.add_argument("--model-dir", default="", help="a `meerkat tiny-model` dir to use instead of --size's cached build")
    p.add_argument("--attacks", default=",".join(d.attacks), help=f"comma list from {','.join(KNOWN)}")
    p.add_argument("--hostile", default=",".join(map(str, d.hostile)), help="comma list: hostile devices of 10")
    p.add_argument("--rules", default=None, help=f"comma list from {','.join(RULES)} (default fedavg and the "
                                                   f"default rule, {default_rule()})")
    p.add_argument("--clean-rules", default="", help="comma list of more rules to run clean only (e.g. fedavg: the "
                                                      "clean-cost baseline without its attack rows)")
    p.add_argument("--resume", action="store_true", help="reuse finished runs under OUT/cells (same config)")
    p.add_argument("--shard", default=None,
                   help="K/N: only run every N-th cell from the K-th into OUT/cells (parallel processes; then one "
                        "--resume run gathers them)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: 2 shared cores)")
    p.set_defaults(func=run)


def bench_lr(text: str) -> float | str:
    """--lr: a number in (0, 1), "auto" or "auto@X" (argparse names the option when this raises)."""
    try:
        value: float | str = float(text)
    except ValueError:
        value = text
    fields = lr_fields(value)  # ValueError for a word that is no lr mode
    lr = fields["lr"]
    if not (lr == "auto" or 0 < lr < 1) or not 0 <= fields.get("lr_start", 0.0) < 1:
        raise ValueError(f"lr {text!r}: expected a number in (0, 1), auto or auto@X with X in (0, 1)")
    return value


def config_from_args(args: argparse.Namespace) -> AttacksConfig:
    def items(text: str | None) -> tuple[str, ...]:
        return tuple(t.strip() for t in (text or "").split(",") if t.strip())

    cfg = replace(AttacksConfig(), size=args.size, model_dir=args.model_dir, task=args.task, seeds=args.seeds, rounds=args.rounds,
                  steps=args.steps, lr=args.lr, n_train=args.n_train, n_eval=args.n_eval,
                  attacks=items(args.attacks), rules=items(args.rules),
                  clean_rules=items(args.clean_rules))  # fmt: skip
    try:
        cfg = replace(cfg, hostile=tuple(int(h) for h in items(args.hostile)))
    except ValueError:
        raise SystemExit(f"--hostile: expected a comma list of integers, got {args.hostile!r}") from None
    bad = [a for a in cfg.attacks if a not in KNOWN]
    if bad:
        raise SystemExit(f"--attacks: unknown {bad}; known: {list(KNOWN)}")
    bad = [r for r in cfg.rules + cfg.clean_rules if r not in RULES]
    if bad:
        raise SystemExit(f"--rules / --clean-rules: unknown {bad}; known: {list(RULES)}")
    if not all(1 <= h < cfg.n_clients for h in cfg.hostile):
        raise SystemExit(f"--hostile: each must be in 1..{cfg.n_clients - 1}, got {cfg.hostile}")
    if cfg.seeds < 1 or cfg.rounds < 1 or not 1 <= cfg.steps <= 100:
        raise SystemExit("need --seeds >= 1, --rounds >= 1 and --steps in 1..100")
    return cfg


# Ten simulated devices x every round, and every refused probe of a hostile device: the attacker's tally
# reports the refusals, so these stay quiet unless -v (DEBUG) asks for them.
QUIET = ("coordinator.rounds", "coordinator.admission", "edge_client.service.rounds")


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    torch.set_num_threads(max(1, args.threads))
    levels = {name: logging.getLogger(name).level for name in QUIET}
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        for name in QUIET:
            logging.getLogger(name).setLevel(logging.ERROR)
    try:
        if args.shard:
            k, n = parse_shard(args.shard)
            done = run_shard(cfg, args.out, k, n, resume=args.resume)
            print(f"shard {k}/{n}: {done} runs in {args.out / 'cells'}; gather with --resume (no --shard)")
            return 0
        summary = run_matrix(cfg, args.out, resume=args.resume)
    finally:  # a test or a caller in the same process keeps its own logging
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
    print(summary["markdown"], end="")
    if args.json:
        print_json_last({k: v for k, v in summary.items() if k != "markdown"})
    return 0


class Matrix:
    """The model, mask and data of one invocation, built once; `result(cell)` runs or reads a cell."""

    def __init__(self, cfg: AttacksConfig, out: Path, resume: bool) -> None:
        from bench.learning.masks import build_masks
        from bench.tinylm.pretrain import get_model_dir
        from shared.fingerprint import fingerprint_model_dir
        from shared.modelload import load_model

        self.cfg, self.out, self.resume = cfg, out, resume
        model_dir = Path(cfg.model_dir) if cfg.model_dir else get_model_dir(cfg.size, progress=False)
        self.fingerprint = fingerprint_model_dir(model_dir)
        mask = build_masks(model_dir, self.fingerprint, cfg.fraction, seqs=cfg.calib_seqs, random_seeds=())
        self.loaded = load_model(model_dir, "none", "cpu", mask["pretrain-grad"], fingerprint=self.fingerprint)
        self._data: tuple[int, Any] | None = None

    def data(self, seed: int) -> Any:
        from bench.learning.sim import make_data

        if self._data is None or self._data[0] != seed:
            cfg = self.cfg
            (self.out / "data").mkdir(parents=True, exist_ok=True)
            # a private dir per call: shards started together would otherwise rewrite the split's files while
            # another shard reads them (a truncated client file: a device with fewer or no examples)
            with tempfile.TemporaryDirectory(prefix=f"{cfg.task}-{seed}-", dir=self.out / "data") as tmp:
                self._data = (seed, make_data(cfg.task, Path(tmp), self.loaded.tokenizer, seed=derive_seed(seed, 4),
                                              n_clients=cfg.n_clients, alpha=cfg.alpha, n_train=cfg.n_train,
                                              n_eval=cfg.n_eval))  # fmt: skip
        return self._data[1]

    def spec(self, seed: int) -> ZOSpec:
        c = self.cfg
        return ZOSpec(c.rounds, c.steps, c.lr, c.eps, c.batch_size, derive_seed(seed, 100, c.steps))

    def cell_path(self, cell: Cell) -> Path:
        c = self.cfg
        shape = {k: v for k, v in asdict(c).items() if k not in ("attacks", "hostile", "rules", "clean_rules", "seeds", "model_dir")}
        coord = repr(book_config(self.spec(cell.seed), cell.rule, c.n_clients))  # caps and weights shape it too
        key = json.dumps({"v": CELL_VERSION, "fp": self.fingerprint, "cfg": shape, "coord": coord, "cell": cell.key},
                         sort_keys=True)
        return self.out / "cells" / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.json"

    def result(self, cell: Cell) -> CellResult:
        path = self.cell_path(cell)
        if self.resume and path.is_file():
            got = json.loads(path.read_text())
            return CellResult(cell, got["accuracy"], got["loss"], (got["start"]["accuracy"], got["start"]["loss"]),
                              got["attacker"], got["seconds"], got.get("lr", []))  # fmt: skip
        res = run_cell(self.loaded, self.data(cell.seed), self.spec(cell.seed), cell)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(res.to_json(), sort_keys=True))
        tmp.replace(path)
        return res


def run_shard(cfg: AttacksConfig, out: Path, k: int, n: int, *, resume: bool = False) -> int:
    """Run (or, with `resume`, skip when cached) every n-th cell from the k-th; how many there were."""
    matrix = Matrix(cfg, out, resume)
    mine = cfg.cells()[k::n]
    for i, cell in enumerate(mine):
        res = matrix.result(cell)
        print(f"[{k}/{n} {i + 1}/{len(mine)}] {cell.key}: final accuracy {res.accuracy[-1]:.3f}", flush=True)
    return len(mine)


def run_matrix(cfg: AttacksConfig, out: Path, *, resume: bool = False) -> dict[str, Any]:
    """Every cell of `cfg` (cached ones read back with `resume`); writes OUT/attacks.json and attacks.md."""
    from bench.learning.learning import machine

    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    matrix = Matrix(cfg, out, resume)
    results = []
    cells = cfg.cells()
    for i, cell in enumerate(cells):
        res = matrix.result(cell)
        log.info("[%d/%d] %s: accuracy %s (%.1f s)", i + 1, len(cells), cell.key,
                 " ".join(f"{a:.2f}" for a in res.accuracy), res.seconds)  # fmt: skip
        print(f"[{i + 1}/{len(cells)}] {cell.key}: final accuracy {res.accuracy[-1]:.3f}, loss {res.loss[-1]:.3f}",
              flush=True)
        results.append(res)
    summary = summarize(results, default_rule=default_rule(), tolerance=cfg.tolerance,
                        clean_tolerance=cfg.clean_tolerance)
    summary |= {"config": asdict(cfg), "default_rule": default_rule(), "fingerprint": matrix.fingerprint,
                "wall_s": round(time.perf_counter() - t0, 1), **machine(),
                "runs": [r.to_json() for r in results]}  # fmt: skip
    summary["markdown"] = markdown(summary)
    (out / "attacks.json").write_text(json.dumps({k: v for k, v in summary.items() if k != "markdown"},
                                                 indent=1, sort_keys=True) + "\n")
    (out / "attacks.md").write_text(summary["markdown"])
    return summary


__all__ = ["AttacksConfig", "Matrix", "add_parser", "config_from_args", "default_rule", "run",
           "run_matrix", "run_shard"]
