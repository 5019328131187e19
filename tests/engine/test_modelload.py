"""load_model: families (Llama, Qwen2), tokenizer, fingerprint, clear errors, real Mask objects."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from shared.modelload import load_model, weight_bytes
from shared.sidecar import SideCarError, SideCarLinear, initial_values_from_dir, sidecar_layers

IDS = torch.tensor([[1, 5, 9, 200, 33, 7]])


def test_qwen2_loads_quantized_with_side_car(qwen2_dir: Path) -> None:
    from tests.engine.conftest import prng_mask

    mask = prng_mask(qwen2_dir, 0.02)
    lm = load_model(qwen2_dir, "nf4", "cpu", mask, torch.float32)
    assert lm.sidecar is not None and lm.sidecar.nnz == sum(v.numel() for v in mask.values())
    wrapped = dict(sidecar_layers(lm.model))
    assert set(mask) <= set(wrapped)
    q = wrapped["model.layers.0.self_attn.q_proj"]
    assert q.bias is not None  # Qwen2 attention projections carry a bias
    with torch.no_grad():
        out = lm.model(IDS).logits
    assert out.shape == (1, 6, 384) and torch.isfinite(out).all()
    assert lm.tokenizer is not None and lm.tokenizer("the movie")["input_ids"][0] == 1
    assert len(lm.fingerprint) == 64
    assert torch.equal(lm.sidecar.initial_values(), initial_values_from_dir(qwen2_dir, mask))


def test_every_quantized_layer_is_wrapped_and_lm_head_is_not(llama_dir: Path, llama_mask: dict[str, torch.Tensor]) -> None:
    import bitsandbytes as bnb

    lm = load_model(llama_dir, "nf4", "cpu", llama_mask, torch.float32, fingerprint="0" * 64)
    names = [n for n, _ in sidecar_layers(lm.model)]
    assert len(names) == 14  # 7 Linear per layer x 2 layers
    assert isinstance(lm.model.lm_head, torch.nn.Linear) and not isinstance(lm.model.lm_head, SideCarLinear)
    bare = [n for n, m in lm.model.named_modules() if isinstance(m, bnb.nn.Linear4bit) and not n.endswith("base_layer")]  # type: ignore[attr-defined]
    assert bare == []
    plain = load_model(llama_dir, "nf4", "cpu", None, torch.float32, fingerprint="0" * 64)
    assert plain.sidecar is None and not list(sidecar_layers(plain.model))
    dense = load_model(llama_dir, "none", "cpu", None, torch.float32, fingerprint="0" * 64)
    assert weight_bytes(plain.model) < 0.7 * weight_bytes(dense.model)


def test_mask_object_and_fingerprint_check(llama_dir: Path, llama_mask: dict[str, torch.Tensor]) -> None:
    from shared.fingerprint import fingerprint_model_dir
    from shared.maskfile import FORMAT_VERSION, Mask, MaskMeta

    fp = fingerprint_model_dir(llama_dir)
    lm = load_model(llama_dir, "none", "cpu", None, torch.float32)
    shapes: dict[str, tuple[int, int]] = {}
    for n in llama_mask:
        rows, cols = lm.model.get_parameter(f"{n}.weight").shape
        shapes[n] = (rows, cols)
    meta = MaskMeta(FORMAT_VERSION, "test", 0.01, "prng", fp)
    mask = Mask(dict(llama_mask), shapes, None, meta)
    loaded = load_model(llama_dir, "int8", "cpu", mask, torch.float32)
    assert loaded.fingerprint == fp and loaded.sidecar is not None and loaded.sidecar.nnz == mask.nnz
    other = Mask(dict(llama_mask), shapes, None, MaskMeta(FORMAT_VERSION, "test", 0.01, "prng", "a" * 64))
    with pytest.raises(SideCarError, match="mask was built for model aaaa"):
        load_model(llama_dir, "int8", "cpu", other, torch.float32)


def test_bad_inputs_are_named(tmp_path: Path, llama_dir: Path, llama_mask: dict[str, torch.Tensor]) -> None:
    with pytest.raises(ValueError, match="quant must be one of"):
        load_model(llama_dir, "fp8", "cpu")  # type: ignore[arg-type]
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(tmp_path, "nf4", "cpu")
    with pytest.raises(SideCarError, match="model.layers.0.input_layernorm.*found LlamaRMSNorm"):
        load_model(llama_dir, "nf4", "cpu", {"model.layers.0.input_layernorm": torch.tensor([0])}, fingerprint="0" * 64)
    with pytest.raises(SideCarError, match="nope.*missing"):
        load_model(llama_dir, "nf4", "cpu", {"nope": torch.tensor([0])}, fingerprint="0" * 64)
    name = "model.layers.1.mlp.up_proj"
    with pytest.raises(SideCarError, match=f"{name}.*out of range"):
        load_model(llama_dir, "none", "cpu", {name: torch.tensor([128 * 64])}, fingerprint="0" * 64)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2"])
def test_fused_loss_and_tail_logits_equal_the_models_own_forward(
    family: str, llama_dir: Path, qwen2_dir: Path, gemma2_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """batch_loss's fused head + fp32 log-softmax (target rows only) and tail_logits (decoder + head on
    the kept rows) == cross-entropy / logits from the model's own forward (incl. Gemma-2 soft-capping)."""
    import torch.nn.functional as F

    from shared.dataset import Example
    from shared.loss import collate, fused_parts, tail_logits, target_losses
    from tests.engine.conftest import prng_mask

    model_dir = {"llama": llama_dir, "qwen2": qwen2_dir, "gemma2": gemma2_dir}[family]
    lm = load_model(model_dir, "nf4", "cpu", prng_mask(model_dir), torch.float32, fingerprint="0" * 64)
    assert fused_parts(lm.model) is not None
    if family == "gemma2":
        assert lm.tokenizer is None  # saved without tokenizer files
    examples = [Example((1, 5, 9, 200, 33, 7, 2, 100), 7), Example((1, 80, 17, 250), 1), Example((3, 4, 5), 2)]
    inputs = collate(examples, 0, torch.device("cpu"))
    with torch.no_grad():
        own = lm.model(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
            position_ids=inputs["position_ids"], use_cache=False,
        ).logits  # (B, L, V)
        fused = target_losses(lm.model, examples, 0)
        for keep in (1, 3, own.shape[1]):
            torch.testing.assert_close(tail_logits(lm.model, inputs, keep), own[:, -keep:], rtol=1e-5, atol=1e-5)
    want = torch.stack([
        F.cross_entropy(own[i, -e.n_target - 1 : -1], inputs["input_ids"][i, -e.n_target :])
        for i, e in enumerate(examples)
    ])
    torch.testing.assert_close(fused, want, rtol=1e-5, atol=1e-5)
    # small chunks: head on 5 rows at a time, log-softmax on 2 (rows and slices cross example borders)
    from shared import loss  # the constants live where the code reads them

    monkeypatch.setitem(loss.HEAD_CHUNK_ELEMS, "cpu", 5 * 384)
    monkeypatch.setattr(loss, "LOGSOFTMAX_ROWS_ELEMS", 2 * 384)
    with torch.no_grad():
        torch.testing.assert_close(target_losses(lm.model, examples, 0), want, rtol=1e-5, atol=1e-5)


