"""`meerkat bench privacy`: what device-level differential privacy costs MEERKAT in accuracy.

    meerkat bench privacy [--json] [--out DIR] [--size demo] [--task topic] [--seeds 3] [--epsilons 2,8]
                          [--budget 40] [--T 10] [--clients 4] [--n-train 2000] [--clip C] [--delta D]
    meerkat bench privacy --clip-quantiles [--size demo] [--task topic]      # how large |d_i| is: choose C

The in-process fleet (bench/inproc.py through bench/learning/sim.py `run_zo`: the product's RoundBook,
one ClientRounds per device, the client's engine step, every message through the codec) on the
project's pretrained tiny LM with the MEERKAT (pretrain-gradient) mask. Per seed the same split, seeds
and budget run once without DP and once per target epsilon with the fleet's DP switch on
(coordinator dp_epsilon; docs/PRIVACY.md): Poisson-sampled batches, per-example clipping to C, Gaussian
noise from each device's secret stream, sigma derived on each device from (epsilon, delta, q = B / n,
rounds * T planned steps) and accounted with dp-accounting (RDP). Fewer devices with more examples each
than `bench learning` (4 x ~500 by default, Dirichlet alpha 5), so example-level DP means something:
q = 16 / n, about 0.03; delta 1e-5 for every device.

Output under --out: privacy.json (every run, curves, epsilon spent per device, machine), privacy.md (the
table), privacy.png (accuracy after each round, mean over seeds). --json: the summary as the last line.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from bench.cli import add_defaults, print_json_last

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PrivacyConfig:
    """One invocation. lr and eps are `bench learning`'s sparse defaults (BENCHMARKS.md)."""

    size: str = "demo"
    task: str = "topic"
    seeds: int = 3
    epsilons: tuple[float, ...] = (2.0, 8.0)
    budget: int = 40  # local steps per device (rounds = budget / T)
    T: int = 10
    clients: int = 4
    n_train: int = 2000  # over all devices: 500 each by default
    n_eval: int = 200
    alpha: float = 5.0  # Dirichlet label skew; milder than `bench learning`'s 0.5, whose 4-way split leaves a device
    # with a handful of examples (example-level DP of 2 examples means nothing; its default delta would be 0.47)
    batch_size: int = 16  # expected batch B (Poisson under DP)
    eps: float = 1e-2
    lr: float = 2e-2
    clip: float = 1.5  # C: about the 90th percentile of |d_i| at v_0 on demo/topic (--clip-quantiles, BENCHMARKS.md)
    delta: float = 1e-5  # one delta for every device, below 1 / n for all of them (0: each device's 1 / n^1.1)
    fraction: float = 0.01
    n_evals: int = 4
    model_dir: str = ""  # a tiny-model dir to use instead of the `size` cache entry


def add_parser(sub: Any) -> None:
    p = sub.add_parser("privacy", help="accuracy under device-level differential privacy vs non-private",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = PrivacyConfig()
    add_defaults(p, d, ("--size", "size", "tiny-model size"), ("--task", "task", "bench/tasks.py task"),
                 ("--seeds", "seeds", "seeds 0..N-1"), ("--budget", "budget", "local steps per device"),
                 ("--T", "T", "local steps per round"), ("--clients", "clients", "devices"),
                 ("--n-train", "n_train", "training examples over all devices"),
                 ("--clip", "clip", "DP clip C of each example's projected difference"),
                 ("--delta", "delta", "DP delta (0 = each device's 1/n^1.1)"), ("--lr", "lr", "learning rate"),
                 ("--alpha", "alpha", "Dirichlet label skew of the split"))
    p.add_argument("--epsilons", default=",".join(f"{e:g}" for e in d.epsilons),
                   help="comma list of target epsilons (default %(default)s)")
    p.add_argument("--model-dir", default="", help="a tiny-model dir (meerkat tiny-model --out) instead of --size's cache entry")
    p.add_argument("--out", default="bench-privacy", help="dir for privacy.json/.md/.png")
    p.add_argument("--json", action="store_true", help="print the JSON summary as the last stdout line")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--clip-quantiles", action="store_true",
                   help="only print the quantiles of |(l+ - l-)/2eps| per example at v_0 (to choose --clip) and exit")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """`meerkat bench privacy`; the round loggers (every simulated device, every round) are quieted to
    WARNING while it runs -- a device's budget stop still shows -- and put back when it returns."""
    quiet = ("coordinator.rounds", "edge_client.service.rounds")
    levels = {name: logging.getLogger(name).level for name in quiet}
    try:
        for name in quiet:
            logging.getLogger(name).setLevel(logging.WARNING)
        return _run(args)
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def _run(args: argparse.Namespace) -> int:
    cfg = replace(PrivacyConfig(), size=args.size, task=args.task, seeds=args.seeds, budget=args.budget, T=args.T,
                  clients=args.clients, n_train=args.n_train, clip=args.clip, delta=args.delta, lr=args.lr,
                  model_dir=args.model_dir, alpha=args.alpha,
                  epsilons=tuple(float(e) for e in args.epsilons.split(",") if e))  # fmt: skip
    if cfg.budget % cfg.T:
        raise SystemExit(f"--budget {cfg.budget} must be a multiple of --T {cfg.T}")
    torch.set_num_threads(args.threads)
    if args.clip_quantiles:
        qs = clip_quantiles(cfg)
        print(json.dumps(qs, sort_keys=True) if args.json else " ".join(f"{k}={v:.4g}" for k, v in qs.items()))
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = run_bench(cfg)
    (out / "privacy.json").write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    (out / "privacy.md").write_text(markdown(result) + "\n")
    plot(result, out / "privacy.png")
    print(markdown(result))
    if args.json:
        print_json_last({"rows": result["rows"], "config": result["config"], "machine": result["machine"]})
    return 0


