"""apply_round: defined order and precision, bit-identical across processes; fedavg_scalars."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from shared.apply import apply_round, fedavg_scalars, values_checksum
from shared.prng import derive_seed, directions

N = 200_003
SEEDS = [derive_seed(5, 0, t) for t in range(12)]
SCALARS = [0.731, -1.25e-3, 3.5, -0.0625, 1e-7, 2.0, -7.75, 0.5, 0.01, -0.333, 4.2e2, -1.0]

SCRIPT = """
import sys, torch
torch.set_num_threads(int(sys.argv[1]))
from shared.apply import apply_round, values_checksum
from shared.prng import derive_seed, directions
seeds = [derive_seed(5, 0, t) for t in range(12)]
scalars = {scalars!r}
v0 = directions(derive_seed(1, 2), {n}, "gaussian") * 0.02
for dist in ("rademacher", "gaussian"):
    print(values_checksum(apply_round(v0, seeds, scalars, 1e-3, dist)))
"""


def _v0() -> torch.Tensor:
    return directions(derive_seed(1, 2), N, "gaussian") * 0.02


@pytest.mark.parametrize("dist", ["rademacher", "gaussian"])
def test_matches_naive_reference(dist: str) -> None:
    v0 = _v0()
    out = apply_round(v0, SEEDS, SCALARS, 1e-3, dist)  # type: ignore[arg-type]
    naive = v0.double().clone()
    for s, g in zip(SEEDS, SCALARS, strict=True):
        naive -= 1e-3 * g * directions(s, N, dist).double()  # type: ignore[arg-type]
    assert out.dtype == torch.float32 and out.shape == v0.shape
    assert torch.allclose(out.double(), naive, rtol=1e-6, atol=1e-7)
    assert not torch.equal(out, v0)


def test_equals_the_specified_float64_order_exactly() -> None:
    v0 = _v0()
    acc = np.zeros(N)
    for s, g in zip(SEEDS, SCALARS, strict=True):
        acc = acc + np.float64(g) * directions(s, N, "gaussian").numpy().astype(np.float64)
    want = (v0.numpy().astype(np.float64) - np.float64(1e-3) * acc).astype(np.float32)
    assert np.array_equal(apply_round(v0, SEEDS, SCALARS, 1e-3, "gaussian").numpy(), want)


def test_bit_identical_in_two_processes_with_different_thread_counts() -> None:
    script = SCRIPT.format(scalars=SCALARS, n=N)
    repo = Path(__file__).resolve().parents[2]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, threads],
            cwd=repo,
            env=dict(os.environ, OMP_NUM_THREADS=threads),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for threads in ("1", "2")
    ]
    outs = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        outs.append(out.split())
    assert outs[0] == outs[1]
    here = [values_checksum(apply_round(_v0(), SEEDS, SCALARS, 1e-3, d)) for d in ("rademacher", "gaussian")]
    assert outs[0] == here


def test_more_pairs_than_the_plan_are_summed_in_order() -> None:
    v0 = _v0()
    late = [(derive_seed(5, 9, 0), 0.125), (derive_seed(5, 9, 1), -2.0)]
    seeds = SEEDS + [s for s, _ in late]
    scalars = SCALARS + [g for _, g in late]
    out = apply_round(v0, seeds, scalars, 1e-3, "rademacher")
    naive = v0.double() - 1e-3 * sum(
        (g * directions(s, N).double() for s, g in zip(seeds, scalars, strict=True)),
        torch.zeros(N, dtype=torch.float64),
    )
    assert torch.allclose(out.double(), naive, rtol=1e-6, atol=1e-7)


def test_returns_new_tensor_and_leaves_input_alone() -> None:
    v0 = _v0()
    before = v0.clone()
    out = apply_round(v0, [], [], 1e-3, "rademacher")
    assert torch.equal(out, v0) and out.data_ptr() != v0.data_ptr()
    apply_round(v0, SEEDS, SCALARS, 1e-3, "gaussian")
    assert torch.equal(v0, before)


@pytest.mark.parametrize(
    "kwargs,err,msg",
    [
        ({"seeds": [1, 2], "scalars": [1.0]}, ValueError, "differ in length"),
        ({"scalars": [float("nan")]}, ValueError, "scalars\\[0\\]"),
        ({"lr": float("inf")}, ValueError, "lr"),
        ({"dist": "normal"}, ValueError, "dist"),
        ({"values": torch.zeros(4, dtype=torch.float64)}, ValueError, "float32"),
        ({"values": torch.zeros(2, 2)}, ValueError, "1-D"),
        ({"values": [0.0, 1.0]}, TypeError, "torch.Tensor"),
    ],
)
def test_bad_input(kwargs: dict[str, object], err: type[Exception], msg: str) -> None:
    args: dict[str, object] = {
        "values": torch.zeros(8),
        "seeds": [1],
        "scalars": [1.0],
        "lr": 0.1,
        "dist": "rademacher",
    }
    args.update(kwargs)
    with pytest.raises(err, match=msg):
        apply_round(**args)  # type: ignore[arg-type]


def test_values_checksum_is_sha256_of_le_float32() -> None:
    v = torch.tensor([1.0, -2.5, 3.25], dtype=torch.float32)
    assert (
        values_checksum(v) == hashlib.sha256(np.array([1.0, -2.5, 3.25], dtype="<f4").tobytes()).hexdigest()
    )
    w = v.clone()
    w.view(torch.int32)[1] ^= 1  # one ulp
    assert values_checksum(w) != values_checksum(v)


def test_fedavg_scalars_hand_example() -> None:
    per_client = {"a": [1.0, 2.0, 3.0], "b": [10.0], "c": [-4.0, 8.0]}
    weights = {"a": 1.0, "b": 2.0, "c": 1.0, "unused": 5.0}
    got = fedavg_scalars(per_client, weights, 3)
    assert got == [(1.0 + 20.0 - 4.0) / 4, (2.0 + 8.0) / 4, 3.0 / 4]
    assert fedavg_scalars(per_client, weights, 4)[3] == 0.0


def test_fedavg_equals_average_of_client_paths() -> None:
    n, lr = 5000, 0.01
    seeds = [derive_seed(11, t) for t in range(4)]
    v0 = directions(3, n, "gaussian")
    per_client = {"a": [0.5, -1.0, 2.0, 0.25], "b": [3.0, 1.5], "c": [-2.0]}
    weights = {"a": 30.0, "b": 10.0, "c": 60.0}
    total = sum(weights.values())
    avg = torch.zeros(n, dtype=torch.float64)
    for k, gs in per_client.items():
        path = apply_round(v0, seeds[: len(gs)], gs, lr, "gaussian")
        avg += weights[k] / total * path.double()
    fed = apply_round(v0, seeds, fedavg_scalars(per_client, weights, 4), lr, "gaussian")
    assert torch.allclose(fed.double(), avg, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "per_client,weights,T,msg",
    [
        ({}, {}, 1, "empty"),
        ({"a": [1.0]}, {}, 1, "no entry for client 'a'"),
        ({"a": [1.0]}, {"a": 0.0}, 1, "weights\\['a'\\]"),
        ({"a": [1.0, 2.0]}, {"a": 1.0}, 1, "more than T=1"),
        ({"a": [1.0]}, {"a": 1.0}, -1, "T must"),
    ],
)
def test_fedavg_bad_input(
    per_client: dict[str, list[float]], weights: dict[str, float], T: int, msg: str
) -> None:
    with pytest.raises(ValueError, match=msg):
        fedavg_scalars(per_client, weights, T)
