"""PNG plots of `meerkat bench learning`: accuracy vs rounds and accuracy vs communicated bytes."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

COLORS = {"backprop-fedavg": "black", "fedzo-dense": "tab:gray", "meerkat": "tab:red", "weight-magnitude": "tab:blue",
          "random-mask": "tab:green", "meerkat-vp": "tab:purple", "zero-shot": "tab:olive"}


def mean_curves(runs: list[dict[str, Any]], task: str, setting: str, T: int) -> dict[str, dict[str, list[float]]]:
    """method -> {"rounds", "bytes", "mean", "std"} averaged over seeds (curves share their eval rounds)."""
    by_method: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        if r["task"] == task and r["setting"] == setting and r["T"] == T:
            by_method.setdefault(r["method"], []).append(r["curve"])
    out = {}
    for method, curves in by_method.items():
        n = min(len(c["rounds"]) for c in curves)
        accs = [[c["accuracy"][i] for c in curves] for i in range(n)]
        out[method] = {"rounds": [float(x) for x in curves[0]["rounds"][:n]],
                       "bytes": [statistics.fmean(c["bytes"][i] for c in curves) for i in range(n)],
                       "mean": [statistics.fmean(a) for a in accs],
                       "std": [statistics.stdev(a) if len(a) > 1 else 0.0 for a in accs]}
    return out


def plot_results(result: dict[str, Any], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["runs"]
    cfg = result["config"]
    tasks = list(cfg["tasks"])
    Ts = list(cfg["Ts"])
    zero = {t: statistics.fmean(r["accuracy"] for r in runs if r["method"] == "zero-shot" and r["task"] == t
                                and r["setting"] == "dirichlet") for t in tasks
            if any(r["method"] == "zero-shot" and r["task"] == t for r in runs)}
    paths = []
    for kind in ("rounds", "bytes"):
        fig, axes = plt.subplots(len(tasks), len(Ts), figsize=(5.2 * len(Ts), 3.6 * len(tasks)), squeeze=False)
        for i, task in enumerate(tasks):
            for j, T in enumerate(Ts):
                ax = axes[i][j]
                for method, c in mean_curves(runs, task, "dirichlet", T).items():
                    xs = c[kind]
                    ax.plot(xs, c["mean"], marker="o", ms=3, label=method, color=COLORS.get(method))
                    lo = [m - s for m, s in zip(c["mean"], c["std"], strict=True)]
                    hi = [m + s for m, s in zip(c["mean"], c["std"], strict=True)]
                    ax.fill_between(xs, lo, hi, alpha=0.12, color=COLORS.get(method))
                if task in zero:
                    ax.axhline(zero[task], ls="--", lw=1, color=COLORS["zero-shot"], label="zero-shot")
                if kind == "bytes":
                    ax.set_xscale("log")
                ax.set_xlabel("round" if kind == "rounds" else "communicated bytes (all clients, up + down)")
                ax.set_ylabel("eval accuracy")
                ax.set_title(f"{task}, Dirichlet a={cfg['alpha']}, T={T}", fontsize=10)
                ax.grid(alpha=0.3)
        axes[0][-1].legend(fontsize=7, loc="lower right")
        fig.suptitle(f"meerkat bench learning ({cfg['size']} tiny LM, {cfg['n_clients']} clients, "
                     f"{cfg['budget']} local steps/client, mean ± std over {cfg['seeds']} seeds)", fontsize=10)
        fig.tight_layout()
        path = out / f"learning_{kind}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths


__all__ = ["mean_curves", "plot_results"]
