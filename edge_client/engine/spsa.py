"""One masked two-sided SPSA (zeroth-order) step on the side-car buffer.

    z   = shared.prng.directions(seed, nnz, dist)        the seed IS the direction; nothing else travels
    L+  = L(v + eps z);  L- = L(v - eps z)              two forwards under no_grad
    g   = float32((L+ - L-) / (2 eps))                   the projected gradient: one float per step,
                                                         rounded to what the Update carries on the wire
    v  <- local_update(v, seed, g, lr, dist)             the client's local path (see below)

The buffer is restored EXACTLY after the two losses: the perturbed values are computed from a copy of
the buffer (it is small: nnz fp32), never by subtracting eps z back (MeZO's +1/-2/+1 drifts by a few
ulps in fp32). A non-finite loss restores the buffer and raises `NonFiniteLossError`: never a NaN
update.

The local path uses ONE rule, `local_update` = `shared.apply.apply_round(v, [seed], [g], lr, dist)`
(float64 arithmetic, one cast to fp32), both after a step and when a round is resumed after a crash
(edge_client/service/rounds.py replays the saved g's through the same function, step by step). So a
resumed round computes exactly the losses, g's and Update bytes an uninterrupted one does.

`private_spsa_step` is the same step under differential privacy (shared/dp.py): the two forwards return
per-example losses, each example's (l+ - l-) / 2 eps is clipped to C, and g = (sum + sigma C xi) / B.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import torch
from torch import nn

from shared.apply import apply_round
from shared.dp import DpParams, private_scalar
from shared.prng import Dist, directions
from shared.sidecar import SideCar

log = logging.getLogger(__name__)

LossFn = Callable[[nn.Module], float]
ExampleLossFn = Callable[[nn.Module], torch.Tensor]  # per-example losses (B,) of the step's batch
_Out = TypeVar("_Out")


class NonFiniteLossError(FloatingPointError):
    """A loss of the step, or g as float32, was NaN/inf; the side-car buffer is unchanged."""

    def __init__(self, seed: int, loss_plus: float, loss_minus: float) -> None:
        super().__init__(f"non-finite loss in SPSA step (seed {seed}): L+ = {loss_plus}, L- = {loss_minus}")
        self.seed, self.loss_plus, self.loss_minus = seed, loss_plus, loss_minus


@dataclass(frozen=True)
class StepResult:
    """g: projected gradient, a float32 value (what the Update sends); seconds: wall time of the whole
    step; timing: its phases (s; empty for a step read back from the client's state)."""

    g: float
    loss_plus: float
    loss_minus: float
    seconds: float
    seed: int = 0
    timing: dict[str, float] = field(default_factory=dict)

    @property
    def loss(self) -> float:
        """The step's loss estimate at v: mean of the two perturbed losses."""
        return 0.5 * (self.loss_plus + self.loss_minus)


def spsa_step(
    model: nn.Module,
    sidecar: SideCar,
    batch_loss_fn: LossFn,
    seed: int,
    eps: float,
    lr: float,
    dist: Dist = "rademacher",
) -> StepResult:
    """Perturb, evaluate twice, restore exactly, then v <- local_update(v, seed, g, lr, dist)."""
    _check_step(eps, lr)
    t0 = time.perf_counter()
    loss_plus, loss_minus, timing = _two_sided(model, sidecar, lambda m: float(batch_loss_fn(m)), seed, eps, dist)
    g = to_f32((loss_plus - loss_minus) / (2.0 * eps))
    if not math.isfinite(g):  # a NaN/inf loss, or finite losses whose g overflows float32
        raise NonFiniteLossError(seed, loss_plus, loss_minus)
    return _finish(sidecar, seed, g, lr, dist, loss_plus, loss_minus, t0, timing)


def private_spsa_step(
    model: nn.Module,
    sidecar: SideCar,
    example_losses_fn: ExampleLossFn,
    seed: int,
    eps: float,
    lr: float,
    dist: Dist,
    dp: DpParams,
    xi: float,
) -> StepResult:
    """The differentially private step (shared/dp.py): per-example projected differences clipped to C,
    summed, plus sigma C xi, divided by the expected batch size. `example_losses_fn` returns the step
    batch's per-example losses (B_drawn,) and may return none (an empty Poisson sample: no forward, g is
    noise only); `xi` is the N(0, 1) draw of the device's secret stream for this step. loss_plus/minus
    are the batch means (0.0 for an empty sample): kept on the device, never published under DP."""
    _check_step(eps, lr)
    t0 = time.perf_counter()
    plus, minus, timing = _two_sided(
        model, sidecar, lambda m: example_losses_fn(m).detach().to("cpu", torch.float64).numpy(), seed, eps, dist)
    lp, lm = (float(plus.mean()), float(minus.mean())) if plus.size else (0.0, 0.0)
    if not (np.isfinite(plus).all() and np.isfinite(minus).all()):
        raise NonFiniteLossError(seed, lp, lm)
    g = to_f32(private_scalar((plus - minus) / (2.0 * eps), dp, xi))
    if not math.isfinite(g):
        raise NonFiniteLossError(seed, lp, lm)
    return _finish(sidecar, seed, g, lr, dist, lp, lm, t0, timing)


def _check_step(eps: float, lr: float) -> None:
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps must be a finite float > 0, got {eps!r}")
    if not math.isfinite(lr):
        raise ValueError(f"lr must be finite, got {lr!r}")


def _two_sided(
    model: nn.Module, sidecar: SideCar, evaluate: Callable[[nn.Module], _Out], seed: int, eps: float, dist: Dist
) -> tuple[_Out, _Out, dict[str, float]]:
    """evaluate(model) at v + eps z and at v - eps z; the buffer is restored bit for bit whatever happens."""
    t0 = time.perf_counter()
    z = directions(seed, sidecar.nnz, dist, device=sidecar.values.device)  # (nnz,)
    values = sidecar.values
    with torch.no_grad():
        backup = values.clone()
        t1 = time.perf_counter()
        try:
            torch.add(backup, z, alpha=eps, out=values)
            out_plus = evaluate(model)
            t2 = time.perf_counter()
            torch.add(backup, z, alpha=-eps, out=values)
            out_minus = evaluate(model)
            t3 = time.perf_counter()
        finally:
            values.copy_(backup)  # bit-identical to before the step, whatever happened
    return out_plus, out_minus, {"directions": t1 - t0, "loss_plus": t2 - t1, "loss_minus": t3 - t2}


def _finish(
    sidecar: SideCar, seed: int, g: float, lr: float, dist: Dist, loss_plus: float, loss_minus: float, t0: float,
    timing: dict[str, float],
) -> StepResult:
    """v <- local_update(v, seed, g, lr, dist) on the side-car buffer; the StepResult with its timing."""
    t3 = time.perf_counter()
    values = sidecar.values
    with torch.no_grad():
        moved = local_update(values, seed, g, lr, dist)
        if moved is not values:
            values.copy_(moved)
        _syncer(values.device)()
    t4 = time.perf_counter()
    timing = {**timing, "update": t4 - t3}
    log.debug("spsa seed=%d g=%.6g L+=%.6f L-=%.6f %.1f ms", seed, g, loss_plus, loss_minus, (t4 - t0) * 1e3)
    return StepResult(g, loss_plus, loss_minus, t4 - t0, seed, timing)


def local_update(values: torch.Tensor, seed: int, g: float, lr: float, dist: Dist) -> torch.Tensor:
    """NEW CPU fp32 tensor: one step of the local path, v - lr g z(seed), in float64 with one cast.

    The only local-path rule: `spsa_step` applies it after the two losses, and a resumed round
    (edge_client/service/rounds.py) rebuilds its buffer by applying it once per saved step, in order.
    A step that moves nothing (lr == 0 or g == 0) returns `values` itself: no arithmetic at all, so
    even the sign of a -0.0 entry is kept on both paths."""
    if lr == 0.0 or g == 0.0:
        return values
    return apply_round(values, [seed], [g], lr, dist)


def to_f32(x: float) -> float:
    """x rounded to the nearest float32 (inf when it overflows), as a Python float."""
    with np.errstate(over="ignore"):
        return float(np.float32(x))


def _syncer(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


__all__ = [
    "ExampleLossFn", "LossFn", "NonFiniteLossError", "StepResult", "local_update", "private_spsa_step", "spsa_step",
    "to_f32",
]
