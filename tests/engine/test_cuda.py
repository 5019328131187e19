"""The same exactness checks on a CUDA device (run through the device tool; skipped without CUDA)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from edge_client.engine.spsa import spsa_step
from shared.dataset import Batch, Dataset, Example
from shared.loss import batch_loss
from shared.modelload import Quant, load_model
from shared.prng import directions
from shared.sidecar import merged_dense_state, sidecar_layers

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_cuda_wrapped_forward_and_exact_step(quant: Quant, llama_dir: Path, llama_mask: dict[str, torch.Tensor]) -> None:
    lm = load_model(llama_dir, quant, "cuda", llama_mask, torch.float32, fingerprint="0" * 64)
    sc = lm.sidecar
    assert sc is not None and sc.values.is_cuda
    merged = merged_dense_state(lm.model)
    x = torch.linspace(-1, 1, 3 * 64, device="cuda").view(3, 64)
    for name, layer in sidecar_layers(lm.model):
        if layer.in_features == 64:
            w = merged[f"{name}.weight"].cuda()
            torch.testing.assert_close(layer(x), F.linear(x, w, layer.bias), rtol=1e-4, atol=1e-5)
    examples = [Example((1, 5, 9, 200, 33, 7, 2, 100), 7), Example((1, 80, 17, 250), 3)]
    batch = Batch(examples, Dataset(examples, pad_id=0))
    before = sc.values.clone()
    spsa_step(lm.model, sc, lambda m: batch_loss(m, batch), 5, 1e-3, 0.0)
    assert torch.equal(sc.values, before)
    res = spsa_step(lm.model, sc, lambda m: batch_loss(m, batch), 6, 1e-3, 0.1)
    expect = before.cpu().add_(directions(6, sc.nnz), alpha=-0.1 * res.g)
    assert torch.equal(sc.get_values(), expect)