def run_bench(cfg: PrivacyConfig) -> dict[str, Any]:
    from bench.learning.learning import machine
    from bench.learning.sim import ZOSpec, make_data, run_zo
    from shared.prng import derive_seed

    t0 = time.perf_counter()
    model_dir, mask, fp, loaded = _setup(cfg)
    rounds = cfg.budget // cfg.T
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-privacy-") as tmp:
        for seed in range(cfg.seeds):
            data = make_data(cfg.task, Path(tmp) / f"s{seed}", loaded.tokenizer, seed=derive_seed(seed, 4),
                             n_clients=cfg.clients, alpha=cfg.alpha, n_train=cfg.n_train, n_eval=cfg.n_eval)
            for target in (0.0, *cfg.epsilons):
                spec = ZOSpec(rounds, cfg.T, cfg.lr, cfg.eps, cfg.batch_size, derive_seed(seed, 100, cfg.T),
                              n_evals=cfg.n_evals, dp_epsilon=target, dp_clip=cfg.clip, dp_delta=cfg.delta)
                try:
                    res = run_zo(loaded, data, spec, None, mask_id=mask.mask_id)
                finally:
                    loaded.sidecar.set_values(loaded.sidecar.initial_values())
                n = {c: len(ds) for c, ds in data.clients.items()}
                runs.append({"seed": seed, "epsilon": target or None, "accuracy": res.accuracy,
                             "curve": {"rounds": res.curve.rounds, "accuracy": res.curve.accuracy},
                             "dp_spent": res.dp_spent, "n_local": n, "seconds": round(res.seconds, 2)})  # fmt: skip
                log.info("seed %d epsilon %s: accuracy %.3f (%.1f s)", seed, target or "off", res.accuracy, res.seconds)
    return {"config": asdict(cfg), "model": {"dir": model_dir.name, "fingerprint": fp, "nnz": int(mask.nnz)},
            "runs": runs, "rows": summarize(runs, cfg), "seconds": round(time.perf_counter() - t0, 1),
            **machine()}  # fmt: skip


def _setup(cfg: PrivacyConfig) -> tuple[Any, Any, str, Any]:
    """(model dir, MEERKAT mask, fingerprint, loaded model with its side-car) of `cfg.size`."""
    from bench.learning.masks import build_masks
    from bench.tinylm.pretrain import get_model_dir
    from shared.fingerprint import fingerprint_model_dir
    from shared.modelload import load_model

    model_dir = Path(cfg.model_dir) if cfg.model_dir else get_model_dir(cfg.size, progress=False)
    fp = fingerprint_model_dir(model_dir)
    mask = build_masks(model_dir, fp, cfg.fraction, random_seeds=(0,))["pretrain-grad"]
    return model_dir, mask, fp, load_model(model_dir, "none", "cpu", mask, fingerprint=fp)


