"""One attack run: the in-process fleet (bench/inproc.py) with some devices hostile, evaluated every round.

The coordinator is the product's RoundBook with the product's defaults except `aggregation`; every device
trains honestly with the client's own engine step; the hostile ones (`typical`: the devices of median data
share, not whoever the split made largest) hand their Join and Updates to the attack strategy (bench/attacks/strategies.py), so intake, admission and
aggregation judge exactly what a hostile device on the wire would send. After every round the
coordinator's values are evaluated on the task's held-out set (the honest devices' model).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from typing import Any

from bench.attacks.strategies import Attack, make_attack
from bench.inproc import Device, InProcessFleet, SharedModelTrainer
from bench.learning.sim import FLEET, ClientData, ZOSpec, zo_config
from coordinator.config import Aggregation, CoordinatorConfig
from coordinator.rounds import RoundBook
from edge_client.service.rounds import ClientRounds, Identity
from shared.loss import evaluate


@dataclass(frozen=True)
class Cell:
    """One run of the matrix: an aggregation rule, an attack ("none": the clean run), how many hostile."""

    rule: Aggregation
    attack: str
    hostile: int
    seed: int

    @property
    def key(self) -> str:
        return f"{self.rule}/{self.attack}/{self.hostile}/{self.seed}"


@dataclass
class CellResult:
    cell: Cell
    accuracy: list[float] = field(default_factory=list)  # held-out accuracy after each round
    loss: list[float] = field(default_factory=list)  # held-out loss after each round
    start: tuple[float, float] = (math.nan, math.nan)  # (accuracy, loss) before round 0
    attacker: dict[str, Any] = field(default_factory=dict)  # strategies.Tally.to_json()
    seconds: float = 0.0
    lr: list[float] = field(default_factory=list)  # the lr each round's result was applied with (--lr auto: moves)

    def to_json(self) -> dict[str, Any]:
        c = self.cell
        return {"rule": c.rule, "attack": c.attack, "hostile": c.hostile, "seed": c.seed,
                "start": {"accuracy": self.start[0], "loss": self.start[1]},
                "accuracy": self.accuracy, "loss": self.loss, "attacker": self.attacker,
                "seconds": round(self.seconds, 2), "lr": self.lr}


def held_out(loaded: Any, data: ClientData, values: Any) -> tuple[float, float]:
    """(accuracy, loss) of `values` on the task's held-out set."""
    assert loaded.sidecar is not None
    loaded.sidecar.set_values(values)
    ev = evaluate(loaded.model, data.eval, batch_size=32)
    if ev["accuracy"] is None or ev["loss"] is None:
        raise ValueError("held-out set has no labels")
    return float(ev["accuracy"]), float(ev["loss"])


def book_config(spec: ZOSpec, rule: Aggregation, n_devices: int) -> CoordinatorConfig:
    """The coordinator config of a run: the learning bench's (every device every round, the product's
    defaults for caps and weights) with `rule` as the aggregation."""
    return zo_config(replace(spec, aggregation=rule), n_devices)


def typical(sizes: dict[str, int], hostile: int) -> list[str]:
    """The `hostile` devices of median data share: the clients ranked by (n, id), the middle `hostile` of
    them (10 devices: 1 -> the 5th smallest, 3 -> the 4th..6th). A Dirichlet split can give one device 40 %
    of the data; a bench that made it the hostile one would measure the loss of that data, not the attack."""
    if not 0 <= hostile <= len(sizes):
        raise ValueError(f"hostile must be in 0..{len(sizes)}, got {hostile}")
    ranked = sorted(sizes, key=lambda c: (sizes[c], c))
    lo = (len(ranked) - hostile) // 2
    return sorted(ranked[lo : lo + hostile])


def run_cell(loaded: Any, data: ClientData, spec: ZOSpec, cell: Cell, mask_id: str = "0" * 16) -> CellResult:
    """`cell` through the in-process fleet; `loaded` = shared.modelload.LoadedModel with a side-car."""
    sidecar = loaded.sidecar
    if sidecar is None:
        raise ValueError("run_cell needs a model loaded with a mask (side-car)")
    t0 = time.perf_counter()
    clients = sorted(data.clients)
    if not 0 <= cell.hostile < len(clients):
        raise ValueError(f"hostile must be in 0..{len(clients) - 1}, got {cell.hostile}")
    attack: Attack | None = make_attack(cell.attack) if cell.hostile else None
    bad = set(typical({c: len(data.clients[c]) for c in clients}, cell.hostile))
    book = RoundBook(book_config(spec, cell.rule, len(clients)), fingerprint=loaded.fingerprint, mask_id=mask_id, values=sidecar.initial_values())
    devices = [
        Device(ClientRounds(Identity(c, FLEET, loaded.fingerprint, mask_id, len(data.clients[c])),
                            sidecar.initial_values),
               SharedModelTrainer(loaded, data.clients[c], c, mask_id), tamper=attack if c in bad else None)
        for c in clients
    ]  # fmt: skip
    out = CellResult(cell, start=held_out(loaded, data, book.values))
    fleet = InProcessFleet(book, devices)
    for _ in range(spec.rounds):
        fleet.run(1)
        acc, loss = held_out(loaded, data, book.values)
        out.accuracy.append(acc)
        out.loss.append(loss)
        out.lr.append(book.results[-1].lr)
    if attack is not None:
        out.attacker = attack.tally.to_json() | {"devices": sorted(bad),
                                                 "share": sum(len(data.clients[c]) for c in bad) / sum(map(len, data.clients.values()))}
    out.seconds = time.perf_counter() - t0
    return out


__all__ = ["Cell", "CellResult", "book_config", "held_out", "run_cell", "typical"]
