"""In-process fleet: the product's round book + N device cores + the real engine, without a broker.

The coordinator's `RoundBook` (coordinator/rounds.py) and every device's `ClientRounds`
(edge_client/service/rounds.py) are the very objects the MQTT services pump; here a small mail loop
pumps them instead. Every message crosses as bytes through the real codec (`shared.codec.encode` /
`decode`, client id from the "topic" as the broker delivers it), so what is counted is what a real fleet
would send. Time is simulated: `tick_s` per loop iteration, deadlines and heartbeats in that time.

    fleet = InProcessFleet(book, [Device(core, trainer) for ...], fleet="bench")
    for result, payload in fleet.run(rounds=20): ...                # each RoundResult and its exact bytes
    fleet.book.values                                                # the coordinator's values

Used by `meerkat bench learning` (bench/learning_sim.py), the demo's before/after evaluation and the
equivalence test against a real fleet (tests/e2e/test_inproc_equivalence.py): for the same inputs the
RoundResults here are byte-identical to the ones a real coordinator publishes.

A hostile device is a real device with a `Tamper` (bench/attacks/): what its core would send as Join or
Update goes to the tamper instead, which sends whatever it likes through `Send` (several messages, fresh
msg_ids) and sees the coordinator's refusal of each (an ErrorMsg) or None, as an attacker on the wire would;
the book's real intake, admission and aggregation judge every one.

What differs from a real fleet, on purpose: no broker (so no lost or reordered messages), devices are
always online, a device trains all its steps before simulated time moves on, and nothing is persisted
(the book's WriteCheckpoint actions and the device's SaveStep are no-ops here; the book's Persist records
go to `journal` when one is given, e.g. an EventLog's `persist_many`, which is how bench/demo/longrun.py
makes a long run's event log for the dashboard). Heartbeats carry `reading(client, now)` when given
(else cpu 0, rss 0).
"""

from __future__ import annotations

import logging
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from coordinator.actions import Action as BookAction
from coordinator.actions import Persist, Publish
from coordinator.records import Record
from coordinator.rounds import RoundBook
from edge_client.engine.spsa import StepResult
from edge_client.privacy import DeviceBudget, DpStep
from edge_client.service.actions import Action as DeviceAction
from edge_client.service.actions import (
    Commit,
    DropQueued,
    DropRound,
    Exit,
    LoadValues,
    QueueUpdate,
    ResendUpdates,
    SaveStep,
    SendJoin,
    SendSync,
    SlowDown,
    TrainStep,
)
from edge_client.service.carry import heartbeat_message, join_message, sync_message, train_step
from edge_client.service.rounds import ClientRounds
from edge_client.service.telemetry import Reading
from edge_client.service.trainer import Trainer, data_stream, engine_step, private_engine_step
from shared.codec import decode, encode
from shared.dataset import Dataset, DataStream
from shared.dp import SecretStream
from shared.messages import (
    CheckpointChunk,
    ErrorMsg,
    Heartbeat,
    Join,
    Message,
    Replay,
    RoundPlan,
    RoundResult,
    Status,
    SyncRequest,
    Update,
)
from shared.modelload import LoadedModel
from shared.prng import Dist
from shared.sidecar import SideCar

log = logging.getLogger(__name__)

TO_DEVICE = (Replay, CheckpointChunk, ErrorMsg)

Send = Callable[[Join | Update], ErrorMsg | None]  # a message to the coordinator -> its refusal (None: none)


class Tamper(Protocol):
    """What a hostile device sends instead of its core's Join / Update (bench/attacks/strategies.py).
    `msg` is what the honest core would have sent (client "" as on the wire); `send` delivers any message
    from this device to the coordinator now and returns the ErrorMsg it answered with, if any."""

    def join(self, client: str, msg: Join, send: Send) -> None: ...

    def update(self, client: str, msg: Update, send: Send) -> None: ...


@dataclass
class Device:
    """One simulated device: its round core, the engine behind it, what its Join announces; `tamper`
    rewrites what it sends (None: an honest device)."""

    core: ClientRounds
    trainer: Trainer
    budget_gib: float = 1.0
    tamper: Tamper | None = None
    queued: dict[int, bytes] = field(default_factory=dict)  # round -> Update payload (the outbox)
    committed: int = -1  # the round its values are at (last Commit)

    @property
    def client(self) -> str:
        return self.core.me.client_id


