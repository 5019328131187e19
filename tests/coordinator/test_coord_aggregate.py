"""Per-seed aggregation == the dense FedAvg of the clients' virtual paths; robust rules do what they say."""

from __future__ import annotations

import math

import numpy as np
import pytest
from coordfakes import synthetic_v0

from coordinator import centered
from coordinator.aggregate import Group, aggregate, result_scalars
from coordinator.scheduler import close_decision, round_seeds
from shared.apply import apply_round
from shared.prng import derive_seed, directions, raw_u64


def _grads(seed: int, n: int) -> list[float]:
    u = raw_u64(seed, n)
    return [float(x) for x in ((u >> 40).astype(np.float64) / 2**24 - 0.5) * 4.0]


@pytest.mark.parametrize("T", [1, 10])
@pytest.mark.parametrize("dist", ["rademacher", "gaussian"])
def test_fedavg_equals_dense_reference(T: int, dist: str) -> None:
    nnz, lr, master = 4096, 0.01, 1234
    v0 = synthetic_v0(nnz)
    seeds = list(round_seeds(master, 5, T))
    n = {"a": 3, "b": 17, "c": 40, "d": 1}
    steps = {"a": T, "b": T, "c": max(1, T // 2), "d": 1}  # unequal T_k too (VP-limited clients)
    per = {k: _grads(derive_seed(master, 99, i), steps[k]) for i, k in enumerate(n)}
    G = aggregate("fedavg", per, n, T)
    got = apply_round(v0, seeds, G, lr, dist).numpy().astype(np.float64)  # type: ignore[arg-type]

    total = sum(n.values())
    ref = np.zeros(nnz)
    for k in n:
        v = v0.numpy().astype(np.float64)
        for s, g in zip(seeds, per[k], strict=False):
            v = v - lr * g * directions(s, nnz, dist).numpy().astype(np.float64)  # type: ignore[arg-type]
        ref += n[k] / total * v
    assert np.abs(got - ref).max() <= 1e-6 * max(1.0, np.abs(ref).max())
    # and it really moved: not a trivially equal pair
    assert np.abs(got - v0.numpy()).max() > 1e-4


def test_median_trimmed_clipped() -> None:
    per = {"a": [1.0, 2.0], "b": [2.0, 3.0], "c": [3.0, 4.0], "evil": [1e5, -1e5]}
    n = {"a": 1, "b": 1, "c": 1, "evil": 100}
    assert aggregate("median", per, n, 2) == [2.5, 2.5]
    assert aggregate("trimmed", per, n, 2, trim_fraction=0.25) == [2.5, 2.5]
    clipped = aggregate("clipped", per, n, 2, clip_norm=1.0)
    # the heavy client counts with weight 100/103 but its vector has norm 1 after clipping
    s = 1.0 / math.hypot(1e5, 1e5)
    manual = {k: [g * min(1.0, 1.0 / math.hypot(*v)) for g in v] for k, v in per.items()}
    assert clipped == pytest.approx([sum(n[k] * manual[k][t] for k in n) / 103 for t in range(2)])
    assert manual["evil"][0] == pytest.approx(1e5 * s)
    # missing later steps count as 0 for the robust rules (the client's path stopped)
    assert aggregate(
        "median", {"a": [1.0], "b": [3.0, 3.0], "c": [5.0, 5.0]}, {"a": 1, "b": 1, "c": 1}, 2
    ) == [3.0, 3.0]


def test_bad_input_is_named() -> None:
    with pytest.raises(ValueError, match="aggregation rule"):
        aggregate("mean", {"a": [1.0]}, {"a": 1}, 1)
    with pytest.raises(ValueError, match="client 'a'"):
        aggregate("median", {"a": [1.0, 2.0]}, {"a": 1}, 1)
    with pytest.raises(ValueError, match="no client"):
        aggregate("fedavg", {}, {}, 1)


def test_result_scalars_late_fold_is_one_fsum_per_scalar() -> None:
    """docs/PROTOCOL.md 5.1 by hand: w_j = n_j / N over on-time AND late contributors, one fsum per scalar."""
    on = Group((1, 2), {"a": [0.1, 0.7], "b": [0.3]}, {"a": 3, "b": 5})
    late = Group((11, 12, 13), {"x": [0.2, -0.9], "y": [0.6]}, {"x": 7, "y": 1})
    seeds, g = result_scalars("fedavg", on, [late])
    N = 16.0
    assert seeds == [1, 2, 11, 12]  # the late round's seeds up to its longest update
    want = [math.fsum([3 / N * 0.1, 5 / N * 0.3]), 3 / N * 0.7, math.fsum([7 / N * 0.2, 1 / N * 0.6]), 7 / N * -0.9]
    assert g == want  # bit for bit, not approx
    # nothing late: exactly the on-time aggregate (no rescaling on the way)
    assert result_scalars("fedavg", on) == ([1, 2], aggregate("fedavg", on.grads, on.n_samples, 2))
    # robust rule: the on-time median scaled by the on-time share, late ones with their FedAvg weight
    _, gm = result_scalars("median", on, [late])
    assert gm[:2] == [(8 / N) * x for x in aggregate("median", on.grads, on.n_samples, 2)] and gm[2:] == want[2:]
    # clipped: every contributor (late too) clipped to the norm first
    _, gc = result_scalars("clipped", on, [Group((11,), {"x": [30.0]}, {"x": 8})], clip_norm=1.0)
    assert gc == [math.fsum([3 / N * 0.1, 5 / N * 0.3]), 3 / N * 0.7, 8 / N * 1.0]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_result_scalars_fedavg_is_the_formula_bit_for_bit(seed: int) -> None:
    """The column-wise fast path (clients with all T steps) and the limited clients (T_k < T) together give
    exactly the formula's fsum per scalar, whatever the mix (none, some or all limited; one client)."""
    T = 7
    for case, n in enumerate((1, 3, 40)):
        steps = [[T] * n, [T if i % 3 else 1 for i in range(n)], [1 + i % (T - 1) for i in range(n)]]
        for kind, ts in enumerate(steps):
            ks = [f"c{(i * 13) % n:02d}" for i in range(n)]
            grads = {k: _grads(derive_seed(seed, case, kind, i), t) for i, (k, t) in enumerate(zip(ks, ts, strict=True))}
            ns = {k: 1 + int(raw_u64(derive_seed(seed, case, kind, i, 1), 1)[0] % 500) for i, k in enumerate(ks)}
            N = math.fsum(float(v) for v in ns.values())
            want = [math.fsum(ns[k] / N * gs[t] for k, gs in grads.items() if len(gs) > t) for t in range(T)]
            got = result_scalars("fedavg", Group(tuple(range(T)), grads, ns))[1]
            assert [x.hex() for x in got] == [x.hex() for x in want]


def test_close_decision() -> None:
    assert close_decision(["a", "b"], ["a", "b"], 0.0, 10.0, 2, 0, 3).action == "close"
    assert close_decision(["a", "b"], ["a"], 0.0, 10.0, 1, 0, 3).action == "wait"
    assert close_decision(["a", "b"], ["a"], 11.0, 10.0, 1, 0, 3).action == "close"
    assert close_decision(["a", "b", "c"], ["a"], 11.0, 10.0, 2, 0, 3).action == "extend"
    assert close_decision(["a", "b", "c"], ["a"], 11.0, 10.0, 2, 3, 3).action == "close"
    assert close_decision(["a", "b"], [], 11.0, 10.0, 1, 3, 3).action == "extend"


def test_centered_is_fedavg_bit_for_bit_when_nothing_is_an_outlier() -> None:
    per = {"a": [0.1, -0.4, 0.9], "b": [0.3, -0.2, 0.7], "c": [0.2, -0.3, 0.8], "d": [0.25, -0.35, 0.75]}
    n = {"a": 3, "b": 5, "c": 7, "d": 11}
    assert aggregate("centered", per, n, 3) == aggregate("fedavg", per, n, 3)
    on = Group((1, 2, 3), per, n)
    assert result_scalars("centered", on) == result_scalars("fedavg", on)


def test_centered_clips_an_outlier_into_the_band() -> None:
    per = {"a": [1.0, 2.0], "b": [2.0, 3.0], "c": [3.0, 4.0], "evil": [1e5, -1e5]}
    n = {"a": 1, "b": 1, "c": 1, "evil": 2}
    G = aggregate("centered", per, n, 2, center_clip_k=4.0)
    # step 0: median 2.5, |d| = 1.5, 0.5, 0.5, 99997.5 -> MAD 1.0, band [-1.5, 6.5]; evil -> 6.5
    # step 1: median 2.5, |d| = 0.5, 0.5, 1.5, 100002.5 -> MAD 1.0, band [-1.5, 6.5]; evil -> -1.5
    w, we = 1 / 5, 2 / 5  # w_k = n_k / N, one division each (docs/PROTOCOL.md 5.1)
    assert G == [math.fsum([w * 1.0, w * 2.0, w * 3.0, we * 6.5]), math.fsum([w * 2.0, w * 3.0, w * 4.0, we * -1.5])]
    # two values: each is half their gap from the median, inside the band: plain FedAvg (no outlier to tell)
    two = {"a": [1.0], "evil": [1e5]}
    assert aggregate("centered", two, {"a": 1, "evil": 1}, 1) == aggregate("fedavg", two, {"a": 1, "evil": 1}, 1)


def test_centered_bounds_late_updates_by_the_on_time_median() -> None:
    on = Group((1,), {"a": [1.0], "b": [-2.0], "c": [3.0]}, {"a": 1, "b": 1, "c": 1})
    late = Group((7, 8), {"evil": [1e6, -1e6]}, {"evil": 1})
    seeds, g = result_scalars("centered", on, [late], center_clip_k=4.0)
    assert seeds == [1, 7, 8]
    # late bound = 4 x median(|1|, |-2|, |3|) = 8; N = 4
    assert g[1:] == [1 / 4 * 8.0, 1 / 4 * -8.0]
    # steps a VP-limited client did not run are not in its step's band (as FedAvg skips them)
    per = {"a": [1.0], "b": [2.0, 5.0], "c": [3.0, 6.0], "d": [2.5, 5.5]}
    assert aggregate("centered", per, dict.fromkeys(per, 1), 2) == aggregate("fedavg", per, dict.fromkeys(per, 1), 2)


@pytest.mark.parametrize("n", [2, 3, 4, 9, 50])
def test_centered_numpy_pass_is_the_per_step_rule(n: int) -> None:
    """clipped_steps (one numpy pass per step) == `band` + min/max per value, bit for bit: mixed T_k, ties,
    odd and even counts, heavy outliers."""
    from coordinator.centered import band, clipped_steps

    T = 6
    per = {f"c{i}": [g * (1e4 if (i + t) % 7 == 0 else 1.0) for t, g in enumerate(_grads(derive_seed(5, i), T))]
           for i in range(n)}  # fmt: skip
    per["c0"] = per["c0"][:2]  # a VP-limited client (n >= 2)
    per[f"c{n - 1}"] = list(per["c0"]) + [0.0] * (T - 2)  # ties with c0 on its steps
    got, clipped = clipped_steps(per, T, 4.0)
    want = {c: list(gs) for c, gs in per.items()}
    count = 0
    for t in range(T):
        present = [c for c, gs in per.items() if len(gs) > t]
        lim = band([per[c][t] for c in present], 4.0)
        if lim is None:
            continue
        for c in present:
            new = min(max(per[c][t], lim[0]), lim[1])
            count += new != per[c][t]
            want[c][t] = new
    assert {c: list(gs) for c, gs in got.items()} == want and clipped == count
    assert (clipped > 0) == (n >= 3)  # two values are never clipped (each is half their gap from the median)


def test_centered_discount_weighs_a_device_by_its_share_of_scalars_inside_the_bands() -> None:
    honest = {"a": [1.0, 3.0], "b": [1.5, 3.5], "c": [2.0, 4.0], "d": [2.5, 4.5]}  # inside every band below
    n = {"a": 1, "b": 2, "c": 3, "d": 4, "evil": 5}
    # every scalar of evil outside its band: with the discount it weighs 0, the result is the honest FedAvg
    per = honest | {"evil": [1e5, -1e5]}
    on = Group((1, 2), per, n)
    want = result_scalars("fedavg", Group((1, 2), honest, {k: n[k] for k in honest}))
    got = result_scalars("centered", on, center_clip_k=4.0, center_discount=True)
    assert [x.hex() for x in got[1]] == [x.hex() for x in want[1]]
    assert aggregate("centered", per, n, 2, center_clip_k=4.0, center_discount=True) == want[1]
    assert got != result_scalars("centered", on, center_clip_k=4.0)  # without it evil weighs 5 at the band edge
    # one of two scalars outside: weight n * 1/2. Step 0: median 2, MAD 0.5, k 4 -> [0, 4]; step 1: 3.0 inside
    per = honest | {"evil": [1e5, 3.0]}
    c = centered.clip_round(per, 2, 4.0)
    assert c.clipped == {"evil": 1} and c.judged == dict.fromkeys(per, 2) and c.trust("evil") == 0.5
    w = {"a": 1.0, "b": 2.0, "c": 3.0, "d": 4.0, "evil": 2.5}  # n_j * trust_j
    N = math.fsum(w.values())
    vals = honest | {"evil": [4.0, 3.0]}
    exact = [math.fsum(w[k] / N * vals[k][t] for k in per) for t in range(2)]
    assert result_scalars("centered", Group((1, 2), per, n), center_clip_k=4.0, center_discount=True)[1] == exact


def test_centered_discount_also_weighs_late_updates_and_leaves_a_clean_round_fedavg() -> None:
    on = Group((1,), {"a": [1.0], "b": [-2.0], "c": [3.0]}, {"a": 1, "b": 1, "c": 1})
    late = Group((7, 8), {"evil": [1e6, -1e6], "ok": [1.0, 5.0]}, {"evil": 1, "ok": 2})
    seeds, g = result_scalars("centered", on, [late], center_clip_k=2.0, center_discount=True)
    # late bound 2 x median(1, 2, 3) = 4: evil clipped twice (weight 0), ok once (weight 2 x 1/2 = 1); N = 4
    assert seeds == [1, 7, 8]
    assert g == [math.fsum([1 / 4 * 1.0, 1 / 4 * -2.0, 1 / 4 * 3.0]), math.fsum([0.0, 1 / 4 * 1.0]),
                 math.fsum([0.0, 1 / 4 * 4.0])]  # fmt: skip
    per = {"a": [0.1, -0.4, 0.9], "b": [0.3, -0.2, 0.7], "c": [0.2, -0.3, 0.8], "d": [0.25, -0.35, 0.75]}
    clean = Group((1, 2, 3), per, {"a": 3, "b": 5, "c": 7, "d": 11})
    assert result_scalars("centered", clean, center_discount=True) == result_scalars("fedavg", clean)
