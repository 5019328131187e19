"""MEERKAT-VP offline replay: recorded probe runs through the product's DriftMonitor, no training.

    python -m bench.learning.vp_replay RUN_DIR [RUN_DIR ...] [--decay-rule fleet] [--fleet-ratio 2.6]
        [--spike-ratio 15] [--json OUT]

Each RUN_DIR holds a `probe.json` of `bench.learning.vp_probe` (every device's per-step g and GradIP,
losses, the eval accuracy after each round). Round by round, as RoundBook does: every device's GradIP of
the round into `observe_gradip` (the "absolute" decay rule flags there), then at the close `observe_round`
(spike rule) over the round's updates and `observe_fleet` (the fleet-relative decay rule) over the same
devices (the round's updates: those with a recorded spike statistic; an update the adaptive |g| cap
rejected is neither stored nor checked). Prints per run every flag (round 1-based, device, rule, statistic) and its class:

    true   a single-label device, or a device that diverged first (its loss, mean of loss+ and loss-,
           more than doubled within its own round, in the earliest round any device's did), flagged then
           or later
    false  any other device in a run that did not collapse (eval accuracy never fell >= 0.2 below the
           best so far)
    other  any other device in a run that collapsed

`exact`: a replay is the recorded run only while the replayed limits equal the recorded ones (a limited
device runs 1 step, so its later GradIP would differ); a flag in a round after the first difference is
counterfactual and marked `~`. Thresholds are chosen on tuning-seed runs only (BENCHMARKS.md, "MEERKAT-VP:
a fleet-relative decay rule").
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import torch

from coordinator.drift import DECAY_RULES, DriftMonitor, DriftThresholds


def diverged_first(run: dict[str, Any]) -> tuple[int | None, set[str]]:
    """(earliest round, 0-based, in which some device's loss more than doubled within its round; those devices)."""
    by_round: dict[int, set[str]] = {}
    for c, steps in run["steps"].items():  # rows: (round, seed, g, loss+, loss-, gradip)
        rounds = sorted({x[0] for x in steps})
        for r in rounds:
            loss = [(x[3] + x[4]) / 2 for x in steps if x[0] == r]
            if len(loss) > 1 and max(loss[1:]) > 2 * loss[0]:
                by_round.setdefault(r, set()).add(c)
    if not by_round:
        return None, set()
    first = min(by_round)
    return first, by_round[first]


def collapsed(curve: list[float], drop: float = 0.2) -> bool:
    """Eval accuracy fell >= `drop` below the best so far after some round."""
    best = -math.inf
    for a in curve:
        if a <= best - drop:
            return True
        best = max(best, a)
    return False


def replay(run: dict[str, Any], th: DriftThresholds) -> dict[str, Any]:
    """The flags DriftMonitor raises on the recorded run, in order, classified (see the module doc)."""
    mon = DriftMonitor(torch.zeros(1, dtype=torch.float64), "rademacher", th, keep_history=False)
    steps: dict[str, list[list[float]]] = run["steps"]
    rounds = 1 + max(int(x[0]) for v in steps.values() for x in v)
    recorded = {c: int(r) for c, r in run.get("limited", {}).items()} if run.get("vp") else {}
    singles = set(run["single_label"])
    first_r, first_devs = diverged_first(run)
    fell = collapsed(run["curve"])
    # the updates each round received: the recorded spike statistics name them (an update the adaptive |g|
    # cap rejected was neither stored nor checked); without any, every device that ran steps in the round
    members = {c: {int(x[0]) for x in v} for c, v in run.get("spikes", {}).items()}
    exact_until: int | None = None  # last round whose replay equals the recorded run
    flags = []
    peak: dict[str, tuple[float, str]] = {}  # "true" / "rest": the largest fleet ratio seen in exact rounds
    for r in range(rounds):
        grads = {c: [x[2] for x in v if x[0] == r] for c, v in sorted(steps.items())}
        grads = {c: g for c, g in grads.items() if g and (not members or r in members.get(c, ()))}
        got: dict[str, tuple[str, str]] = {}
        for c in grads:
            st = mon.observe_gradip(c, r, [x[5] for x in steps[c] if x[0] == r])
            if st is not None:
                got[c] = ("decay-absolute", f"rho_later={st.rho_later:.3g} rho_quie={st.rho_quie:.2f}")
        for c, sp in mon.observe_round(r, grads).items():
            if c not in got and mon.reason(c) == "spike" and mon.flagged_round(c) == r:
                got[c] = ("spike", f"ratio={sp.ratio:.3g}")
        for c, fs in mon.observe_fleet(r, grads).items():
            got[c] = ("decay-fleet", f"rho_later={fs.rho_later:.3g} median={fs.median:.3g} ratio={fs.ratio:.3g}")
        for c in grads:
            last = mon.fleet(c)
            kind = "true" if c in singles or c in first_devs else "rest"
            if exact_until is None and last is not None and last.round == r and last.ratio > peak.get(kind, (-1.0, ""))[0]:
                peak[kind] = (last.ratio, f"r{r + 1} {c}")
        for c in sorted(got):
            if c in singles or c in first_devs:
                cls = "true"
            else:
                cls = "other" if fell else "false"
            flags.append({"round": r + 1, "client": c, "rule": got[c][0], "stat": got[c][1], "class": cls,
                          "exact": exact_until is None})
        now = {c: mon.flagged_round(c) for c in mon.limited()}
        if exact_until is None and now != {c: k for c, k in recorded.items() if k <= r}:
            exact_until = r  # flags of this round still exact; later ones counterfactual
    count = {k: sum(1 for f in flags if f["class"] == k and f["rule"] != "spike") for k in ("true", "false", "other")}
    return {"flags": flags, "decay_count": count, "collapsed": fell, "max_fleet_ratio": peak,
            "diverged_first": None if first_r is None else [first_r + 1, sorted(first_devs)]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="directories holding probe.json")
    d = DriftThresholds()
    p.add_argument("--decay-rule", default=d.decay_rule, choices=DECAY_RULES)
    p.add_argument("--fleet-ratio", type=float, default=d.fleet_ratio)
    p.add_argument("--fleet-min-clients", type=int, default=d.fleet_min_clients)
    p.add_argument("--spike-ratio", type=float, default=d.spike_ratio)
    p.add_argument("--json", type=Path, help="also write the replay of every run here")
    a = p.parse_args()
    th = DriftThresholds(decay_rule=a.decay_rule, fleet_ratio=a.fleet_ratio, fleet_min_clients=a.fleet_min_clients,
                         spike_ratio=a.spike_ratio)
    out = {}
    for run_dir in a.runs:
        run = json.loads((run_dir / "probe.json").read_text())
        res = replay(run, th)
        out[str(run_dir)] = res
        acc = " ".join(f"{x:.2f}" for x in run["curve"])
        print(f"{run_dir.name}: {run['setting']} lr {run['lr']:g} seed {run['seed']} vp {run['vp']} | acc {acc} | "
              f"collapsed {res['collapsed']} | diverged first {res['diverged_first']} | decay flags {res['decay_count']}")
        mx = " ".join(f"{k} {v[0]:.2f} ({v[1]})" for k, v in sorted(res["max_fleet_ratio"].items()))
        print(f"  max fleet ratio (rho_later / fleet median; exact rounds): {mx or '-'}")
        for f in res["flags"]:
            star = "*" if f["client"] in run["single_label"] else ""
            print(f"  {'' if f['exact'] else '~'}r{f['round']} {f['client']}{star} {f['rule']} {f['stat']} -> {f['class']}")
    if a.json:
        a.json.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