@dataclass
class Traffic:
    """Bytes on the (simulated) wire: up = devices -> coordinator, down = coordinator -> devices, a
    broadcast counted once per device that receives it (what a broker delivers)."""

    up: int = 0
    down: int = 0
    messages: Counter[str] = field(default_factory=Counter)


class InProcessFleet:
    """A round book and its devices, pumped in one thread (module docstring)."""

    def __init__(
        self, book: RoundBook, devices: Sequence[Device], *, start: float = 1_000_000.0, tick_s: float = 1.0,
        heartbeat_s: float = 10.0, journal: Callable[[list[Record]], None] | None = None,
        reading: Callable[[str, float], Reading] | None = None,
    ) -> None:
        self.book = book
        self.devices = {d.client: d for d in devices}
        if len(self.devices) != len(devices):
            raise ValueError("device client ids must be unique")
        self.now = start
        self.tick_s = tick_s
        self.heartbeat_s = heartbeat_s
        self.journal, self.reading = journal, reading
        self.traffic = Traffic()
        self.losses: dict[int, list[float]] = {}  # round -> the loss of each Update trained for it (readers pop)
        self._mail: deque[tuple[str, bytes, type[Message] | tuple[type[Message], ...]]] = deque()
        self._last_hb = -float("inf")
        self._results: list[tuple[RoundResult, bytes]] = []
        self._connected = False

    # -- running ---------------------------------------------------------------------------------
    def run(self, rounds: int, max_ticks: int = 100_000) -> list[tuple[RoundResult, bytes]]:
        """Until the book closed `rounds` more rounds; returns each RoundResult published meanwhile with its
        exact payload bytes (what the coordinator would publish on result/{r})."""
        self._results = []
        target = self.book.last_round + rounds
        if not self._connected:
            self._connect()
        for _ in range(max_ticks):
            if self.book.last_round >= target:
                return self._results
            self._to_book(self.book.tick(self.now))
            self._deliver()
            for d in self.devices.values():  # a device trains its whole job before time moves on
                while self._device_tick(d):
                    pass
            self._heartbeats()
            self.now += self.tick_s
        raise RuntimeError(f"in-process fleet: {rounds} rounds not closed in {max_ticks} ticks "
                           f"(at round {self.book.last_round})")

    def _connect(self) -> None:
        self._connected = True
        for d in self.devices.values():
            self._send(d, Status(client="", online=True, ts=self.now), Status)
            self._device(d, d.core.connected(self.now))
        self._deliver()

    def _device_tick(self, d: Device) -> bool:
        """One core tick of `d` (carried out, mail delivered); True when it trained a step."""
        acts = d.core.tick(self.now)
        self._device(d, acts)
        self._deliver()
        return any(isinstance(a, TrainStep) for a in acts)

    def _heartbeats(self) -> None:
        if self.now - self._last_hb < self.heartbeat_s:
            return
        self._last_hb = self.now
        for d in self.devices.values():  # without `reading`: cpu 0, rss 0, the rest unknown
            got = self.reading(d.client, self.now) if self.reading is not None else None
            self._send(d, heartbeat_message(d.core, d.trainer, self.now, got), Heartbeat)
        self._deliver()

    # -- device -> coordinator -------------------------------------------------------------------
    def _send(self, d: Device, msg: Message, kind: type[Message]) -> None:
        payload = encode(msg)
        self.traffic.up += len(payload)
        self.traffic.messages[kind.__name__] += 1
        self._mail.append((d.client, payload, kind))

    def _device(self, d: Device, actions: list[DeviceAction]) -> None:
        for act in actions:
            if isinstance(act, TrainStep):
                self._device(d, train_step(d.core, d.trainer, act)[1])
            elif isinstance(act, LoadValues):
                d.trainer.set_values(act.values)
            elif isinstance(act, QueueUpdate):
                self.losses.setdefault(act.update.round, []).append(act.update.loss)
                if d.tamper is not None:
                    d.tamper.update(d.client, act.update, lambda m: self._probe(d, m))
                    continue
                d.queued[act.update.round] = encode(act.update)
                self._resend(d, act.update.round)
            elif isinstance(act, ResendUpdates):
                for r in sorted(d.queued):
                    self._resend(d, r)
            elif isinstance(act, Commit):
                d.committed = act.round
                d.queued = {r: p for r, p in d.queued.items() if r > act.round}
            elif isinstance(act, SendJoin):
                join = join_message(d.trainer, d.budget_gib, act.last_round)
                if d.tamper is not None:
                    d.tamper.join(d.client, join, lambda m: self._probe(d, m))
                else:
                    self._send(d, join, Join)
            elif isinstance(act, SendSync):
                self._send(d, sync_message(act.have_round), SyncRequest)
            elif isinstance(act, (SaveStep, DropRound, SlowDown)):
                pass  # nothing is persisted in memory; a dropped round needs no bookkeeping here; no clock to slow
            elif isinstance(act, DropQueued):
                d.queued.pop(act.round, None)
            elif isinstance(act, Exit):
                raise RuntimeError(f"simulated device {d.client}: {act.reason}")

    def _probe(self, d: Device, msg: Join | Update) -> ErrorMsg | None:
        """A tampered device's message handed to the book at once (through the codec); the ErrorMsg the
        book answers it with goes back to the tamper, not to the device's core. The last Update sent for
        a round is the one the device keeps in its outbox (re-sent after a reconnect)."""
        payload = encode(msg)
        self.traffic.up += len(payload)
        self.traffic.messages[type(msg).__name__] += 1
        if isinstance(msg, Update):
            d.queued[msg.round] = payload
        refusal: ErrorMsg | None = None
        rest: list[BookAction] = []
        for act in self.book.handle(decode(payload, type(msg), client=d.client), self.now):
            if isinstance(act, Publish) and act.to == d.client and isinstance(act.message, ErrorMsg):
                refusal = act.message
            else:
                rest.append(act)
        self._to_book(rest)
        return refusal

    def _resend(self, d: Device, round: int) -> None:
        payload = d.queued[round]
        self.traffic.up += len(payload)
        self.traffic.messages["Update"] += 1
        self._mail.append((d.client, payload, Update))

    # -- coordinator -> devices ------------------------------------------------------------------
    def _to_book(self, actions: list[BookAction]) -> None:
        if self.journal is not None:
            records = [a.record for a in actions if isinstance(a, Persist)]
            if records:
                self.journal(records)
        for act in actions:
            if not isinstance(act, Publish):
                continue  # Persist / WriteCheckpoint / Duplicate: durability and metrics, not traffic
            payload = encode(act.message)
            if act.to is not None:
                self._down(self.devices[act.to], payload, TO_DEVICE)
            elif isinstance(act.message, RoundPlan):
                for d in self.devices.values():
                    self._down(d, payload, RoundPlan)
            elif isinstance(act.message, RoundResult):
                self._results.append((act.message, payload))
                for d in self.devices.values():
                    self._down(d, payload, RoundResult)
            # a RunState (the run's lifecycle) is published by the pump, never by the book

    def _down(self, d: Device, payload: bytes, kind: type[Message] | tuple[type[Message], ...]) -> None:
        self.traffic.down += len(payload)
        self._mail.append(("@" + d.client, payload, kind))

    def _deliver(self) -> None:
        """Hand every queued message to its receiver, in order, until nothing is left (a broker that
        never loses or reorders)."""
        while self._mail:
            dest, payload, kind = self._mail.popleft()
            if dest.startswith("@"):
                d = self.devices[dest[1:]]
                self._device(d, d.core.handle(decode(payload, kind), self.now))
            else:
                self._to_book(self.book.handle(decode(payload, kind, client=dest), self.now))


