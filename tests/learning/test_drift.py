"""MEERKAT-VP drift monitor: c_t is the dense inner product, decaying GradIP gets flagged, oscillating not;
a device whose |g| spikes far above its round's median gets flagged, ordinary round-to-round noise not;
the fleet-relative decay rule flags the one client that decays while the fleet does not, and nobody when
the whole fleet decays together (convergence)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pytest
import torch

from coordinator.drift import (
    DriftMonitor,
    DriftStats,
    DriftThresholds,
    SpikeStats,
    drift_stats,
    fleet_decay_stats,
    spike_stats,
)
from shared.prng import derive_seed, directions, raw_u64


def _grad(n: int, seed: int = 7) -> torch.Tensor:
    u = raw_u64(seed, n).astype(np.float64) / 2.0**64 - 0.5  # uniform in [-0.5, 0.5)
    return torch.from_numpy(u.astype(np.float32))


@pytest.mark.parametrize("dist", ["rademacher", "gaussian"])
def test_coefficient_is_the_dense_inner_product(dist: str) -> None:
    n = 5000
    g = _grad(n)
    mon = DriftMonitor(g, dist)  # type: ignore[arg-type]
    for t in range(4):
        seed = derive_seed(99, 0, t)
        z = directions(seed, n, dist).numpy().astype(np.float64)  # type: ignore[arg-type]
        expect = float(np.sum(g.numpy().astype(np.float64) * z))
        assert mon.coefficient(seed) == pytest.approx(expect, rel=1e-12, abs=1e-9)
        assert mon.coefficient(seed) == mon.coefficient(seed)  # cached, same value


def test_gradip_is_g_times_c() -> None:
    g = _grad(300)
    mon = DriftMonitor(g)
    seeds = [derive_seed(5, 0, t) for t in range(3)]
    mon.observe("a", 0, seeds, [0.5, -2.0])  # T_k = 2 < len(seeds)
    assert mon.gradip("a") == pytest.approx([0.5 * mon.coefficient(seeds[0]), -2.0 * mon.coefficient(seeds[1])])
    mon.observe("a", 0, seeds, [9.0, 9.0])  # same (client, round) again: ignored
    assert len(mon.gradip("a")) == 2


def _synthetic(kind: str, rounds: int, T: int, seed: int) -> list[list[float]]:
    """Per-round projected gradients: 'decay' shrinks like exp(-step/15), 'oscillate' keeps its scale."""
    u = raw_u64(seed, rounds * T).astype(np.float64) / 2.0**64
    out = []
    for r in range(rounds):
        row = []
        for t in range(T):
            i = r * T + t
            noise = 0.5 + u[i]  # magnitude in [0.5, 1.5)
            sign = 1.0 if i % 2 == 0 else -1.0
            scale = math.exp(-i / 15.0) if kind == "decay" else 1.0 + 0.5 * math.sin(i / 3.0)
            row.append(sign * noise * scale)
        out.append(row)
    return out


def test_flags_exactly_the_decaying_client() -> None:
    g = _grad(2000)
    mon = DriftMonitor(g, thresholds=DriftThresholds(decay_rule="absolute"))
    T = 10
    seeds_of = [[derive_seed(1, r, t) for t in range(T)] for r in range(12)]
    data = {f"osc{k}": _synthetic("oscillate", 12, T, 10 + k) for k in range(4)}
    data["decay"] = _synthetic("decay", 12, T, 3)
    for r in range(12):
        for client, rows in data.items():
            mon.observe(client, r, seeds_of[r], rows[r])
    assert mon.limited() == {"decay"}
    assert mon.steps_for("decay", T) == 1 and mon.steps_for("osc0", T) == T
    st = mon.stats("decay")
    assert st is not None and st.rho_later > 10 and st.rho_quie == 1.0
    for k in range(4):
        s = mon.stats(f"osc{k}")
        assert s is not None and not s.flagged and s.rho_later < 3


def test_not_flagged_before_min_steps() -> None:
    th = DriftThresholds(window=5, min_steps=40, decay_rule="absolute")
    hist = [1.0] * 5 + [0.0] * 25  # decayed, but only 30 steps
    st = drift_stats(hist, th)
    assert st is not None and not st.flagged and math.isinf(st.rho_later)
    assert drift_stats(hist + [0.0] * 10, th).flagged  # type: ignore[union-attr]
    assert drift_stats([1.0] * 9, th) is None


def test_stats_are_computed_once_per_value_count(monkeypatch: pytest.MonkeyPatch) -> None:
    """observe_gradip then stats (what the coordinator does for every Update) computes the statistics once
    (none while the history is shorter than 2 windows); a new observation recomputes, and the values equal
    a fresh drift_stats over the same history."""
    import coordinator.drift as drift
    from coordinator.drift_decay import window_stats as real

    calls: list[int] = []
    def counted(early: float, last: Sequence[float], th: DriftThresholds, n: int) -> DriftStats:
        calls.append(1)
        return real(early, last, th, n)

    monkeypatch.setattr(drift, "window_stats", counted)
    th = DriftThresholds(window=2, min_steps=4)
    mon = DriftMonitor(_grad(100), thresholds=th, keep_history=False)
    seen: list[float] = []
    for r in range(4):
        g = [1.0 / (r + 1), -0.5 / (r + 1)]
        seen += g
        mon.observe_gradip("a", r, g)
        assert mon.stats("a") == drift_stats(seen, th) and len(calls) == max(0, r)
    assert mon.stats("a") is mon.stats("a") and len(calls) == 3


@pytest.mark.parametrize("keep_history", [False, True])
def test_monitor_stats_equal_drift_stats_of_the_whole_history(keep_history: bool) -> None:
    """The monitor keeps the early mean and reads the last window; drift_stats reads the whole history:
    the same statistics after every observation (random lengths, signs, zeros, decaying runs)."""
    rng = np.random.default_rng(5)
    th = DriftThresholds(window=5, min_steps=10, later_min=1.5, quie_min=0.4, decay_rule="absolute")
    mon = DriftMonitor(_grad(100), thresholds=th, keep_history=keep_history)
    hist: dict[str, list[float]] = {}
    for r in range(40):
        for c in ("a", "b", "c"):
            g = (rng.normal(size=int(rng.integers(1, 9))) * (0.0 if rng.random() < 0.1 else 0.8 ** r)).tolist()
            hist.setdefault(c, []).extend(g)
            mon.observe_gradip(c, r, g)
            assert mon.stats(c) == drift_stats(hist[c], th), (c, r)
    assert any(mon.stats(c) is not None and mon.stats(c).flagged for c in hist)  # type: ignore[union-attr]


def test_flag_is_sticky_and_bad_input_raises() -> None:
    g = _grad(100)
    th = DriftThresholds(window=2, min_steps=4, later_min=2.0, quiet_ratio=0.5, quie_min=0.5, decay_rule="absolute")
    mon = DriftMonitor(g, thresholds=th)
    seeds = [derive_seed(2, 0, t) for t in range(4)]
    mon.observe("c", 0, seeds, [1.0, -1.0, 1e-6, 1e-6])
    assert mon.limited() == {"c"} and mon.flagged_round("c") == 0
    mon.observe("c", 1, seeds, [5.0, -5.0, 5.0, 5.0])  # recovers: stays limited
    assert mon.limited() == {"c"}
    with pytest.raises(ValueError, match="grads"):
        mon.observe("d", 0, seeds[:1], [1.0, 2.0])
    with pytest.raises(ValueError, match="not finite"):
        mon.observe("d", 1, seeds, [math.nan])
    with pytest.raises(ValueError, match="min_steps"):
        DriftThresholds(window=10, min_steps=5)
    with pytest.raises(ValueError, match="no mean pre-training gradient"):
        DriftMonitor.from_mask(object())


def _fleet_round(r: int, T: int, n: int, seed: int, scale: float = 1.0) -> dict[str, list[float]]:
    """n clients' grads of round r: |g| in [0.5, 1.5) x scale with alternating signs (a fleet's spread)."""
    u = raw_u64(derive_seed(seed, r), n * T).astype(np.float64) / 2.0**64
    return {f"c{k}": [(1 if t % 2 else -1) * (0.5 + u[k * T + t]) * scale for t in range(T)] for k in range(n)}


def test_spike_ratio_is_peak_over_the_round_median() -> None:
    th = DriftThresholds(spike_ratio=10.0, spike_min_updates=3)
    ups = {"a": [1.0, -2.0], "b": [0.5, 1.0], "c": [-1.0, 1.0], "d": [3.0, -40.0]}
    st = spike_stats(4, ups, th)
    assert st["d"].median == 1.0 and st["d"].peak == 40.0 and st["d"].ratio == 40.0 and st["d"].round == 4
    assert st["a"].ratio == 2.0 and [c for c, s in st.items() if s.flagged] == ["d"]
    assert spike_stats(4, {"a": [1.0], "d": [40.0]}, th) == {}  # 2 updates < spike_min_updates
    assert spike_stats(4, ups, DriftThresholds()) == {}  # 4 updates < the default spike_min_updates (5)
    assert not spike_stats(4, ups, DriftThresholds(spike_ratio=0.0, spike_min_updates=3))["d"].flagged  # 0 = off
    zero = spike_stats(0, {"a": [0.0], "b": [0.0], "c": [0.0, 0.0], "d": [1e-9]}, th)
    assert math.isinf(zero["d"].ratio) and zero["d"].flagged and zero["a"].ratio == 0.0 and not zero["a"].flagged


def _spike_stats_loop(round: int, updates: dict[str, list[float]], th: DriftThresholds) -> dict[str, SpikeStats]:
    """The per-client definition (the module doc's ratio_{k,r}), written as a plain loop."""
    if len(updates) < th.spike_min_updates:
        return {}
    mags = np.abs(np.concatenate([np.asarray(g, dtype=np.float64) for g in updates.values()]))
    if mags.size == 0:
        return {}
    median = float(np.median(mags))
    out = {}
    for client in sorted(updates):
        peak = max((abs(float(x)) for x in updates[client]), default=0.0)
        ratio = peak / median if median > 0 else (math.inf if peak > 0 else 0.0)
        out[client] = SpikeStats(round, peak, median, ratio, th.spike_ratio > 0 and ratio >= th.spike_ratio)
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_spike_stats_equals_the_per_client_loop(seed: int) -> None:
    """The one-pass numpy version gives exactly the loop's values: mixed T_k (limited clients send 1 grad,
    one update none), ties, zeros, odd and even value counts, unsorted client ids."""
    u = raw_u64(derive_seed(seed, 5), 4000).astype(np.float64) / 2.0**64 - 0.5
    ups: dict[str, list[float]] = {}
    i = 0
    for k in range(300):
        T = [10, 1, 3][k % 3] if k != 7 else 0
        ups[f"c{(k * 37) % 300:03d}"] = [float(x) * (1e3 if k == 11 else 1.0) for x in u[i : i + T]]
        i += T
    ups["c000"] = [0.0, -0.0, 0.25, -0.25]
    ups["c001"] = [0.25]
    for th in (DriftThresholds(), DriftThresholds(spike_ratio=0.0), DriftThresholds(spike_ratio=2.0)):
        assert spike_stats(9, ups, th) == _spike_stats_loop(9, ups, th)
        odd = dict(list(ups.items())[:-1])
        assert spike_stats(9, odd, th) == _spike_stats_loop(9, odd, th)
    zeros = {"a": [0.0], "b": [], "c": [0.0, 0.0], "d": [1e-9]}
    assert spike_stats(0, zeros, DriftThresholds()) == _spike_stats_loop(0, zeros, DriftThresholds())


def test_spike_flags_only_the_diverging_client_and_is_sticky() -> None:
    mon = DriftMonitor(_grad(500), thresholds=DriftThresholds(spike_ratio=10.0))
    T, n = 10, 10
    for r in range(3):  # a fleet whose scale drifts over rounds (x4): the ratio is per round, nobody spikes
        assert mon.observe_round(r, _fleet_round(r, T, n, 1, scale=4.0**r)) == {}
    ups = _fleet_round(3, T, n, 1)
    ups["c3"] = [g * (20.0 if t >= 6 else 1.0) for t, g in enumerate(ups["c3"])]  # diverges in its last steps
    flagged = mon.observe_round(3, ups)
    assert list(flagged) == ["c3"] and flagged["c3"].ratio > 10.0
    assert mon.limited() == {"c3"} and mon.flagged_round("c3") == 3 and mon.reason("c3") == "spike"
    assert mon.steps_for("c3", T) == 1 and mon.steps_for("c0", T) == T
    assert mon.observe_round(3, ups) == {}  # the same round again: ignored
    assert [s.round for s in mon.spikes("c3")] == [0, 1, 2, 3]
    calm = _fleet_round(4, T, n, 1)
    calm["c3"] = [calm["c3"][0]]  # limited: one step, an ordinary one
    assert mon.observe_round(4, calm) == {} and mon.limited() == {"c3"}  # sticky
    ups5 = _fleet_round(5, T, n, 1)
    ups5["c3"] = [50.0]
    assert list(mon.observe_round(5, ups5)) == ["c3"] and mon.flagged_round("c3") == 3  # still reported, not re-flagged
    compact = DriftMonitor(_grad(500), keep_history=False)
    for r in range(3):
        compact.observe_round(r, _fleet_round(r, T, n, 1))
    assert [s.round for s in compact.spikes("c0")] == [2]


def test_spike_thresholds_are_validated() -> None:
    with pytest.raises(ValueError, match="spike_ratio"):
        DriftThresholds(spike_ratio=0.5)
    with pytest.raises(ValueError, match="spike_ratio"):
        DriftThresholds(spike_ratio=math.inf)
    with pytest.raises(ValueError, match="spike_min_updates"):
        DriftThresholds(spike_min_updates=1)


def _fleet_run(mon: DriftMonitor, data: dict[str, list[list[float]]], rounds: int, T: int) -> list[tuple[int, str]]:
    """Feed every client's round as the RoundBook does (observe per update, observe_fleet at close);
    (round, client) of every flag, in order."""
    seeds_of = [[derive_seed(1, r, t) for t in range(T)] for r in range(rounds)]
    flags = []
    for r in range(rounds):
        for client, rows in data.items():
            assert mon.observe(client, r, seeds_of[r], rows[r]) is None or mon.thresholds.decay_rule == "absolute"
        flags += [(r, c) for c in mon.observe_fleet(r, data)]
    return flags


def _converging_fleet(n: int, rounds: int, T: int) -> dict[str, list[list[float]]]:
    """n clients whose GradIP all decay together to a floor (the whole fleet converged: loss ~0, |GradIP|
    ~5% of its start), each at its own rate exp(-step / tau) with tau in 12..18 and its own noise."""
    out = {}
    for k in range(n):
        base = _synthetic("oscillate", rounds, T, 40 + k)
        tau = 12.0 + 6.0 * k / max(n - 1, 1)
        out[f"c{k}"] = [[v / (1.0 + 0.5 * math.sin((r * T + t) / 3.0)) * max(math.exp(-(r * T + t) / tau), 0.05)
                         for t, v in enumerate(row)] for r, row in enumerate(base)]
    return out


def test_fleet_rule_ignores_a_decay_the_whole_fleet_shares() -> None:
    T, rounds = 10, 12
    data = _converging_fleet(8, rounds, T)
    fleet = DriftMonitor(_grad(2000), thresholds=DriftThresholds(decay_rule="fleet"))
    assert _fleet_run(fleet, data, rounds, T) == []  # everyone converged: nobody stands out
    for c in data:
        st, fs = fleet.stats(c), fleet.fleet(c)
        assert st is not None and st.rho_later > 10 and not st.flagged  # decayed, measured, not acted on
        assert fs is not None and fs.round == rounds - 1 and fs.ratio < 3.0
    paper = DriftMonitor(_grad(2000), thresholds=DriftThresholds(decay_rule="absolute"))
    _fleet_run(paper, data, rounds, T)
    assert paper.limited() == set(data)  # the paper's rule: the whole converged fleet limited


def test_fleet_rule_flags_the_client_that_decays_alone() -> None:
    T, rounds = 10, 12
    data = {f"osc{k}": _synthetic("oscillate", rounds, T, 10 + k) for k in range(6)}
    data["decay"] = _synthetic("decay", rounds, T, 3)
    mon = DriftMonitor(_grad(2000), thresholds=DriftThresholds(decay_rule="fleet"), keep_history=False)
    flags = _fleet_run(mon, data, rounds, T)
    assert flags == [(3, "decay")]  # at the first close with >= min_steps = 40 values, at round close only
    assert mon.limited() == {"decay"} and mon.reason("decay") == "decay" and mon.steps_for("decay", T) == 1
    fs = mon.fleet("decay")
    assert fs is not None and fs.round == 3 and fs.ratio >= 3.0 and fs.median < 3.0 and fs.flagged
    assert mon.observe_fleet(3, data) == {}  # the same round again: ignored
    assert mon.fleet("osc0") is not None and mon.fleet("decay").round == 3  # type: ignore[union-attr]
    # limited clients leave the fleet: later medians are the others' only
    assert mon.observe_fleet(rounds, data) == {} and mon.fleet("decay").round == 3  # type: ignore[union-attr]


def test_fleet_rule_off_by_default_and_needs_enough_clients() -> None:
    assert DriftThresholds().decay_rule == "off"  # no threshold separated on real runs (BENCHMARKS.md)
    T, rounds = 10, 12
    data = {f"osc{k}": _synthetic("oscillate", rounds, T, 10 + k) for k in range(6)}
    data["decay"] = _synthetic("decay", rounds, T, 3)
    off = DriftMonitor(_grad(2000))
    assert _fleet_run(off, data, rounds, T) == [] and off.limited() == set()
    fs = off.fleet("decay")
    assert fs is not None and fs.ratio >= 3.0 and not fs.flagged  # measured, never acted on
    few = DriftMonitor(_grad(2000), thresholds=DriftThresholds(decay_rule="fleet", fleet_min_clients=8))
    assert _fleet_run(few, data, rounds, T) == [] and few.fleet("decay") is None  # 7 clients < 8


def test_fleet_decay_stats_ratio_and_validation() -> None:
    th = DriftThresholds(window=2, min_steps=4, decay_rule="fleet", fleet_ratio=2.0, fleet_min_clients=3)
    st = {c: drift_stats(h, th) for c, h in {"a": [1, 1, 1, 1], "b": [2, 2, 1, 1], "c": [4, 4, 1, 1],
                                             "short": [1, 1, 1]}.items()}
    ok = {c: s for c, s in st.items() if s is not None}
    out = fleet_decay_stats(7, ok, th)
    assert sorted(out) == ["a", "b", "c"]  # "short" has no statistics yet
    assert out["b"].median == 2.0 and out["c"].ratio == 2.0 and out["c"].flagged and not out["b"].flagged
    assert out["a"].ratio == 0.5 and out["a"].round == 7 and out["a"].n_steps == 4
    assert fleet_decay_stats(7, {"a": ok["a"], "b": ok["b"]}, th) == {}  # < fleet_min_clients
    absolute = DriftThresholds(window=2, min_steps=4, decay_rule="absolute", fleet_ratio=2.0, fleet_min_clients=3)
    assert not any(f.flagged for f in fleet_decay_stats(7, ok, absolute).values())
    for bad, match in (({"decay_rule": "paper"}, "decay_rule"), ({"fleet_ratio": 0.5}, "fleet_ratio"),
                       ({"fleet_ratio": math.inf}, "fleet_ratio"), ({"fleet_min_clients": 1}, "fleet_min_clients")):
        with pytest.raises(ValueError, match=match):
            DriftThresholds(**bad)