def test_embeddings_stay_in_the_checkpoint_dtype(tmp_path: Path, llama_dir: Path) -> None:
    """bf16 checkpoint, nf4, fp32 compute: embedding and LM head stay bf16; logits as with widened copies."""
    from transformers import AutoModelForCausalLM

    bf16 = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(str(llama_dir), dtype=torch.bfloat16).save_pretrained(str(bf16))
    lm = load_model(bf16, "nf4", "cpu", None, torch.float32, fingerprint="0" * 64)
    model: Any = lm.model
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert emb.weight.dtype == torch.bfloat16 and head.weight.dtype == torch.bfloat16
    assert model.model.norm.weight.dtype == torch.float32
    ids = torch.tensor([[1, 5, 9, 200, 33, 7, 2, 100]])
    with torch.no_grad():
        got = model(input_ids=ids).logits
        assert got.dtype == torch.float32
        for layer in (emb, head):
            layer.weight.data = layer.weight.data.float()
        del head.forward  # the class's own F.linear over the whole (now fp32) weight
        want = model(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_cpu_head_takes_the_larger_loss_chunk(tmp_path: Path, llama_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On CPU a head larger than the caches streams its weight every chunk (and a bf16 head on an fp32 CPU
    widens it), so the loss hands it CPU_HEAD_ROWS rows at least, within CPU_HEAD_CHUNK_ELEMS; a small
    wide head and CUDA keep HEAD_CHUNK_ELEMS. Same losses, bit for bit, whatever the chunk."""
    from transformers import AutoModelForCausalLM

    from shared import loss
    from shared.dataset import Example
    from shared.loss import head_chunk_rows, target_losses

    head_05b = 151_936 * 896 * 2  # the 0.5B bf16 head: 272 MB
    assert head_chunk_rows("cpu", 151_936, head_05b, False) == 220  # 2^25 // vocab: 5 chunks -> 1 per sequence
    assert head_chunk_rows("cpu", 32_000, 32_000 * 512 * 2, False) == (1 << 22) // 32_000  # stays in the caches
    assert head_chunk_rows("cpu", 32_000, 32_000 * 512 * 2, True) == 256  # narrow: widened once per chunk
    assert head_chunk_rows("cpu", 2_173, 0, True) == (1 << 22) // 2_173
    assert head_chunk_rows("cuda", 151_936, head_05b, True) == (1 << 25) // 151_936
    monkeypatch.setattr(loss, "CPU_BIG_HEAD_BYTES", 0)  # the tiny test heads count as big below
    bf16 = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(str(llama_dir), dtype=torch.bfloat16).save_pretrained(str(bf16))
    examples = [Example(tuple(range(3, 3 + 40)), 39), Example(tuple(range(7, 7 + 40)), 39)]  # 78 target rows
    vocab = 384
    monkeypatch.setitem(loss.HEAD_CHUNK_ELEMS, "cpu", 10 * vocab)  # 10 rows per head call
    for path in (llama_dir, bf16):  # a head in the compute dtype, a narrow one
        model: Any = load_model(path, "nf4", "cpu", None, torch.float32, fingerprint="0" * 64).model
        head: Any = model.get_output_embeddings()
        seen: list[int] = []
        head.register_forward_pre_hook(lambda _m, args, seen=seen: seen.append(int(args[0].shape[0])))
        with torch.no_grad():
            monkeypatch.setattr(loss, "CPU_HEAD_ROWS", 100)  # all 78 rows at once
            got = target_losses(model, examples, 0)
            assert seen == [78]
            monkeypatch.setattr(loss, "CPU_HEAD_ROWS", 10)
            torch.testing.assert_close(target_losses(model, examples, 0), got, rtol=0, atol=0)
            assert seen[1:] == [10] * 7 + [8]


def test_a_narrow_head_widens_into_one_reused_buffer(
    tmp_path: Path, llama_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without autograd the bf16 head widens every chunk into one kept buffer: the same logits, bit for bit,
    as a fresh fp32 copy per chunk; with autograd each chunk keeps its own copy and gradients still flow."""
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from shared import modelload

    bf16 = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(str(llama_dir), dtype=torch.bfloat16).save_pretrained(str(bf16))
    model: Any = load_model(bf16, "nf4", "cpu", None, torch.float32, fingerprint="0" * 64).model
    head: Any = model.get_output_embeddings()
    monkeypatch.setattr(modelload, "HEAD_CHUNK_ROWS", 100)  # vocab 384: chunks of 100, 100, 100, 84 rows
    x = torch.linspace(-2, 2, 3 * 5 * head.weight.shape[1]).reshape(3, 5, -1)
    want = torch.cat([F.linear(x, head.weight[a : a + 100].float()) for a in range(0, 384, 100)], dim=-1)
    with torch.no_grad():
        got = head(x)
        kept = head._meerkat_widen
        again = head(x)
    assert torch.equal(got, want) and torch.equal(again, want)
    assert head._meerkat_widen is kept and tuple(kept.shape) == (100, head.weight.shape[1])
    with torch.inference_mode():  # an inference tensor cannot be written outside inference mode: a new one
        assert torch.equal(head(x), want) and head._meerkat_widen.is_inference()
    with torch.no_grad():
        assert torch.equal(head(x), want) and not head._meerkat_widen.is_inference()
    xg = x.clone().requires_grad_(True)
    out = head(xg)
    assert torch.equal(out.detach(), want)
    out.sum().backward()
    assert xg.grad is not None
    torch.testing.assert_close(xg.grad, head.weight.float().sum(0).expand_as(x), rtol=1e-5, atol=1e-5)
