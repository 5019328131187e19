"""Side-car exactness: flat order, live views, wrapped forward == dense merged forward (nf4, int8, none)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from shared.modelload import Quant, load_model
from shared.sidecar import (
    SideCar,
    SideCarError,
    SideCarLinear,
    default_sidecar_mode,
    dequantize_weight,
    initial_values_from_dir,
    merged_dense_state,
    sidecar_layers,
    unwrap_dense,
)

FP = "0" * 64
IDS = torch.tensor([[1, 5, 9, 200, 33, 7, 2, 100], [3, 3, 80, 17, 250, 4, 61, 9]])


def test_flat_order_and_views_share_storage(llama_dir: Path, llama_mask: dict[str, torch.Tensor]) -> None:
    init = initial_values_from_dir(llama_dir, llama_mask)
    sc = SideCar(llama_mask, init)
    assert sc.layer_names == sorted(llama_mask)
    start = 0
    for name in sc.layer_names:
        a, b = sc.offsets[name]
        assert a == start and b - a == llama_mask[name].numel()
        start = b
    assert sc.nnz == start == init.numel()
    name = sc.layer_names[3]
    sc.values[sc.offsets[name][0]] = 123.0
    assert sc.view(name)[0].item() == 123.0  # a view, not a copy
    assert torch.equal(sc.initial_values(), init)


def test_initial_values_are_the_checkpoint_weights(llama_dir: Path, llama_mask: dict[str, torch.Tensor]) -> None:
    state = load_file(str(llama_dir / "model.safetensors"))
    init = initial_values_from_dir(llama_dir, llama_mask)
    expect = torch.cat([state[f"{n}.weight"].reshape(-1)[llama_mask[n]].float() for n in sorted(llama_mask)])
    assert torch.equal(init, expect)


def test_initial_values_missing_layer_is_named(llama_dir: Path) -> None:
    with pytest.raises(SideCarError, match="model.layers.9.mlp.up_proj"):
        initial_values_from_dir(llama_dir, {"model.layers.9.mlp.up_proj": torch.tensor([0])})


def test_set_values_validates(llama_dir: Path, llama_mask: dict[str, torch.Tensor]) -> None:
    sc = SideCar(llama_mask, initial_values_from_dir(llama_dir, llama_mask))
    storage = sc.values.data_ptr()
    with pytest.raises(SideCarError, match="float32"):
        sc.set_values(torch.zeros(sc.nnz, dtype=torch.float64))
    with pytest.raises(SideCarError, match=f"\\({sc.nnz},\\)"):
        sc.set_values(torch.zeros(sc.nnz + 1))
    bad = torch.zeros(sc.nnz)
    bad[5] = float("nan")
    with pytest.raises(SideCarError, match="NaN"):
        sc.set_values(bad)
    new = torch.arange(sc.nnz, dtype=torch.float32)
    sc.set_values(new)
    assert torch.equal(sc.get_values(), new) and sc.values.data_ptr() == storage


@pytest.mark.parametrize("quant", ["nf4", "int8", "none"])
def test_wrapped_forward_equals_dense_merged(
    quant: Quant, llama_dir: Path, llama_mask: dict[str, torch.Tensor]
) -> None:
    """(b) every wrapped layer: forward == F.linear with the merged dense weight; masked entries exact."""
    lm = load_model(llama_dir, quant, "cpu", llama_mask, torch.float32, fingerprint=FP)
    assert lm.sidecar is not None
    lm.sidecar.values.add_(0.05)  # move away from v_0 so the side-car visibly matters
    merged = merged_dense_state(lm.model)
    x = torch.linspace(-1, 1, 3 * 64).view(3, 64)
    seen = 0
    for name, layer in sidecar_layers(lm.model):
        w = merged[f"{name}.weight"]
        if layer.in_features != 64:
            continue
        torch.testing.assert_close(layer(x), F.linear(x, w, layer.bias), rtol=1e-5, atol=1e-6)
        if name in llama_mask:
            assert torch.equal(w.view(-1)[llama_mask[name]], lm.sidecar.view(name))
            seen += 1
    assert seen >= 4


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_masked_positions_removed_from_quantized_base(
    quant: Quant, llama_dir: Path, llama_mask: dict[str, torch.Tensor]
) -> None:
    lm = load_model(llama_dir, quant, "cpu", llama_mask, torch.float32, fingerprint=FP)
    for name, layer in sidecar_layers(lm.model):
        base = dequantize_weight(layer.base_layer, torch.float32)
        if name in llama_mask:
            assert torch.count_nonzero(base.view(-1)[llama_mask[name]]) == 0, name
        assert base.abs().max() > 0


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_export_gives_the_side_car_logits(quant: Quant, llama_dir: Path, llama_mask: dict[str, torch.Tensor]) -> None:
    """merged_dense_state in a plain fp32 model == the side-car model's logits (what export relies on)."""
    lm = load_model(llama_dir, quant, "cpu", llama_mask, torch.float32, fingerprint=FP)
    assert lm.sidecar is not None
    lm.sidecar.set_values(lm.sidecar.initial_values() * 1.5)
    dense = AutoModelForCausalLM.from_pretrained(str(llama_dir), dtype=torch.float32)
    state = dense.state_dict()
    state.update(merged_dense_state(lm.model))
    dense.load_state_dict(state)
    with torch.no_grad():
        want = lm.model(IDS).logits
        got = dense(IDS).logits
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        unwrap_dense(lm.model)
        assert not any(isinstance(m, SideCarLinear) for m in lm.model.modules())
        torch.testing.assert_close(lm.model(IDS).logits, want, rtol=1e-5, atol=1e-5)


