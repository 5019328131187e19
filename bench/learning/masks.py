"""Masks for the learning benchmark, built with the project's own mask builder (coordinator.mask.builder).

- pretrain-grad (MEERKAT): top `fraction` by mean squared per-sequence gradient on pre-training-like text
  (the tiny corpus' domain documents, no task-formatted text: the analogue of C4);
- weight-magnitude and random: the baselines (no calibration text, so no GradIP);
- dense: every eligible weight (full-parameter FedZO), as a plain {layer: all indices} mapping.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import torch

from bench.tinylm import corpus
from coordinator.mask import builder as mb
from shared.prng import derive_seed

log = logging.getLogger(__name__)


def calibration(seed: int, n_docs: int) -> list[mb.CalibFile]:
    """Pre-training-like documents (every domain of the tiny corpus), one in-memory 'file'."""
    docs = tuple(corpus.generate(derive_seed(seed, 31), n_docs))
    sha = hashlib.sha256("\n\n".join(docs).encode()).hexdigest()
    return [mb.CalibFile(Path("tiny-corpus.txt"), sha, docs)]


def build_masks(
    model_dir: Path, fingerprint: str, fraction: float, *, calib_seed: int = 0, seqs: int = 64, seq_len: int = 128,
    random_seeds: tuple[int, ...] = (0,),
) -> dict[str, Any]:
    """{"pretrain-grad": Mask, "weight-magnitude": Mask, "random/<seed>": Mask, "dense": {layer: indices}}."""
    model, tok = mb.load_for_mask(model_dir, device="cpu", dtype="float32")
    encode, eos = mb.tokenizer_encoder(tok)
    calib = calibration(calib_seed, max(200, seqs * 4))
    out: dict[str, Any] = {}
    extra = {"bench": "learning"}
    res = mb.build_mask(model, encode, eos, calib, method="pretrain-grad", fraction=fraction, seqs=seqs,
                        seq_len=seq_len, progress=False)
    out["pretrain-grad"] = mb.to_mask(res, fingerprint, extra)
    log.info("pretrain-grad mask: nnz %d, concentration %s", res.nnz, res.stats.get("concentration", {}).get("ratio_band"))
    res = mb.build_mask(model, None, None, [], method="weight-magnitude", fraction=fraction, progress=False)
    out["weight-magnitude"] = mb.to_mask(res, fingerprint, extra)
    for s in random_seeds:
        res = mb.build_mask(model, None, None, [], method="random", fraction=fraction, seed=derive_seed(s, 41),
                            progress=False)
        out[f"random/{s}"] = mb.to_mask(res, fingerprint, extra)
    weights = mb.eligible_weights(model)
    out["dense"] = {n: torch.arange(w.numel(), dtype=torch.int64) for n, w in weights.items()}
    del model
    return out


__all__ = ["build_masks", "calibration"]
