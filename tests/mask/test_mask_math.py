"""Global top-k, tie-breaking, concentration ratio and calibration packing, on hand-built inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from masktoy import uniform

from coordinator.mask.builder import (
    MaskBuildError,
    concentration,
    float_keys,
    k_for,
    pack_sequences,
    random_keys,
    read_calibration,
    select_top_k,
    top_values,
)
from shared import prng


def _scores(seed: int, shapes: dict[str, tuple[int, int]]) -> dict[str, torch.Tensor]:
    out = {}
    for i, (name, shape) in enumerate(sorted(shapes.items())):
        z = uniform(prng.derive_seed(seed, i), shape[0] * shape[1])
        out[name] = (z * z).view(shape)
    return out


def test_select_top_k_matches_a_full_sort() -> None:
    scores = _scores(3, {"a": (7, 9), "b": (5, 4), "c": (16, 3)})
    flat = torch.cat([scores[n].flatten() for n in sorted(scores)])
    for k in (1, 5, 17, flat.numel()):
        got = select_top_k(float_keys(scores), k)
        want = set(torch.topk(flat, k).indices.tolist())
        offsets = {"a": 0, "b": 63, "c": 83}
        got_global = {offsets[n] + int(i) for n, idx in got.items() for i in idx}
        assert got_global == want
        assert sum(t.numel() for t in got.values()) == k
        for idx in got.values():
            assert idx.dtype == torch.int64 and bool((idx[1:] > idx[:-1]).all())


def test_ties_go_to_lowest_layer_then_index() -> None:
    keys = {
        "b": torch.tensor([5, 9, 5, 5], dtype=torch.int64),
        "a": torch.tensor([1, 5, 2, 5], dtype=torch.int64),
    }
    # 9 is above the threshold; four 5s tie for the remaining 2 slots: a[1], a[3] win (layer a < b)
    got = select_top_k(keys, 3)
    assert got["a"].tolist() == [1, 3] and got["b"].tolist() == [1]
    got = select_top_k(keys, 4)
    assert got["a"].tolist() == [1, 3] and got["b"].tolist() == [0, 1]
    with pytest.raises(MaskBuildError, match="k must be"):
        select_top_k(keys, 9)


def test_float_keys_order_and_bad_scores() -> None:
    s = {"x": torch.tensor([0.0, -0.0, 1e-30, 1.0, 3.5, 1e30])}
    keys = float_keys(s)["x"]
    assert keys.tolist() == sorted(keys.tolist()) and keys[0] == keys[1]
    with pytest.raises(MaskBuildError, match="layer y: score has inf/NaN"):
        float_keys({"y": torch.tensor([1.0, float("nan")])})
    with pytest.raises(MaskBuildError, match="layer z: scores must be >= 0"):
        float_keys({"z": torch.tensor([1.0, -2.0])})


def test_top_values_and_concentration_on_known_numbers() -> None:
    # 1000 weights: 10 at 100, 10 at 4, 80 at 2, the rest (900) at 1.
    v = torch.cat([torch.full((10,), 100.0), torch.full((10,), 4.0), torch.full((80,), 2.0), torch.ones(900)])
    sq = {"l1": v[:400].view(20, 20), "l0": v[400:].view(30, 20)}
    assert top_values(sq, 12).tolist() == [100.0] * 10 + [4.0] * 2
    c = concentration(sq, 0.01)  # k = 10: top = 100, next 10 = 4, band (10..100) = (10*4 + 80*2)/90
    assert c["k"] == 10 and c["top_mean_sq"] == 100.0
    assert c["ratio_next_tier"] == pytest.approx(25.0)
    assert c["band_mean_sq"] == pytest.approx(200 / 90)
    assert c["ratio_band"] == pytest.approx(100 / (200 / 90))
    assert c["band"] == [0.01, pytest.approx(0.1)]
    assert c["top_mass_share"] == pytest.approx(1000 / (1000 + 40 + 160 + 900))


def test_concentration_clips_the_band_to_the_model() -> None:
    c = concentration({"l": torch.tensor([[4.0, 1.0]])}, 0.5)  # k = 1, band = the one other weight
    assert c["ratio_next_tier"] == 4.0 and c["ratio_band"] == 4.0
    c = concentration({"l": torch.tensor([[4.0, 1.0]])}, 1.0)
    assert c["ratio_next_tier"] is None and c["ratio_band"] is None


def test_k_for() -> None:
    assert k_for(0.001, 10_000) == 10 and k_for(1e-9, 10) == 1 and k_for(1.0, 7) == 7
    for bad in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(MaskBuildError, match="fraction"):
            k_for(bad, 10)


def test_random_keys_are_seeded_and_uniform() -> None:
    shapes = {"a": (100, 50), "b": (40, 25)}
    k = 600
    m1 = select_top_k(random_keys(shapes, 1), k)
    m1b = select_top_k(random_keys(shapes, 1), k)
    m2 = select_top_k(random_keys(shapes, 2), k)
    assert all(torch.equal(m1[n], m1b[n]) for n in m1)
    assert any(not torch.equal(m1[n], m2[n]) for n in m1)
    # layer a holds 5000 of 6000 weights -> expect 500 of 600 picks (binomial sd ~9)
    assert abs(m1["a"].numel() - 500) < 40


def test_read_calibration_formats(tmp_path: Path) -> None:
    txt = tmp_path / "a.txt"
    txt.write_text("first para\nline two\n\n\nsecond para\n")
    f = read_calibration(txt)
    assert f.documents == ("first para\nline two", "second para") and len(f.sha256) == 64
    jl = tmp_path / "b.jsonl"
    jl.write_text(
        json.dumps({"text": "hello"}) + "\n\n" + json.dumps({"prompt": "Q: ", "completion": "A"}) + "\n"
    )
    assert read_calibration(jl).documents == ("hello", "Q: A")
    bad = tmp_path / "c.jsonl"
    bad.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"label": 1}) + "\n")
    with pytest.raises(MaskBuildError, match=r"c.jsonl:2: needs a string 'text'"):
        read_calibration(bad)
    bad.write_text("{not json\n")
    with pytest.raises(MaskBuildError, match=r"c.jsonl:1: not valid JSON"):
        read_calibration(bad)
    with pytest.raises(MaskBuildError, match="cannot read"):
        read_calibration(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(MaskBuildError, match="contains no text"):
        read_calibration(tmp_path / "empty.txt")


def test_pack_sequences_round_robin_and_counts(tmp_path: Path) -> None:
    a = tmp_path / "a.txt"
    a.write_text("aaaa\n\naaaa\n\naaaa")
    b = tmp_path / "b.txt"
    b.write_text("bb\n\nbb")
    files = [read_calibration(a), read_calibration(b)]
    enc = lambda s: [ord(c) for c in s]  # noqa: E731
    p = pack_sequences(enc, files, n_seqs=3, seq_len=5, eos_id=0)
    a_, b_ = ord("a"), ord("b")
    stream = [a_] * 4 + [0] + [b_] * 2 + [0] + [a_] * 4 + [0] + [b_] * 2 + [0]
    assert p.ids.tolist() == [stream[0:5], stream[5:10], stream[10:15]]
    assert p.tokens_per_file == (10, 5)  # a: 5+5 (the 3rd doc is not reached), b: 3+2 (cut at the budget)
    few = pack_sequences(enc, files, n_seqs=100, seq_len=7, eos_id=None)
    assert few.ids.shape == (2, 7) and sum(few.tokens_per_file) == 14
    with pytest.raises(MaskBuildError, match="fewer than one sequence of 1000"):
        pack_sequences(enc, files, n_seqs=1, seq_len=1000, eos_id=None)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_radix_select_is_the_sorted_kth_largest(dtype: torch.dtype) -> None:
    """_kth_largest_key == the k-th of the sorted concatenation, with ties, tiny and huge values."""
    from coordinator.mask.select import _kth_largest_key
    from shared.prng import raw_u64

    top = 2**31 - 1 if dtype == torch.int32 else 2**63 - 1
    raw = torch.from_numpy((raw_u64(3, 3000) >> 1).astype("int64")) % top
    raw[:200] = 7  # ties
    raw[200:210] = top  # the largest key there is
    raw[210:220] = 0
    keys = {"a": raw[:1000].to(dtype), "b": raw[1000:2999].to(dtype), "c": raw[2999:].to(dtype)}
    ordered = torch.sort(raw, descending=True).values
    for k in (1, 5, 10, 11, 999, 2790, 2800, 2999, 3000):
        assert _kth_largest_key(keys, k) == int(ordered[k - 1]), k
