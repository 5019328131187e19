"""The shared fixtures of the ClientRounds tests (test_client_round_core, test_client_refusals,
test_client_chunks): a 64-entry value buffer, plans and results around it, a stand-in engine."""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from edge_client.engine.spsa import StepResult, to_f32
from edge_client.service.actions import Action, TrainStep
from edge_client.service.rounds import ClientRounds, Identity
from shared.apply import apply_round, values_checksum
from shared.messages import CheckpointChunk, RoundPlan, RoundResult

FP, MASK, ME, FLEET = "ab" * 32, "0123456789abcdef", "dev1", "f1"
V0 = torch.linspace(-1.0, 1.0, 64)
IDENTITY = Identity(ME, FLEET, FP, MASK, n_samples=24)


def core(**kw: Any) -> ClientRounds:
    c = ClientRounds(IDENTITY, lambda: V0.clone(), sync_retry_s=5.0, **kw)
    c.connected(0.0)
    return c


def plan(round: int = 0, base_values: torch.Tensor = V0, **kw: Any) -> RoundPlan:
    fields: dict[str, Any] = dict(
        fleet=FLEET, round=round, seeds=(11, 22, 33), lr=1e-2, eps=1e-3, dist="rademacher", steps={ME: 3},
        base_round=round - 1, deadline=1000.0, fingerprint=FP, mask_id=MASK, batch_size=4,
        values_checksum=values_checksum(base_values),
    )  # fmt: skip
    fields.update(kw)
    return RoundPlan(**fields)


def result(round: int, before: torch.Tensor, scalars: tuple[float, ...] = (0.5, -0.25)) -> tuple[RoundResult, torch.Tensor]:
    seeds = tuple(100 * round + t for t in range(len(scalars)))
    after = apply_round(before, seeds, scalars, 1e-2, "rademacher")
    return RoundResult(round, seeds, scalars, 1e-2, "rademacher", 2, values_checksum(after)), after


def engine_step(req: TrainStep) -> tuple[StepResult, int]:
    """A deterministic stand-in for Trainer.step: g from the seed, pointer advanced by the batch."""
    g = to_f32(((req.seed * 2654435761) % 1000 - 500) / 250.0)
    return StepResult(g, 2.0 + g, 2.0 - g, 0.01, req.seed), req.data_pointer + req.batch_size


def run_steps(c: ClientRounds, now: float = 0.0, limit: int = 100) -> list[Action]:
    """Tick until no TrainStep comes; every action out (TrainSteps answered with the stand-in engine)."""
    out: list[Action] = []
    for _ in range(limit):
        acts = c.tick(now)
        out += acts
        steps = [a for a in acts if isinstance(a, TrainStep)]
        if not steps:
            return out
        out += c.step_done(*engine_step(steps[0]))
    raise AssertionError("never finished")


def of(kind: type, acts: list[Action]) -> list[Any]:
    return [a for a in acts if isinstance(a, kind)]


def chunks_of(values: torch.Tensor, round: int, size: int) -> list[CheckpointChunk]:
    data = values.numpy().astype("<f4").tobytes()
    sha = hashlib.sha256(data).hexdigest()
    parts = [data[i : i + size] for i in range(0, len(data), size)]
    return [CheckpointChunk(round, i, len(parts), sha, d) for i, d in enumerate(parts)]
