"""Mask file: safetensors round trip, flat layout, stable id, every loader check names the layer/key."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from shared.maskfile import FORMAT_VERSION, Mask, MaskError, MaskMeta, load_mask, save_mask
from shared.prng import directions

FP = "ab" * 32


def _mask(grad: bool = True) -> Mask:
    layers = {
        "model.layers.1.mlp.down_proj.weight": torch.tensor([0, 5, 17, 127], dtype=torch.int64),
        "model.layers.0.self_attn.q_proj.weight": torch.tensor([3, 4, 63], dtype=torch.int64),
        "lm_head.weight": torch.tensor([], dtype=torch.int64),
    }
    shapes = {
        "model.layers.1.mlp.down_proj.weight": (8, 16),
        "model.layers.0.self_attn.q_proj.weight": (8, 8),
        "lm_head.weight": (4, 8),
    }
    grads = (
        {k: directions(i, len(v), "gaussian") for i, (k, v) in enumerate(layers.items())} if grad else None
    )
    meta = MaskMeta(
        FORMAT_VERSION, "gradsq-topk", 7 / 224, "synthetic: 4 x 32 tokens", FP, "2025-01-01T00:00:00Z"
    )
    return Mask(layers=layers, shapes=shapes, grad=grads, meta=meta)


def test_round_trip_offsets_and_flat_grad(tmp_path: Path) -> None:
    m = _mask()
    save_mask(m, tmp_path / "m.safetensors")
    got = load_mask(tmp_path / "m.safetensors", expected_fingerprint=FP)
    assert got.meta == m.meta and got.shapes == m.shapes
    assert got.layer_names == sorted(m.layers)
    for k in m.layers:
        assert torch.equal(got.layers[k], m.layers[k])
        assert got.grad is not None and m.grad is not None and torch.equal(got.grad[k], m.grad[k])
    assert got.nnz == 7
    assert got.offsets() == {
        "lm_head.weight": (0, 0),
        "model.layers.0.self_attn.q_proj.weight": (0, 3),
        "model.layers.1.mlp.down_proj.weight": (3, 7),
    }
    flat = got.flat_grad()
    assert flat is not None and flat.shape == (7,)
    assert torch.equal(flat[3:7], m.grad["model.layers.1.mlp.down_proj.weight"])  # type: ignore[index]
    assert got.mask_id == m.mask_id


def test_without_grad(tmp_path: Path) -> None:
    save_mask(_mask(grad=False), tmp_path / "m.safetensors")
    got = load_mask(tmp_path / "m.safetensors")
    assert got.grad is None and got.flat_grad() is None


def test_mask_id_definition_and_stability() -> None:
    m = _mask()
    h = hashlib.sha256()
    for name in sorted(m.layers):
        idx = m.layers[name].numpy()
        h.update(name.encode() + b"\0" + len(idx).to_bytes(8, "little") + idx.astype("<i8").tobytes())
    assert m.mask_id == h.hexdigest()[:16]
    assert _mask(grad=False).mask_id == m.mask_id  # gradient is not part of the identity
    layers = dict(m.layers)
    layers["lm_head.weight"] = torch.tensor([1], dtype=torch.int64)
    assert Mask(layers, m.shapes, None, m.meta).mask_id != m.mask_id


def _write_raw(path: Path, tensors: dict[str, torch.Tensor], **meta_over: str) -> Path:
    meta = {
        "meerkat.format_version": "1", "meerkat.method": "m", "meerkat.fraction": "0.5", "meerkat.calibration": "c",
        "meerkat.fingerprint": FP, "meerkat.created": "", "meerkat.shapes": json.dumps({"w": [4, 4]}),
    }  # fmt: skip
    meta.update(meta_over)
    meta = {k: v for k, v in meta.items() if v != "<drop>"}
    save_file(tensors, str(path), metadata=meta)
    return path


@pytest.mark.parametrize(
    "tensors,meta,msg",
    [
        ({"idx.w": torch.tensor([3, 1])}, {}, "layer 'w': indices not sorted at position 1"),
        ({"idx.w": torch.tensor([1, 1, 2])}, {}, "layer 'w': duplicate index 1 at position 1"),
        ({"idx.w": torch.tensor([0, 16])}, {}, "layer 'w': index out of range \\[0, 16\\)"),
        ({"idx.w": torch.tensor([-1, 2])}, {}, "layer 'w': index out of range"),
        ({"idx.w": torch.tensor([1, 2], dtype=torch.int32)}, {}, "layer 'w': indices must be a 1-D int64"),
        ({"idx.w": torch.tensor([[1, 2]])}, {}, "layer 'w': indices must be a 1-D int64"),
        (
            {"idx.w": torch.tensor([1]), "grad.w": torch.tensor([1.0, 2.0])},
            {},
            "layer 'w': grad must be float32",
        ),
        ({"idx.w": torch.tensor([1]), "grad.w": torch.tensor([float("nan")])}, {}, "layer 'w': grad has NaN"),
        ({"idx.w": torch.tensor([1]), "bias.w": torch.tensor([1])}, {}, "unexpected tensor key 'bias.w'"),
        ({"idx.w": torch.tensor([1]), "idx.v": torch.tensor([1])}, {}, "disagree on layer names: \\['v'\\]"),
        ({"idx.w": torch.tensor([1])}, {"meerkat.fingerprint": "<drop>"}, "'meerkat.fingerprint' missing"),
        ({"idx.w": torch.tensor([1])}, {"meerkat.format_version": "2"}, "format_version: expected 1"),
        ({"idx.w": torch.tensor([1])}, {"meerkat.fraction": "1.5"}, "fraction"),
        ({"idx.w": torch.tensor([1])}, {"meerkat.fingerprint": "xyz"}, "fingerprint: expected 64"),
        ({"idx.w": torch.tensor([1])}, {"meerkat.shapes": "{"}, "meerkat.shapes' is not valid JSON"),
        ({"idx.w": torch.tensor([1])}, {"meerkat.shapes": '{"w": [4]}'}, "layer 'w': shape in metadata"),
    ],
)
def test_loader_checks_name_the_problem(
    tmp_path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str], msg: str
) -> None:
    path = _write_raw(tmp_path / "bad.safetensors", tensors, **meta)
    with pytest.raises(MaskError, match=msg):
        load_mask(path)


def test_fingerprint_mismatch_and_unreadable_files(tmp_path: Path) -> None:
    save_mask(_mask(), tmp_path / "m.safetensors")
    with pytest.raises(MaskError, match="built for another model"):
        load_mask(tmp_path / "m.safetensors", expected_fingerprint="cd" * 32)
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(MaskError, match="not a readable safetensors"):
        load_mask(tmp_path / "junk.safetensors")
    with pytest.raises(MaskError, match="not found"):
        load_mask(tmp_path / "nope.safetensors")


def test_construction_validates_too() -> None:
    m = _mask()
    with pytest.raises(MaskError, match="shape must be"):
        Mask({"w": torch.tensor([1])}, {"w": (4, 0)}, None, m.meta)
    with pytest.raises(MaskError, match="grad must cover"):
        Mask({"w": torch.tensor([1])}, {"w": (4, 4)}, {}, m.meta)
    with pytest.raises(MaskError, match="fraction"):
        MaskMeta(1, "m", 0.0, "c", FP)


def test_large_mask_round_trip_is_fast(tmp_path: Path) -> None:
    rng_idx = np.unique(
        np.frombuffer(directions(1, 400_000, "gaussian").numpy().tobytes(), dtype=np.uint32) % 10**7
    )
    layers = {"big": torch.from_numpy(rng_idx.astype(np.int64))}
    m = Mask(layers, {"big": (1000, 10_000)}, None, MaskMeta(1, "m", len(rng_idx) / 1e7, "c", FP))
    save_mask(m, tmp_path / "big.safetensors")
    got = load_mask(tmp_path / "big.safetensors")
    assert got.nnz == len(rng_idx) and got.mask_id == m.mask_id