def test_v0_side_car_with_none_reproduces_the_checkpoint(llama_dir: Path, llama_mask: dict[str, torch.Tensor]) -> None:
    lm = load_model(llama_dir, "none", "cpu", llama_mask, torch.float32, fingerprint=FP)
    ref = AutoModelForCausalLM.from_pretrained(str(llama_dir), dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(lm.model(IDS).logits, ref(IDS).logits)


def test_set_values_changes_the_forward(llama_dir: Path, llama_mask: dict[str, torch.Tensor]) -> None:
    lm = load_model(llama_dir, "nf4", "cpu", llama_mask, torch.float32, fingerprint=FP)
    assert lm.sidecar is not None
    with torch.no_grad():
        before = lm.model(IDS).logits
        lm.sidecar.set_values(torch.zeros(lm.sidecar.nnz))
        after = lm.model(IDS).logits
        lm.sidecar.set_values(lm.sidecar.initial_values())
        again = lm.model(IDS).logits
    assert not torch.allclose(before, after)
    assert torch.equal(before, again)


def test_bf16_compute_is_close_to_fp32(llama_dir: Path, llama_mask: dict[str, torch.Tensor]) -> None:
    lo = load_model(llama_dir, "nf4", "cpu", llama_mask, torch.bfloat16, fingerprint=FP)
    hi = load_model(llama_dir, "nf4", "cpu", llama_mask, torch.float32, fingerprint=FP)
    with torch.no_grad():
        a, b = lo.model(IDS).logits.float(), hi.model(IDS).logits
    assert (a - b).norm() < 0.05 * b.norm()  # bf16 runs the whole model in bf16: ~1e-2 relative


def test_int8_forward_does_not_warn(llama_dir: Path, llama_mask: dict[str, torch.Tensor]) -> None:
    lm = load_model(llama_dir, "int8", "cpu", llama_mask, torch.float32, fingerprint=FP)
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        lm.model(IDS)
    assert [str(w.message) for w in caught] == []


def _tile_forward(self: SideCarLinear, x: torch.Tensor) -> torch.Tensor:
    """The previous design, kept as the reference: dequantise the tile, overwrite the masked entries, F.linear."""
    w = dequantize_weight(self.base_layer, self.compute_dtype)
    w.view(-1).index_copy_(0, self.sidecar_indices, self.sidecar_view.to(w.dtype))
    bias = None if self.bias is None else self.bias.to(w.dtype)
    return F.linear(x.to(w.dtype), w, bias).to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_correction_matches_the_dequantised_tile_path(
    quant: str, dtype: torch.dtype, llama_dir: Path, llama_mask: dict[str, torch.Tensor]
) -> None:
    """base kernel + sparse correction == dequantise-and-overwrite, to forward rounding; repeatable bits."""
    assert default_sidecar_mode(torch.device("cpu"), torch.float32) == "auto"
    assert default_sidecar_mode(torch.device("cpu"), torch.bfloat16) == "tile"
    from unittest import mock

    from shared.dataset import Batch, Dataset, Example
    from shared.loss import batch_loss

    lm = load_model(llama_dir, quant, "cpu", llama_mask, dtype, fingerprint=FP)
    assert lm.sidecar is not None
    lm.sidecar.set_values(lm.sidecar.initial_values() * 8.0 + 0.1)  # the side-car visibly matters
    examples = [Example(tuple(int(t) for t in row), 7) for row in IDS.tolist()]
    batch = Batch(examples, Dataset(examples, pad_id=0))
    for _, layer in sidecar_layers(lm.model):
        layer.mode = "correct"
    new = batch_loss(lm.model, batch)
    assert batch_loss(lm.model, batch) == new  # same device, same bits
    for _, layer in sidecar_layers(lm.model):
        layer.mode = "tile"
    assert batch_loss(lm.model, batch) == batch_loss(lm.model, batch)
    tile_mode = batch_loss(lm.model, batch)
    with mock.patch.object(SideCarLinear, "forward", _tile_forward):
        old = batch_loss(lm.model, batch)
    lm.sidecar.set_values(lm.sidecar.initial_values())
    moved = batch_loss(lm.model, batch)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert abs(new - old) <= tol * abs(old), (new, old)
    assert tile_mode == old  # "tile" mode is the previous design
    assert abs(moved - new) > 10 * abs(new - old)  # the comparison can tell the side-car apart


def test_auto_mode_picks_by_token_count(llama_dir: Path, llama_mask: dict[str, torch.Tensor]) -> None:
    """"auto": the correction for few tokens, the tile for many; each call equals the forced mode."""
    from shared.sidecar import GATHER_COST

    lm = load_model(llama_dir, "nf4", "cpu", llama_mask, torch.float32, fingerprint=FP)
    name, layer = next((n, m) for n, m in sidecar_layers(lm.model) if n in llama_mask)
    assert layer.mode == "auto"
    limit = layer.in_features * layer.out_features // (layer.sidecar_indices.numel() * GATHER_COST)
    for tokens, expect in ((1, "correct"), (limit + 1, "tile")):
        x = torch.linspace(-1, 1, tokens * layer.in_features).view(tokens, layer.in_features)
        got = layer(x)
        layer.mode = expect
        assert torch.equal(got, layer(x)), (tokens, expect)
        layer.mode = "auto"
