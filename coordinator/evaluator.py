"""The coordinator's own evaluation: its current values on `eval_data`, on CPU, between rounds.

The model is the one `meerkat export` merges (`load_model(model_dir, quant, "cpu", mask,
compute_dtype=fp32)`: dequantized base + the side-car at the mask), so the loss printed here and the
loss `meerkat evaluate` prints for the export of the same round agree (same data, same values).
It runs in the pump thread after a round's result was committed and published: a few forward passes
of at most `eval_max` examples; the model is loaded on the first evaluation.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import torch

from coordinator.config import CoordinatorConfig
from coordinator.records import EvalRecord
from shared.maskfile import Mask

if TYPE_CHECKING:
    from shared.dataset import Dataset
    from shared.modelload import LoadedModel

log = logging.getLogger(__name__)


class CoordinatorEvaluator:
    def __init__(self, config: CoordinatorConfig, mask: Mask, fingerprint: str) -> None:
        if config.eval_data is None or config.model_dir is None:
            raise ValueError("CoordinatorEvaluator needs eval_data and model_dir")
        self.config = config
        self.mask = mask
        self.fingerprint = fingerprint
        self._loaded: LoadedModel | None = None
        self._data: Dataset | None = None

    def due(self, round: int) -> bool:
        return round >= 0 and round % self.config.eval_every == 0

    def _load(self) -> tuple[LoadedModel, Dataset]:
        if self._loaded is None or self._data is None:
            from shared.evaluation import load_eval_data
            from shared.modelload import load_model

            assert self.config.model_dir is not None and self.config.eval_data is not None
            t0 = time.perf_counter()
            loaded = load_model(self.config.model_dir, self.config.quant, "cpu", self.mask,
                                compute_dtype=torch.float32, fingerprint=self.fingerprint)  # fmt: skip
            if loaded.sidecar is None or loaded.tokenizer is None:
                raise RuntimeError(f"model_dir {self.config.model_dir}: no side-car or no tokenizer for evaluation")
            self._data = load_eval_data(self.config.eval_data, loaded.tokenizer, self.config.eval_seq_len)
            self._loaded = loaded
            log.info("eval: model and %d examples of %s loaded in %.1fs", len(self._data), self.config.eval_data,
                     time.perf_counter() - t0)  # fmt: skip
        return self._loaded, self._data

    def evaluate(self, round: int, values: torch.Tensor, now: float) -> EvalRecord:
        from shared.evaluation import evaluate_model

        loaded, data = self._load()
        assert loaded.sidecar is not None
        loaded.sidecar.set_values(values.detach().to(torch.float32).cpu())
        res = evaluate_model(loaded.model, data, limit=self.config.eval_max)
        acc = "-" if res.accuracy is None else f"{res.accuracy:.4f}"
        log.info("eval after round %d: loss %.6f accuracy %s (%d examples)", round, res.loss, acc, res.n)
        return EvalRecord(round, res.loss, res.accuracy, res.n, now)
