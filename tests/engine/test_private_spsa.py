"""The private SPSA step (shared/dp.py, private_spsa_step, private_engine_step): the clip bound holds per
example, sigma = 0 and a huge clip give the plain step's g, the noise and the sample come from the device
secret only, and a recomputed step is bit-identical."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from edge_client.engine.spsa import private_spsa_step, spsa_step
from edge_client.privacy import DpStep
from edge_client.service.trainer import private_engine_step
from shared.dataset import Batch, Dataset, Example
from shared.dp import DpParams, SecretStream, clip_scalars, private_scalar
from shared.loss import batch_loss, target_losses
from shared.modelload import load_model
from shared.prng import derive_seed, directions, raw_u64, u64_at

FP = "0" * 64
EXAMPLES = [
    Example((1, 5, 9, 200, 33, 7, 2, 100, 41, 12), 9),
    Example((1, 80, 17, 250, 4, 61), 3),
    Example((1, 300, 22, 18, 99, 150, 7), 1),
    Example((1, 7, 7, 40, 41, 42, 43), 2),
]
DATA = Dataset(EXAMPLES, pad_id=0)


def _losses(m: torch.nn.Module) -> torch.Tensor:
    return target_losses(m, EXAMPLES, 0)


def _diffs(lm: object, seed: int, eps: float) -> np.ndarray:
    """Per-example (l+ - l-) / 2 eps computed by hand at the side-car's current values."""
    sc = lm.sidecar  # type: ignore[attr-defined]
    v = sc.get_values()
    z = directions(seed, sc.nnz)
    out = []
    with torch.no_grad():
        for sign in (1.0, -1.0):
            sc.set_values(v + sign * eps * z)
            out.append(_losses(lm.model).double().numpy())  # type: ignore[attr-defined]
    sc.set_values(v)
    return (out[0] - out[1]) / (2 * eps)


def test_clip_bound_holds_per_example() -> None:
    d = np.array([-5.0, -0.3, 0.0, 0.2, 7.0, 1e30])
    c = clip_scalars(d, 0.5)
    assert np.all(np.abs(c) <= 0.5)
    assert c.tolist() == [-0.5, -0.3, 0.0, 0.2, 0.5, 0.5]  # inside the bound: unchanged
    # one example moves the noiseless sum by at most C, however large its difference
    p = DpParams(0.5, 0.0, 4)
    with_it = private_scalar(d, p, 0.0) * 4
    without = private_scalar(np.delete(d, 5), p, 0.0) * 4
    assert abs(with_it - without) <= 0.5
    with pytest.raises(FloatingPointError):
        clip_scalars(np.array([np.nan]), 1.0)


def test_private_step_clips_each_example_and_adds_the_scaled_noise(
    llama_dir: Path, llama_mask: dict[str, torch.Tensor]
) -> None:
    lm = load_model(llama_dir, "none", "cpu", llama_mask, torch.float32, fingerprint=FP)
    seed, eps, clip, xi = derive_seed(5, 1), 1e-2, 1e-3, 0.37
    d = _diffs(lm, seed, eps)
    assert np.abs(d).max() > clip  # the bound really bites in this test
    params = DpParams(clip, 2.0, 8)
    res = private_spsa_step(lm.model, lm.sidecar, _losses, seed, eps, 0.0, "rademacher", params, xi)  # type: ignore[arg-type]
    want = (np.clip(d, -clip, clip).sum() + 2.0 * clip * xi) / 8
    assert res.g == pytest.approx(want, rel=1e-5, abs=1e-9)
    assert abs(res.g - 2.0 * clip * xi / 8) <= len(EXAMPLES) * clip / 8 + 1e-9  # |data part| <= B_drawn C / B