def from_configs(coordinator_toml: Path, client_tomls: Sequence[Path], **fleet_kw: Any) -> InProcessFleet:
    """The fleet a set of config files describes, built the way the services build it: the coordinator's
    book from its config (model fingerprint, v_0 from the model dir, MEERKAT-VP monitor from the mask's
    gradient, `rounds` as the stop), and one `EngineTrainer` per client config (quantized model, its
    data file, its memory plan). Same inputs as a real fleet: the same RoundResults, byte for byte.
    `fleet_kw`: InProcessFleet's keywords (journal, reading, tick_s, ...)."""
    from coordinator.config import load_coordinator_config
    from edge_client.service.config import load_client_config
    from edge_client.service.rounds import Identity
    from edge_client.service.trainer import EngineTrainer
    from shared.fingerprint import fingerprint_model_dir
    from shared.maskfile import load_mask
    from shared.sidecar import initial_values_from_dir

    cfg = load_coordinator_config(coordinator_toml)
    if cfg.mask is None or cfg.model_dir is None:
        raise ValueError(f"{coordinator_toml}: the in-process fleet needs `mask` and `model_dir`")
    mask = load_mask(cfg.mask)
    book = RoundBook.from_config(cfg, mask, fingerprint=fingerprint_model_dir(cfg.model_dir),
                                 values=initial_values_from_dir(cfg.model_dir, mask.layers),
                                 stop_after_round=cfg.rounds - 1 if cfg.rounds else None)  # fmt: skip
    devices = []
    for path in client_tomls:
        ccfg = load_client_config(path)
        trainer = EngineTrainer(ccfg)
        me = Identity(ccfg.client_id, ccfg.fleet, trainer.fingerprint, trainer.mask_id, trainer.n_samples, ccfg.quant)
        budget = DeviceBudget(trainer.n_samples, max_epsilon=ccfg.dp_max_epsilon)  # as EdgeClient (ledger in memory)
        devices.append(Device(ClientRounds(me, trainer.initial_values, privacy=budget), trainer,
                              budget_gib=ccfg.memory_budget_gib))
    return InProcessFleet(book, devices, **fleet_kw)


