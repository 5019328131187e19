"""The builder on real (tiny) models: planted gradients, determinism, every method's file, fingerprints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from masktoy import PlantedLM, char_encode, fill_from_prng, save_tiny_llama, write_corpus
from torch import nn

from coordinator.mask.builder import (
    MaskBuildError,
    build_mask,
    eligible_weights,
    load_for_mask,
    pack_sequences,
    parse_description,
    read_calibration,
    tokenizer_encoder,
)
from shared.cli import main
from shared.fingerprint import fingerprint_model_dir
from shared.maskfile import MaskError, load_mask

PLANTED = {"fc1": [3, 77, 200], "fc2": [0, 255]}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("corpus")
    return write_corpus(d / "a.txt", 30, 0), write_corpus(d / "b.txt", 30, 1)


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("llama")
    save_tiny_llama(d, seed=7)
    return d


def _planted_model() -> PlantedLM:
    model = PlantedLM(vocab=32, d=16, h=16, planted=PLANTED, scale=300.0)
    fill_from_prng(model, 5, std=0.3)
    model.reparameterise()
    return model


def test_builder_selects_exactly_the_planted_weights(corpus: tuple[Path, Path]) -> None:
    model = _planted_model()
    calib = [read_calibration(p) for p in corpus]
    n_planted = sum(len(v) for v in PLANTED.values())
    res = build_mask(
        model, char_encode, None, calib, fraction=n_planted / 512, seqs=6, seq_len=32, progress=False
    )
    assert {n: t.tolist() for n, t in res.indices.items()} == PLANTED
    assert res.shapes == {"fc1": (16, 16), "fc2": (16, 16)}  # emb and head are not eligible by default
    # the stored mean gradient equals the gradient of the mean loss over the same sequences
    ids = pack_sequences(char_encode, calib, 6, 32, None).ids
    model.zero_grad()
    for p in model.parameters():
        p.requires_grad_(True)
    torch.stack([model(input_ids=r[None], labels=r[None]).loss for r in ids]).mean().backward()
    assert res.grad is not None
    for name, idx in res.indices.items():
        want = getattr(model, name).weight.grad.flatten()[idx]
        torch.testing.assert_close(res.grad[name], want, rtol=1e-4, atol=1e-7)
    conc = res.stats["concentration"]
    assert conc["k"] == n_planted and conc["ratio_next_tier"] > 100  # planted x300 -> g^2 x 9e4
    assert res.calibration["seqs"] == 6 and res.calibration["tokens"] == 6 * 32
    assert [f["name"] for f in res.calibration["files"]] == ["a.txt", "b.txt"]


def test_embeddings_only_behind_the_switch_and_tied_weights_once() -> None:
    model = _planted_model()
    assert sorted(eligible_weights(model, include_embeddings=True)) == ["emb", "fc1", "fc2", "head"]
    model.head.weight = model.emb.weight  # tie: the shared weight is listed once, as the Linear
    assert sorted(eligible_weights(model, include_embeddings=True)) == ["fc1", "fc2", "head"]
    with pytest.raises(MaskBuildError, match="no eligible nn.Linear"):
        eligible_weights(nn.Sequential(nn.Embedding(4, 4)))


def test_method_and_input_errors(corpus: tuple[Path, Path]) -> None:
    model = _planted_model()
    with pytest.raises(MaskBuildError, match="pretrain-grad needs calibration text"):
        build_mask(model, char_encode, None, [], method="pretrain-grad", progress=False)
    with pytest.raises(MaskBuildError, match="method must be one of"):
        build_mask(model, char_encode, None, [], method="magic", progress=False)
    with pytest.raises(MaskBuildError, match="seed must be in"):
        build_mask(model, None, None, [], method="random", seed=-1, progress=False)


def _build(llama: Path, out: Path, *extra: str) -> int:
    return main(
        ["mask", "build", "--model", str(llama), "--out", str(out), "--seqs", "3", "--seq-len", "48", *extra]
    )


def test_cli_build_is_deterministic(llama: Path, corpus: tuple[Path, Path], tmp_path: Path) -> None:
    calib = ["--calib", str(corpus[0]), str(corpus[1]), "--fraction", "0.01"]
    assert _build(llama, tmp_path / "1.safetensors", *calib) == 0
    assert _build(llama, tmp_path / "2.safetensors", *calib) == 0
    m1, m2 = load_mask(tmp_path / "1.safetensors"), load_mask(tmp_path / "2.safetensors")
    assert m1.mask_id == m2.mask_id and m1.layers.keys() == m2.layers.keys()
    assert m1.grad is not None and m2.grad is not None
    for name in m1.layers:
        assert torch.equal(m1.layers[name], m2.layers[name])
        assert torch.equal(m1.grad[name], m2.grad[name])
    assert m1.meta.calibration == m2.meta.calibration
    body = parse_description(m1.meta.calibration)
    assert body is not None and body["files"][0]["sha256"] == read_calibration(corpus[0]).sha256
    assert body["tokens"] == 3 * 48 and body["stats"]["concentration"]["ratio_next_tier"] > 1


@pytest.mark.parametrize(
    ("method", "with_calib"),
    [("pretrain-grad", True), ("weight-magnitude", True), ("weight-magnitude", False), ("random", False)],
)
def test_each_method_writes_a_valid_file(
    llama: Path, corpus: tuple[Path, Path], tmp_path: Path, method: str, with_calib: bool
) -> None:
    out = tmp_path / "m.safetensors"
    calib = ["--calib", str(corpus[0])] if with_calib else []
    assert _build(llama, out, "--method", method, "--fraction", "0.005", *calib) == 0
    mask = load_mask(out, expected_fingerprint=fingerprint_model_dir(llama))
    n_weights = 2 * (2 * 32 * 32 + 2 * 16 * 32 + 3 * 64 * 32)  # per block q,o 32x32; k,v 16x32; MLP 3 x 64x32
    assert mask.meta.method == method and mask.nnz == round(0.005 * n_weights)
    assert (mask.grad is not None) == with_calib
    assert all(n.startswith("model.layers.") for n in mask.layers)
    if method == "weight-magnitude":
        from safetensors.torch import load_file

        state = load_file(str(llama / "model.safetensors"))
        names = sorted(mask.shapes)
        allw = {n: state[n + ".weight"].abs().flatten() for n in eligible_names(state)}
        flat = torch.cat([allw[n] for n in sorted(allw)])
        kth = torch.topk(flat, mask.nnz).values[-1]
        picked = torch.cat([allw[n][mask.layers[n]] for n in names])
        assert bool((picked >= kth).all())


def eligible_names(state: dict[str, torch.Tensor]) -> list[str]:
    return [
        k[: -len(".weight")] for k in state if k.startswith("model.layers.") and k.endswith("proj.weight")
    ]


def test_random_method_depends_on_the_seed(llama: Path, tmp_path: Path) -> None:
    ids = []
    for i, seed in enumerate(("1", "1", "2")):
        out = tmp_path / f"r{i}.safetensors"
        assert _build(llama, out, "--method", "random", "--seed", seed) == 0
        ids.append(load_mask(out).mask_id)
    assert ids[0] == ids[1] != ids[2]


def test_mask_for_another_model_is_refused(
    llama: Path, corpus: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = tmp_path / "other"
    save_tiny_llama(other, seed=8)
    out = tmp_path / "m.safetensors"
    assert _build(llama, out, "--method", "weight-magnitude") == 0
    with pytest.raises(MaskError, match="does not match"):
        load_mask(out, expected_fingerprint=fingerprint_model_dir(other))
    capsys.readouterr()
    assert main(["mask", "report", str(out), "--model", str(other)]) == 2
    err = capsys.readouterr().err
    assert "does not match" in err and "refusing" in err and str(other) in err
    assert main(["mask", "report", str(out), "--model", str(llama)]) == 0


def test_cli_reports_bad_input_clearly(
    llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _build(llama, tmp_path / "m.safetensors") == 2
    assert "pretrain-grad needs calibration text" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"label": 3}) + "\n")
    assert _build(llama, tmp_path / "m.safetensors", "--calib", str(bad)) == 2
    assert "bad.jsonl:1: needs a string 'text'" in capsys.readouterr().err
    assert _build(llama, tmp_path / "nodir" / "m.safetensors", "--method", "random") == 2
    assert "does not exist" in capsys.readouterr().err
    assert (
        main(["mask", "build", "--model", str(tmp_path), "--out", str(tmp_path / "x"), "--method", "random"])
        == 2
    )
    assert "config.json" in capsys.readouterr().err


def test_build_refuses_to_overwrite_without_the_flag(
    llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "m.safetensors"
    assert _build(llama, out, "--method", "random", "--seed", "1") == 0
    first = out.read_bytes()
    capsys.readouterr()
    assert _build(llama, out, "--method", "random", "--seed", "2") == 2
    err = capsys.readouterr().err
    assert str(out) in err and "already exists" in err and "--overwrite" in err
    assert out.read_bytes() == first  # untouched
    assert _build(llama, out, "--method", "random", "--seed", "2", "--overwrite") == 0
    assert out.read_bytes() != first and load_mask(out).meta.method == "random"


@pytest.mark.parametrize(
    ("command", "shown"),
    [
        (["mask", "build"], ["(default: 0.001)", "(default: pretrain-grad)", "(default: 128)", "(default: 512)"]),
        (["mask", "report"], ["(default: 128)", "(default: auto)", "(default: auto = the checkpoint's"]),
    ],
)
def test_help_shows_the_defaults(command: list[str], shown: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([*command, "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for default in shown:
        assert default in text


def test_report_recomputes_what_the_build_stored(
    llama: Path, corpus: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "m.safetensors"
    calib = ["--calib", str(corpus[1]), "--seqs", "3", "--seq-len", "48"]
    assert _build(llama, out, "--fraction", "0.01", *calib) == 0
    capsys.readouterr()
    assert main(["mask", "report", str(out), "--model", str(llama), *calib, "--json"]) == 0
    rep = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    stored = rep["masks"][0]["stored_stats"]
    again = rep["recomputed"]
    assert again["per_mask"][0]["mask_mean_sq"] == pytest.approx(stored["mask_mean_sq"], rel=1e-6)
    for key in ("top_mean_sq", "ratio_next_tier", "ratio_band", "top_mass_share"):
        assert again["concentration"]["0.01"][key] == pytest.approx(stored["concentration"][key], rel=1e-6)
    assert again["calibration"]["files"][0]["name"] == "b.txt"


def test_gradient_checkpointing_recomputes_and_gives_the_same_mask(
    llama: Path, corpus: tuple[Path, Path]
) -> None:
    calib = [read_calibration(corpus[0])]
    results, calls = [], []
    for ckpt in (False, True):
        model, tok = load_for_mask(llama, device="cpu", checkpointing=ckpt)
        encode, eos = tokenizer_encoder(tok)
        seen: list[int] = []
        model.get_submodule("model.layers.0.self_attn").register_forward_hook(lambda *_, seen=seen: seen.append(1))
        results.append(
            build_mask(model, encode, eos, calib, fraction=0.01, seqs=2, seq_len=48, progress=False)
        )
        calls.append(len(seen))
    assert calls == [2, 4]  # one forward per sequence; twice with the recompute in backward
    plain, ckpt_res = results
    assert {n: t.tolist() for n, t in plain.indices.items()} == {
        n: t.tolist() for n, t in ckpt_res.indices.items()
    }
    assert plain.grad is not None and ckpt_res.grad is not None
    for name in plain.indices:
        torch.testing.assert_close(plain.grad[name], ckpt_res.grad[name], rtol=1e-4, atol=1e-8)


def test_per_tensor_hooks_give_the_same_bits_as_summing_after_backward(llama: Path) -> None:
    """The hook path (each gradient counted and freed as it arrives) == the old all-grads-then-sum path."""
    from coordinator.mask.builder import accumulate_gradients, float_keys, select_top_k

    model, _ = load_for_mask(llama, device="cpu")
    weights = eligible_weights(model)
    ids = (torch.arange(4 * 24).view(4, 24) * 7919) % 200 + 3
    got = accumulate_gradients(model, weights, ids, progress=False)
    for w in weights.values():
        w.requires_grad_(True)
    mean = {n: torch.zeros_like(w, dtype=torch.float32) for n, w in weights.items()}
    sq = {n: torch.zeros_like(w, dtype=torch.float32) for n, w in weights.items()}
    for row in ids:  # the previous implementation, step for step
        model(input_ids=row[None], labels=row[None]).loss.backward()
        for n, w in weights.items():
            assert w.grad is not None
            g32 = w.grad.float()
            mean[n].add_(g32)
            sq[n].addcmul_(g32, g32)
            w.grad = None
    for n in weights:
        assert torch.equal(got.mean[n], mean[n].div_(4)) and torch.equal(got.sq[n], sq[n].div_(4)), n
        assert got.mean[n].dtype == torch.float32  # an fp32 checkpoint keeps fp32 buffers
    k = 50
    new, old = select_top_k(float_keys(got.sq), k), select_top_k(float_keys(sq), k)
    assert new.keys() == old.keys() and all(torch.equal(new[n], old[n]) for n in new)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_two_passes_give_the_same_mask_and_gradient(llama: Path, corpus: tuple[Path, Path], dtype: str) -> None:
    """`passes=2` (g^2, then g at the mask only): the same mask bits; for an fp32 model the same
    gradient bit for bit, for a bf16 one the fp32 sum of the same gradients (closer than the bf16 sum)."""
    calib = [read_calibration(corpus[0])]
    model, tok = load_for_mask(llama, device="cpu", dtype=dtype)
    encode, eos = tokenizer_encoder(tok)
    one, two = (
        build_mask(model, encode, eos, calib, fraction=0.01, seqs=3, seq_len=48, progress=False, passes=p)
        for p in (1, 2)
    )
    assert one.indices.keys() == two.indices.keys()
    assert all(torch.equal(one.indices[n], two.indices[n]) for n in one.indices)
    assert one.stats == two.stats and one.calibration == two.calibration
    assert one.grad is not None and two.grad is not None and one.grad.keys() == two.grad.keys()
    for n in one.grad:
        assert two.grad[n].dtype == torch.float32
        if dtype == "float32":
            assert torch.equal(one.grad[n], two.grad[n]), n
        else:  # one pass summed in bf16: within bf16 rounding of the fp32 sum
            torch.testing.assert_close(one.grad[n], two.grad[n], rtol=2**-6, atol=1e-6)
    with pytest.raises(MaskBuildError, match="passes must be 1 or 2, got 3"):
        build_mask(model, encode, eos, calib, fraction=0.01, seqs=1, seq_len=48, progress=False, passes=3)


def test_passes_auto_picks_two_when_one_pass_would_not_fit() -> None:
    from coordinator.mask.builder import passes_for

    weights = {"a": torch.zeros(1000, 1000, dtype=torch.bfloat16)}  # one pass: 6 MB of buffers
    assert passes_for(weights, available_bytes=8_000_000) == 1
    assert passes_for(weights, available_bytes=7_000_000) == 2


def test_cli_two_passes_write_the_same_mask_bits(llama: Path, corpus: tuple[Path, Path], tmp_path: Path) -> None:
    calib = ["--calib", str(corpus[0]), "--fraction", "0.01", "--seqs", "2"]
    assert _build(llama, tmp_path / "1.safetensors", *calib, "--passes", "1") == 0
    assert _build(llama, tmp_path / "2.safetensors", *calib, "--passes", "2") == 0
    m1, m2 = load_mask(tmp_path / "1.safetensors"), load_mask(tmp_path / "2.safetensors")
    assert m1.mask_id == m2.mask_id and m1.grad is not None and m2.grad is not None
    assert all(torch.equal(m1.grad[n], m2.grad[n]) for n in m1.layers)  # an fp32 checkpoint


def test_widened_linears_keep_bf16_weights_and_match_the_bf16_gradients(
    llama: Path, corpus: tuple[Path, Path]
) -> None:
    """A bf16 model on a CPU without native bf16: the Linear products run in fp32 (weights, their
    gradients and the activations between layers stay bf16). The loss and the mean gradient at the
    mask agree with a plain bf16 backprop to bf16 rounding, and the mask is nearly the same."""
    from coordinator.mask.widelinear import widen_linears

    calib = [read_calibration(corpus[0])]
    results = []
    for widen in (False, True):
        model, tok = load_for_mask(llama, device="cpu", dtype="bfloat16", widen=widen)
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        assert all(m.weight.dtype == torch.bfloat16 for m in linears)
        assert widen == all("forward" in vars(m) for m in linears)  # the instance's own forward
        encode, eos = tokenizer_encoder(tok)
        results.append(build_mask(model, encode, eos, calib, fraction=0.01, seqs=2, seq_len=48, progress=False))
        assert all(p.grad is None for p in model.parameters())
    plain, wide = results
    assert abs(plain.calibration["mean_loss"] - wide.calibration["mean_loss"]) < 0.02 * plain.calibration["mean_loss"]
    same = sum(len(set(plain.indices[n].tolist()) & set(wide.indices.get(n, torch.empty(0)).tolist())) for n in plain.indices)
    assert same >= 0.8 * plain.nnz  # ties and near-ties at the threshold may go either way
    model, _ = load_for_mask(llama, device="cpu", dtype="float32", widen=False)
    assert widen_linears(model) == 0  # fp32 layers are left alone


@pytest.mark.parametrize("native", [False, True])
def test_widening_is_automatic_only_for_bf16_on_a_cpu_without_native_bf16(
    llama: Path, native: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shared.modelload

    monkeypatch.setattr(shared.modelload, "cpu_has_bf16", lambda: native)
    model, _ = load_for_mask(llama, device="cpu", dtype="bfloat16")
    widened = ["forward" in vars(m) for m in model.modules() if isinstance(m, nn.Linear)]
    assert widened and all(w != native for w in widened)
    model, _ = load_for_mask(llama, device="cpu", dtype="float32")
    assert not any("forward" in vars(m) for m in model.modules() if isinstance(m, nn.Linear))
