"""MEERKAT-VP drift monitor: c_t is the dense inner product, decaying GradIP gets flagged, oscillating not."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from coordinator.drift import DriftMonitor, DriftThresholds, drift_stats
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
    mon = DriftMonitor(g, thresholds=DriftThresholds())
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
    th = DriftThresholds(window=5, min_steps=40)
    hist = [1.0] * 5 + [0.0] * 25  # decayed, but only 30 steps
    st = drift_stats(hist, th)
    assert st is not None and not st.flagged and math.isinf(st.rho_later)
    assert drift_stats(hist + [0.0] * 10, th).flagged  # type: ignore[union-attr]
    assert drift_stats([1.0] * 9, th) is None


def test_flag_is_sticky_and_bad_input_raises() -> None:
    g = _grad(100)
    th = DriftThresholds(window=2, min_steps=4, later_min=2.0, quiet_ratio=0.5, quie_min=0.5)
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