class SharedModelTrainer:
    """A `Trainer` for one simulated device over a model shared by all of them: it keeps its own side-car
    values and loads them before each step (the engine step itself is the client's: `engine_step`).

    `loaded` = shared.modelload.LoadedModel with a side-car; `dataset` = this device's examples. The batch
    order is the product's (`data_stream(client_id, n)`), so a device here sees the batches the real
    `meerkat client` with the same id would."""

    def __init__(self, loaded: LoadedModel, dataset: Dataset, client_id: str, mask_id: str,
                 micro_batch: int | None = None, secret: SecretStream | None = None) -> None:
        if loaded.sidecar is None:
            raise ValueError("SharedModelTrainer needs a model loaded with a mask (side-car)")
        self.model: torch.nn.Module = loaded.model
        self.sidecar: SideCar = loaded.sidecar
        self.fingerprint = loaded.fingerprint
        self.mask_id = mask_id
        self.quant = str(loaded.quant)  # what its Join says (the book's quant_policy may check it)
        self.nnz = int(self.sidecar.nnz)
        self.dataset = dataset
        self.n_samples = len(dataset)
        self.stream: DataStream = data_stream(client_id, self.n_samples)
        self.micro_batch = micro_batch
        self.secret = secret  # the device's DP secret stream (a DP fleet); None: private steps refused
        self._values: torch.Tensor | None = None

    def initial_values(self) -> torch.Tensor:
        return self.sidecar.initial_values()

    def set_values(self, values: torch.Tensor) -> None:
        self._values = values

    def step(
        self, seed: int, eps: float, lr: float, dist: Dist, batch_size: int, data_pointer: int
    ) -> tuple[StepResult, int]:
        if self._values is None:
            raise RuntimeError("set_values() before step()")
        self.sidecar.set_values(self._values)
        out = engine_step(self.model, self.sidecar, self.dataset, self.stream, self.micro_batch, seed, eps, lr,
                          dist, batch_size, data_pointer)
        self._values = self.sidecar.get_values()
        return out

    def private_step(
        self, seed: int, eps: float, lr: float, dist: Dist, data_pointer: int, dp: DpStep
    ) -> tuple[StepResult, int]:
        """The client's private step (private_engine_step) over the shared model."""
        if self._values is None or self.secret is None:
            raise RuntimeError("private_step() needs set_values() first and a secret")
        self.sidecar.set_values(self._values)
        out = private_engine_step(self.model, self.sidecar, self.dataset, self.micro_batch, self.secret, seed, eps,
                                  lr, dist, dp, data_pointer)  # fmt: skip
        self._values = self.sidecar.get_values()
        return out

    def capabilities(self) -> dict[str, str | int | float | bool]:
        return {"device": "cpu", "quant": self.quant, "nnz": self.nnz}

    @property
    def peak_mem_bytes(self) -> int | None:
        return None


__all__ = ["Device", "InProcessFleet", "Send", "SharedModelTrainer", "Tamper", "Traffic", "from_configs"]