def clip_quantiles(cfg: PrivacyConfig, directions_n: int = 8, examples: int = 128) -> dict[str, float]:
    """Quantiles of |d_i| = |(l_i(v0 + eps z) - l_i(v0 - eps z)) / 2eps| over `examples` training examples of
    seed 0's split and `directions_n` directions: the scale C is chosen against (docs/PRIVACY.md)."""
    import numpy as np

    from bench.learning.sim import make_data
    from shared.loss import target_losses
    from shared.prng import derive_seed, directions

    _, _, _, loaded = _setup(cfg)
    sc = loaded.sidecar
    with tempfile.TemporaryDirectory(prefix="bench-privacy-clip-") as tmp:
        data = make_data(cfg.task, Path(tmp), loaded.tokenizer, seed=derive_seed(0, 4), n_clients=cfg.clients,
                         alpha=cfg.alpha, n_train=cfg.n_train, n_eval=cfg.n_eval)
    ds = data.clients[sorted(data.clients)[0]]
    chosen = ds.examples[:examples]
    v0 = sc.initial_values()
    d: list[float] = []
    with torch.no_grad():
        for k in range(directions_n):
            z = directions(derive_seed(99, k), sc.nnz)
            out = []
            for sign in (1.0, -1.0):
                sc.set_values(v0 + sign * cfg.eps * z)
                out.append(torch.cat([target_losses(loaded.model, chosen[i : i + 32], ds.pad_id)
                                      for i in range(0, len(chosen), 32)]).double())  # fmt: skip
            d += ((out[0] - out[1]) / (2 * cfg.eps)).abs().tolist()
    sc.set_values(v0)
    a = np.asarray(d)
    return {f"p{p}": float(np.quantile(a, p / 100)) for p in (10, 25, 50, 75, 90, 99)} | {"n": float(a.size)}


def summarize(runs: list[dict[str, Any]], cfg: PrivacyConfig) -> list[dict[str, Any]]:
    """One row per epsilon (None = non-private): mean/std accuracy, the largest epsilon any device spent,
    the delta it is stated at, and the gap to the non-private mean."""
    from shared.accountant import default_delta

    rows = []
    base = None
    for target in (None, *cfg.epsilons):
        rs = [r for r in runs if r["epsilon"] == target]
        accs = [r["accuracy"] for r in rs]
        mean = statistics.fmean(accs)
        base = mean if target is None else base
        spent = [e for r in rs for e in r["dp_spent"].values()]
        ns = [n for r in rs for n in r["n_local"].values()]
        delta = cfg.delta or (max(default_delta(n) for n in ns) if ns else None)
        rows.append({
            "epsilon": target, "accuracy_mean": mean, "accuracy_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
            "seeds": len(accs), "max_epsilon_spent": max(spent) if spent else None,
            "delta": delta if target is not None else None,
            "gap_points": None if target is None or base is None else round(100 * (base - mean), 2),
        })  # fmt: skip
    return rows


def markdown(result: dict[str, Any]) -> str:
    cfg = result["config"]
    lines = [f"{cfg['task']} on {result['model']['dir']}, MEERKAT mask (nnz {result['model']['nnz']}), "
             f"{cfg['clients']} devices x ~{cfg['n_train'] // cfg['clients']} examples, budget {cfg['budget']} "
             f"steps (T = {cfg['T']}), B = {cfg['batch_size']}, C = {cfg['clip']}",
             "", "| DP | epsilon spent (max device) | delta | accuracy (mean ± std) | seeds | gap to non-private |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for r in result["rows"]:
        eps = "off" if r["epsilon"] is None else f"ε = {r['epsilon']:g}"
        spent = "-" if r["max_epsilon_spent"] is None else f"{r['max_epsilon_spent']:.3f}"
        delta = "-" if r["delta"] is None else f"{r['delta']:.2e}"
        gap = "-" if r["gap_points"] is None else f"{r['gap_points']:+.1f} points"
        lines.append(f"| {eps} | {spent} | {delta} | {r['accuracy_mean']:.3f} ± {r['accuracy_std']:.3f} | "
                     f"{r['seeds']} | {gap} |")  # fmt: skip
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    """Accuracy after each evaluated round, mean over seeds, one line per DP setting."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no %s (pip install 'meerkat-edge[plot]')", path)
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for target in (None, *result["config"]["epsilons"]):
        rs = [r for r in result["runs"] if r["epsilon"] == target]
        xs = rs[0]["curve"]["rounds"]
        ys = [statistics.fmean(r["curve"]["accuracy"][i] for r in rs) for i in range(len(xs))]
        ax.plot(xs, ys, marker="o", label="non-private" if target is None else f"DP ε = {target:g}")
    ax.set_xlabel("round")
    ax.set_ylabel("eval accuracy (mean over seeds)")
    ax.set_title(f"{result['config']['task']}: device-level DP vs non-private, same budget")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


__all__ = ["PrivacyConfig", "add_parser", "markdown", "run", "run_bench", "summarize"]