def test_no_noise_and_no_clip_is_the_plain_step(llama_dir: Path, llama_mask: dict[str, torch.Tensor]) -> None:
    lm = load_model(llama_dir, "none", "cpu", llama_mask, torch.float32, fingerprint=FP)
    seed, eps = derive_seed(5, 2), 1e-2
    v0 = lm.sidecar.get_values()  # type: ignore[union-attr]
    batch = Batch(list(EXAMPLES), DATA)
    plain = spsa_step(lm.model, lm.sidecar, lambda m: batch_loss(m, batch), seed, eps, 1e-3)  # type: ignore[arg-type]
    lm.sidecar.set_values(v0)  # type: ignore[union-attr]
    priv = private_spsa_step(lm.model, lm.sidecar, _losses, seed, eps, 1e-3, "rademacher",  # type: ignore[arg-type]
                             DpParams(1e9, 0.0, len(EXAMPLES)), 1.5)
    assert priv.g == pytest.approx(plain.g, rel=1e-3)  # fp32 losses: per-example vs batch sums round apart


def test_secret_stream_is_keyed_by_the_secret_only() -> None:
    a, b = SecretStream(b"a" * 32), SecretStream(b"b" * 32)
    path = (3, 12345678901234567890, 0, 64)
    assert a.gaussian("noise", *path) == SecretStream(b"a" * 32).gaussian("noise", *path)  # reproducible
    assert a.gaussian("noise", *path) != b.gaussian("noise", *path)
    assert a.poisson_sample(1000, 0.1, "sample", *path) != b.poisson_sample(1000, 0.1, "sample", *path)
    # nothing public reproduces the key: not the fleet's seed tree, not the bare path
    key = a.key("noise", *path)
    public = {derive_seed(path[0], *path[1:]), derive_seed(0, *path), *(u64_at(p, 0) for p in path), *path}
    assert key not in public
    assert "a" * 8 not in repr(a)
    with pytest.raises(ValueError, match="16 bytes"):
        SecretStream(b"short")


def test_secret_stream_draws_have_the_right_law() -> None:
    s = SecretStream(bytes(range(32)))
    xs = np.array([s.gaussian("noise", i) for i in range(20000)])
    assert abs(xs.mean()) < 0.03 and abs(xs.std() - 1.0) < 0.03
    assert np.mean(np.abs(xs) > 1.96) == pytest.approx(0.05, abs=0.007)
    sizes = [len(s.poisson_sample(500, 0.1, "sample", i)) for i in range(400)]
    assert np.mean(sizes) == pytest.approx(50, abs=1.5)
    assert raw_u64(s.key("sample", 0), 3).dtype == np.uint64


def test_engine_step_is_reproducible_and_advances_by_the_expected_batch(
    llama_dir: Path, llama_mask: dict[str, torch.Tensor]
) -> None:
    lm = load_model(llama_dir, "none", "cpu", llama_mask, torch.float32, fingerprint=FP)
    v0 = lm.sidecar.get_values()  # type: ignore[union-attr]
    secret = SecretStream(b"k" * 32)
    step = DpStep(DpParams(0.05, 1.0, 2), 0.5, (4, 99, 1))
    r1, p1 = private_engine_step(lm.model, lm.sidecar, DATA, 2, secret, derive_seed(7, 0), 1e-2, 1e-3,  # type: ignore[arg-type]
                                 "rademacher", step, 10)
    v1 = lm.sidecar.get_values()  # type: ignore[union-attr]
    lm.sidecar.set_values(v0)  # type: ignore[union-attr]
    r2, p2 = private_engine_step(lm.model, lm.sidecar, DATA, 3, secret, derive_seed(7, 0), 1e-2, 1e-3,  # type: ignore[arg-type]
                                 "rademacher", step, 10)
    assert (r1.g, p1) == (r2.g, p2) == (r2.g, 12)  # micro-batching does not change g
    assert torch.equal(v1, lm.sidecar.get_values())  # type: ignore[union-attr]
    other = SecretStream(b"j" * 32)
    lm.sidecar.set_values(v0)  # type: ignore[union-attr]
    r3, _ = private_engine_step(lm.model, lm.sidecar, DATA, 2, other, derive_seed(7, 0), 1e-2, 1e-3,  # type: ignore[arg-type]
                                "rademacher", step, 10)
    assert r3.g != r1.g
