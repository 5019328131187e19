"""SPSA step: unbiased projected gradient, exact restore, update rule, NaN guard, seed-only directions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from edge_client.engine.spsa import NonFiniteLossError, local_update, spsa_step
from shared.dataset import Batch, Dataset, Example
from shared.loss import batch_loss
from shared.modelload import Quant, load_model
from shared.prng import derive_seed, directions

FP = "0" * 64


def _batch() -> Batch:
    examples = [
        Example((1, 5, 9, 200, 33, 7, 2, 100, 41, 12), 9),
        Example((1, 80, 17, 250, 4, 61), 3),
        Example((1, 300, 22, 18, 99, 150, 7), 1),
    ]
    return Batch(examples, Dataset(examples, pad_id=0))


def _small_mask(llama_mask: dict[str, torch.Tensor], per_layer: int = 6) -> dict[str, torch.Tensor]:
    return {k: v[:per_layer].clone() for k, v in llama_mask.items()}


def test_mean_g_z_matches_autograd_gradient_on_the_mask(llama_dir: Path, llama_mask: dict[str, torch.Tensor]) -> None:
    """(a) quant none, fp32: E_z[g z] = grad restricted to the mask.

    Metric: per seed, g must equal the directional derivative <grad, z> (finite-difference error
    O(eps^2): |g - <grad,z>| <= 2e-3 |grad| + 1e-4), and over N = 300 seeds (N / nnz = 5.4) the mean
    of g z must have cosine > 0.85 with the gradient (expected ~ 1/sqrt(1 + nnz/N) = 0.92) and a
    norm within 25% of the gradient's.
    """
    mask = _small_mask(llama_mask, 4)
    batch = _batch()
    dense = AutoModelForCausalLM.from_pretrained(str(llama_dir), dtype=torch.float32)
    dense.requires_grad_(True)
    from shared.loss import example_losses

    losses, _, _ = example_losses(dense, batch.examples, 0)
    losses.mean().backward()
    modules = dict(dense.named_modules())
    grad = torch.cat([modules[n].weight.grad.reshape(-1)[mask[n]] for n in sorted(mask)])

    lm = load_model(llama_dir, "none", "cpu", mask, torch.float32, fingerprint=FP)
    sc = lm.sidecar
    assert sc is not None and sc.nnz == grad.numel() == 56
    start = sc.get_values()
    n_seeds, eps = 300, 1e-3
    acc = torch.zeros(sc.nnz, dtype=torch.float64)
    for t in range(n_seeds):
        seed = derive_seed(2024, t)
        res = spsa_step(lm.model, sc, lambda m: batch_loss(m, batch), seed, eps, 0.0)
        z = directions(seed, sc.nnz)
        assert abs(res.g - float(grad @ z)) <= 2e-3 * float(grad.norm()) + 1e-4
        acc += res.g * z.double()
    assert torch.equal(sc.get_values(), start)
    est = (acc / n_seeds).float()
    cos = float(torch.nn.functional.cosine_similarity(est, grad, dim=0))
    print(f"cosine {cos:.4f}, norm ratio {float(est.norm() / grad.norm()):.3f}")
    assert cos > 0.85, cos
    assert 0.75 < float(est.norm() / grad.norm()) < 1.25


@pytest.mark.parametrize("quant", ["nf4", "none"])
def test_lr_zero_leaves_buffer_bit_identical(quant: Quant, llama_dir: Path, llama_mask: dict[str, torch.Tensor]) -> None:
    """(c) lr = 0: same bits afterwards (also with -0.0 entries and gaussian directions)."""
    lm = load_model(llama_dir, quant, "cpu", llama_mask, torch.float32, fingerprint=FP)
    sc = lm.sidecar
    assert sc is not None
    vals = sc.initial_values()
    vals[::7] = -0.0
    sc.set_values(vals)
    before = sc.values.clone()
    batch = _batch()
    for seed, dist in ((5, "rademacher"), (6, "gaussian"), (2**64 - 1, "rademacher")):
        spsa_step(lm.model, sc, lambda m: batch_loss(m, batch), seed, 1e-2, 0.0, dist)  # type: ignore[arg-type]
        assert torch.equal(sc.values.view(torch.int32), before.view(torch.int32))


def test_update_is_v_minus_lr_g_z_and_perturbation_uses_the_seed(
    llama_dir: Path, llama_mask: dict[str, torch.Tensor]
) -> None:
    lm = load_model(llama_dir, "nf4", "cpu", llama_mask, torch.float32, fingerprint=FP)
    sc = lm.sidecar
    assert sc is not None
    v0 = sc.get_values()
    seen: list[torch.Tensor] = []
    batch = _batch()

    def loss(m: torch.nn.Module) -> float:
        seen.append(sc.get_values())
        return batch_loss(m, batch)

    seed, eps, lr = 77, 1e-3, 0.5
    res = spsa_step(lm.model, sc, loss, seed, eps, lr)
    z = directions(seed, sc.nnz)
    assert torch.equal(seen[0], v0 + eps * z) and torch.equal(seen[1], v0 - eps * z)
    exact = (res.loss_plus - res.loss_minus) / (2 * eps)
    assert res.g == float(np.float32(exact)) and abs(res.g - exact) <= 1e-7 * abs(exact)  # g is the f32 the wire carries
    assert res.g != 0.0
    # the local path: float64 v - lr g z, one cast (the rule a resumed round replays), not an fp32 add_
    expect = torch.from_numpy((v0.double() - (res.g * z.double()) * lr).numpy().astype(np.float32))
    assert torch.equal(sc.get_values(), expect)
    assert torch.equal(sc.get_values(), local_update(v0, seed, res.g, lr, "rademacher"))
    assert res.seconds > 0 and set(res.timing) == {"directions", "loss_plus", "loss_minus", "update"}


def test_same_seed_same_g_on_a_fresh_load(llama_dir: Path, llama_mask: dict[str, torch.Tensor]) -> None:
    batch = _batch()
    gs = []
    for _ in range(2):
        lm = load_model(llama_dir, "int8", "cpu", llama_mask, torch.float32, fingerprint=FP)
        assert lm.sidecar is not None
        gs.append(spsa_step(lm.model, lm.sidecar, lambda m: batch_loss(m, batch), 9, 1e-3, 0.1).g)
    assert gs[0] == gs[1]


def test_non_finite_loss_raises_and_keeps_the_buffer(llama_dir: Path, llama_mask: dict[str, torch.Tensor]) -> None:
    lm = load_model(llama_dir, "none", "cpu", llama_mask, torch.float32, fingerprint=FP)
    sc = lm.sidecar
    assert sc is not None
    before = sc.values.clone()
    calls = iter([1.0, float("nan")])
    with pytest.raises(NonFiniteLossError, match="seed 3"):
        spsa_step(lm.model, sc, lambda m: next(calls), 3, 1e-3, 1.0)
    assert torch.equal(sc.values, before)

    def boom(m: torch.nn.Module) -> float:
        raise RuntimeError("loss exploded")

    with pytest.raises(RuntimeError, match="exploded"):
        spsa_step(lm.model, sc, boom, 3, 1e-3, 1.0)
    assert torch.equal(sc.values, before)
    # finite losses whose g overflows float32 (what the Update would carry): refused the same way
    huge = iter([3e38, -3e38])
    with pytest.raises(NonFiniteLossError):
        spsa_step(lm.model, sc, lambda m: next(huge), 3, 1e-3, 1.0)
    assert torch.equal(sc.values, before)


@pytest.mark.parametrize("eps, lr", [(0.0, 0.1), (-1e-3, 0.1), (float("nan"), 0.1), (1e-3, float("inf"))])
def test_bad_eps_or_lr_rejected(eps: float, lr: float, llama_dir: Path, llama_mask: dict[str, torch.Tensor]) -> None:
    lm = load_model(llama_dir, "none", "cpu", llama_mask, torch.float32, fingerprint=FP)
    assert lm.sidecar is not None
    with pytest.raises(ValueError, match="eps|lr"):
        spsa_step(lm.model, lm.sidecar, lambda m: 0.0, 1, eps, lr)
