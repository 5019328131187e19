"""PNG plots of `meerkat bench learning`: accuracy vs rounds and vs communicated bytes (per size and setting),
the MEERKAT - dense FedZO gap against the number of perturbed dense parameters (across sizes), and GradIP
traces of single-label vs other devices (the MEERKAT-VP statistic), and, with several `--lr` modes, accuracy
and lr per round of each mode (`learning_lr_modes*.png`; the other plots show the tuned rows only)."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

COLORS = {"backprop-fedavg": "black", "fedzo-dense": "tab:gray", "meerkat": "tab:red", "weight-magnitude": "tab:blue",
          "random-mask": "tab:green", "meerkat-vp": "tab:purple", "zero-shot": "tab:olive"}


def mean_curves(runs: list[dict[str, Any]], task: str, setting: str, T: int,
                size: str | None = None) -> dict[str, dict[str, list[float]]]:
    """method -> {"rounds", "bytes", "mean", "std"} averaged over seeds (curves share their eval rounds)."""
    by_method: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        if r["task"] == task and r["setting"] == setting and r["T"] == T and size in (None, r.get("size")):
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
    paths = []
    every = result["runs"]
    runs = [r for r in every if r.get("lr_mode", "tuned") == "tuned"]
    result = {**result, "runs": runs}
    sizes = result.get("sizes") or [result["config"]["size"]]
    for size in sizes:
        for setting in sorted({r["setting"] for r in runs if r.get("size", size) == size}):
            suffix = ("" if len(sizes) == 1 else f"_{size}") + ("" if setting == "dirichlet" else f"_{setting}")
            for kind in ("rounds", "bytes"):
                p = _curves(result, size, setting, kind, out / f"learning_{kind}{suffix}.png")
                if p is not None:
                    paths.append(p)
        if len({r.get("lr_mode", "tuned") for r in every if r.get("size", size) == size}) > 1:
            suffix = "" if len(sizes) == 1 else f"_{size}"
            paths.append(plot_lr_modes([r for r in every if r.get("size", size) == size], result["config"],
                                       out / f"learning_lr_modes{suffix}.png"))  # fmt: skip
    for p in (plot_gap(runs, out / "learning_gap.png"), plot_gradip(runs, out / "learning_gradip.png")):
        if p is not None:
            paths.append(p)
    return paths


MODE_STYLE = {"tuned": ("black", "-"), "auto": ("tab:blue", "-")}


def plot_lr_modes(runs: list[dict[str, Any]], cfg: dict[str, Any], path: Path) -> Path:
    """Per (setting, ZO method): eval accuracy per round of each lr mode (mean over seeds, zero-shot dashed)
    and below it the lr each round's result applied (log scale; every seed drawn; x: a round whose result
    undid the round before, lr = the undone round's)."""
    import matplotlib.pyplot as plt

    zo = [r for r in runs if "lrs" in r]
    settings = sorted({r["setting"] for r in zo})
    methods = [m for m in COLORS if any(r["method"] == m for r in zo)]
    modes = sorted({r.get("lr_mode", "tuned") for r in zo}, key=lambda m: (m != "tuned", m != "auto", m))
    fig, axes = plt.subplots(2 * len(settings), len(methods), figsize=(5.0 * len(methods), 5.6 * len(settings)),
                             squeeze=False, gridspec_kw={"height_ratios": [2, 1] * len(settings)})  # fmt: skip
    palette = ["tab:red", "tab:orange", "tab:green", "tab:purple", "tab:brown"]
    for i, setting in enumerate(settings):
        zero = [r["accuracy"] for r in runs if r["method"] == "zero-shot" and r["setting"] == setting]
        for j, method in enumerate(methods):
            acc_ax, lr_ax = axes[2 * i][j], axes[2 * i + 1][j]
            for k, mode in enumerate(modes):
                rs = [r for r in zo if r["setting"] == setting and r["method"] == method and r.get("lr_mode") == mode]
                if not rs:
                    continue
                color, ls = MODE_STYLE.get(mode, (palette[k % len(palette)], "--" if mode[0].isdigit() else "-"))
                n = min(len(r["curve"]["rounds"]) for r in rs)
                xs = [0.0] + [float(x) for x in rs[0]["curve"]["rounds"][:n]]
                start = statistics.fmean(zero) if zero else None
                ys = ([start] if start is not None else [math.nan]) + [
                    statistics.fmean(r["curve"]["accuracy"][t] for r in rs) for t in range(n)]  # fmt: skip
                label = f"{mode} ({statistics.fmean(r['accuracy'] for r in rs):.3f})"
                acc_ax.plot(xs, ys, marker="o", ms=3, color=color, ls=ls, label=label)
                for s, r in enumerate(rs):
                    lr_ax.step(range(len(r["lrs"]) + 1), [*r["lrs"], r["lrs"][-1]], where="post", color=color, ls=ls,
                               alpha=0.7, label=mode if s == 0 else None)  # fmt: skip
                    undone = [t for t, d in enumerate(r.get("decisions", [])) if d.startswith("undo")]
                    lr_ax.plot([t + 0.5 for t in undone], [r["lrs"][t] for t in undone], "x", color=color, ms=7)
            split = f"Dirichlet a={cfg['alpha']}" if setting == "dirichlet" else f"{cfg['n_single']} single-label"
            acc_ax.set_title(f"{method}, {split}", fontsize=10)
            acc_ax.set_ylabel("eval accuracy")
            acc_ax.grid(alpha=0.3)
            acc_ax.legend(fontsize=7, loc="lower right", title="lr mode (final acc)", title_fontsize=7)
            lr_ax.set_yscale("log")
            lr_ax.set_ylabel("lr applied")
            lr_ax.set_xlabel("round r (lr from r to r + 1)")
            lr_ax.grid(alpha=0.3)
    fig.suptitle(f"lr modes: tuned, auto (the coordinator's controller), auto started at / fixed at N x tuned "
                 f"({cfg['size']}, {cfg['tasks'][0]}, T={cfg['Ts'][0]}, budget {cfg['budget']}, {cfg['seeds']} seeds)",
                 fontsize=10)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _curves(result: dict[str, Any], size: str, setting: str, kind: str, path: Path) -> Path | None:
    import matplotlib.pyplot as plt

    runs = [r for r in result["runs"] if r.get("size", size) == size and r["setting"] == setting]
    cfg = result["config"]
    tasks = [t for t in cfg["tasks"] if any(r["task"] == t for r in runs)]
    Ts = list(cfg["Ts"])
    if not tasks:
        return None
    zero = {t: statistics.fmean(r["accuracy"] for r in runs if r["method"] == "zero-shot" and r["task"] == t)
            for t in tasks if any(r["method"] == "zero-shot" and r["task"] == t for r in runs)}
    fig, axes = plt.subplots(len(tasks), len(Ts), figsize=(5.2 * len(Ts), 3.6 * len(tasks)), squeeze=False)
    for i, task in enumerate(tasks):
        for j, T in enumerate(Ts):
            ax = axes[i][j]
            for method, c in mean_curves(runs, task, setting, T).items():
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
            split = f"Dirichlet a={cfg['alpha']}" if setting == "dirichlet" else f"{cfg['n_single']} single-label"
            ax.set_title(f"{size} {task}, {split}, T={T}", fontsize=10)
            ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="lower right")
    sep = "\n" if len(Ts) == 1 else " "  # one column is too narrow for the title on one line
    fig.suptitle(f"meerkat bench learning ({size} tiny LM, {cfg['n_clients']} clients,{sep}"
                 f"{cfg['budget']} local steps/client, mean ± std over {cfg['seeds']} seeds)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def gap_points(runs: list[dict[str, Any]]) -> dict[tuple[str, int], list[tuple[int, float, str]]]:
    """(task, T) -> [(dense nnz, mean MEERKAT acc - mean dense FedZO acc, size)], Dirichlet split."""
    acc: dict[tuple[str, str, int, str], list[float]] = {}
    nnz: dict[str, int] = {}
    for r in runs:
        if r["setting"] == "dirichlet" and r["method"] in ("meerkat", "fedzo-dense"):
            acc.setdefault((r.get("size", "?"), r["task"], r["T"], r["method"]), []).append(r["accuracy"])
            if r["method"] == "fedzo-dense":
                nnz[r.get("size", "?")] = r["nnz"]
    out: dict[tuple[str, int], list[tuple[int, float, str]]] = {}
    for (size, task, T, method), accs in sorted(acc.items()):
        dense = acc.get((size, task, T, "fedzo-dense"))
        if method == "meerkat" and dense and size in nnz:
            gap = statistics.fmean(accs) - statistics.fmean(dense)
            out.setdefault((task, T), []).append((nnz[size], gap, size))
    return {k: sorted(v) for k, v in out.items()}


def plot_gap(runs: list[dict[str, Any]], path: Path) -> Path | None:
    import matplotlib.pyplot as plt

    pts = gap_points(runs)
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for (task, T), v in pts.items():
        ax.plot([x for x, _, _ in v], [g for _, g, _ in v], marker="o", label=f"{task}, T={T}")
        for x, g, size in v:
            ax.annotate(size, (x, g), fontsize=7)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("perturbed parameters of dense FedZO (decoder Linear weights)")
    ax.set_ylabel("MEERKAT - dense FedZO final accuracy")
    ax.set_title("Does the sparse mask's advantage grow with model size? (mean over seeds)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def smoothed_abs(h: list[float], w: int) -> list[float]:
    """Trailing mean of |GradIP| over w steps (the detector's window)."""
    out, acc = [], 0.0
    for i, v in enumerate(h):
        acc += abs(v)
        if i >= w:
            acc -= abs(h[i - w])
        out.append(acc / min(i + 1, w))
    return out


def plot_gradip(runs: list[dict[str, Any]], path: Path, window: int = 20) -> Path | None:
    """|GradIP| (trailing mean over the detector window) per device: single-label red, others gray; one
    panel per (size, task, setting, method, T) of seed 0 (first 6 panels)."""
    import matplotlib.pyplot as plt

    sel = [r for r in runs if r.get("gradip") and r["seed"] == min(x["seed"] for x in runs)][:6]
    if not sel:
        return None
    fig, axes = plt.subplots(len(sel), 1, figsize=(7, 2.6 * len(sel)), squeeze=False)
    for ax, r in zip(axes[:, 0], sel, strict=True):
        for c, h in sorted(r["gradip"].items()):
            single = r.get("drift", {}).get(c, {}).get("single_label", False)
            ax.plot(smoothed_abs(h, window), lw=1.2 if single else 0.8, color="tab:red" if single else "tab:gray",
                    alpha=0.9 if single else 0.6, label=("single-label" if single else "other") if c else None)
        ax.set_yscale("log")
        ax.set_title(f"{r.get('size', '')} {r['task']} {r['setting']} {r['method']} T={r['T']} seed {r['seed']} "
                     f"(final acc {r['accuracy']:.2f})", fontsize=8)
        ax.set_xlabel("local step (rounds concatenated)")
        ax.set_ylabel(f"|GradIP|, mean of {window}")
        handles, labels = ax.get_legend_handles_labels()
        uniq = dict(zip(labels, handles, strict=True))
        ax.legend(uniq.values(), uniq.keys(), fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


__all__ = ["gap_points", "mean_curves", "plot_gap", "plot_gradip", "plot_results", "smoothed_abs"]
