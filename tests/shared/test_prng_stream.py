"""The direction stream: golden vectors, agreement of every implementation, offsets, bad input, CUDA."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from shared import prng
from shared.gaussian import gauss_table
from shared.prng import derive_seed, directions, mix64, raw_u64, u64_at

GOLDEN = json.loads((Path(__file__).parent / "golden" / "prng_v1.json").read_text())
CASES = GOLDEN["cases"]


def _gauss(hexes: list[str]) -> np.ndarray:
    return np.array([struct.unpack("<f", bytes.fromhex(h))[0] for h in hexes], dtype=np.float32)


def test_seed_zero_is_plain_splitmix64() -> None:
    # mix64(0) == 0, so stream 0 is the textbook splitmix64 sequence from state 0
    assert mix64(0) == 0
    assert u64_at(0, 0) == 0xE220A8397B1DCDAF
    assert u64_at(0, 1) == 0x6E789E6AA1B965F4


def test_mix64_and_derive_seed_golden() -> None:
    for x, want in GOLDEN["mix64"].items():
        assert f"{mix64(int(x)):016x}" == want
    for d in GOLDEN["derive_seed"]:
        assert derive_seed(int(d["master"]), *(int(p) for p in d["path"])) == int(d["seed"])


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"s{c['seed'][:6]}-o{c['offset'][:6]}")
def test_golden_vectors_every_path(case: dict[str, object]) -> None:
    seed, offset, n = int(str(case["seed"])), int(str(case["offset"])), GOLDEN["n"]
    want_u = [int(h, 16) for h in case["u64"]]  # type: ignore[attr-defined]
    want_r = np.array(case["rademacher"], dtype=np.float32)
    want_g = _gauss(case["gaussian_f32_hex"])  # type: ignore[arg-type]
    assert [u64_at(seed, offset + j) for j in range(n)] == want_u
    assert raw_u64(seed, n, offset).tolist() == want_u
    assert np.array_equal(directions(seed, n, "rademacher", offset=offset).numpy(), want_r)
    assert np.array_equal(directions(seed, n, "gaussian", offset=offset).numpy(), want_g)
    pairs: tuple[tuple[prng.Dist, np.ndarray], ...] = (("rademacher", want_r), ("gaussian", want_g))
    for dist, want in pairs:
        t = prng._torch_directions(seed, n, dist, offset, torch.device("cpu"))
        assert t.dtype == torch.float32 and np.array_equal(t.numpy(), want)


@pytest.mark.parametrize("dist", ["rademacher", "gaussian"])
@pytest.mark.parametrize(
    "n,offset", [(1, 0), (prng._CHUNK, 0), (prng._CHUNK + 1, 3), (3 * prng._CHUNK + 17, 1 << 33)]
)
def test_fast_paths_match_reference_across_chunks(dist: prng.Dist, n: int, offset: int) -> None:
    seed = derive_seed(7, n, offset)
    u = raw_u64(seed, n, offset)
    want = (
        np.where(u >> np.uint64(63) == 0, 1.0, -1.0).astype(np.float32)
        if dist == "rademacher"
        else gauss_table()[(u >> np.uint64(48)).astype(np.int64)]
    )
    fast = directions(seed, n, dist, offset=offset)
    assert fast.shape == (n,) and fast.dtype == torch.float32
    assert np.array_equal(fast.numpy(), want)
    assert np.array_equal(prng._torch_directions(seed, n, dist, offset, torch.device("cpu")).numpy(), want)


def test_element_depends_only_on_seed_and_index() -> None:
    seed = 0xDEADBEEF
    full = directions(seed, 100_000, "gaussian")
    part = directions(seed, 1000, "gaussian", offset=54_321)
    assert torch.equal(part, full[54_321:55_321])
    assert directions(seed, 0).shape == (0,)


def test_streams_differ_and_look_random() -> None:
    a = directions(1, 1 << 20)
    b = directions(2, 1 << 20)
    assert not torch.equal(a, b)
    assert set(a.unique().tolist()) == {-1.0, 1.0}
    assert abs(float(a.mean())) < 5 / 1024  # 5 sigma for 2^20 fair signs
    assert abs(float((a * b).mean())) < 5 / 1024
    g = directions(3, 1 << 20, "gaussian").double()
    assert abs(float(g.mean())) < 0.005 and abs(float(g.var()) - 1.0) < 0.01


def test_derive_seed_tree_is_distinct() -> None:
    seeds = {derive_seed(99, r, t) for r in range(50) for t in range(20)}
    assert len(seeds) == 1000
    assert all(0 <= s < 1 << 64 for s in seeds)


@pytest.mark.parametrize(
    "kwargs,msg",
    [
        ({"seed": -1, "n": 4}, "seed"),
        ({"seed": 1 << 64, "n": 4}, "seed"),
        ({"seed": 1.5, "n": 4}, "seed"),
        ({"seed": 1, "n": -1}, "n must"),
        ({"seed": 1, "n": 4, "offset": -2}, "offset"),
        ({"seed": 1, "n": 4, "offset": (1 << 64) - 2}, "offset \\+ n"),
        ({"seed": 1, "n": 4, "dist": "uniform"}, "dist"),
    ],
)
def test_bad_input_names_the_argument(kwargs: dict[str, object], msg: str) -> None:
    with pytest.raises(ValueError, match=msg):
        directions(**kwargs)  # type: ignore[arg-type]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dist", ["rademacher", "gaussian"])
def test_cuda_generates_same_bits_on_gpu(dist: str) -> None:
    for case in CASES[::3]:
        seed, offset = int(case["seed"]), int(case["offset"])
        got = directions(seed, GOLDEN["n"], dist, device="cuda", offset=offset)  # type: ignore[arg-type]
        assert got.device.type == "cuda"
        assert torch.equal(got.cpu(), directions(seed, GOLDEN["n"], dist, offset=offset))  # type: ignore[arg-type]
    n = 3 * prng._CHUNK + 5
    got = directions(12345, n, dist, device="cuda", offset=1 << 40)  # type: ignore[arg-type]
    assert got.device.type == "cuda" and got.dtype == torch.float32
    assert torch.equal(got.cpu(), directions(12345, n, dist, offset=1 << 40))  # type: ignore[arg-type]
