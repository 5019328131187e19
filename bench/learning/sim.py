"""In-process federated runs for `meerkat bench learning`: the product's round code, no MQTT.

Zeroth-order methods run through `bench/inproc.py`: the coordinator's RoundBook and one ClientRounds per
client, messages encoded and decoded by the real codec, the client's own engine step over one shared
model (fp32, quantization "none", side-car over the mask). Seeds are the coordinator's
(`derive_seed(master_seed, r, t)`), batches follow each client's product data order (its id), the
aggregate is the coordinator's (FedAvg by n_samples, late folding, robust rules as configured) and
MEERKAT-VP is the coordinator's DriftMonitor limiting flagged clients to one local step.

Backprop FedAvg (the upper bound): every client copies the full fp32 model, runs T local AdamW steps on
the same batches, the coordinator averages weights by n_samples; each client sends and receives the dense
fp32 parameters.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from bench.inproc import Device, InProcessFleet, SharedModelTrainer
from bench.tinylm import tasks as tasks_mod
from coordinator.config import Aggregation, CoordinatorConfig
from coordinator.drift import DriftMonitor, DriftThresholds
from coordinator.records import LrRecord
from coordinator.rounds import RoundBook
from edge_client.privacy import DeviceBudget
from edge_client.service.rounds import ClientRounds, Identity
from edge_client.service.trainer import Trainer, data_stream
from shared.dataset import Dataset, DataStream, load_jsonl, load_task_config
from shared.dp import SecretStream
from shared.loss import evaluate, example_losses
from shared.prng import Dist

log = logging.getLogger(__name__)

FLEET = "bench"


@dataclass
class ClientData:
    """One task split: per-client datasets (JSONL written by bench.tinylm.tasks) and the eval set."""

    task: str
    clients: dict[str, Dataset]
    eval: Dataset
    label_counts: dict[str, list[int]]

    @property
    def weights(self) -> dict[str, float]:
        return {c: float(len(ds)) for c, ds in self.clients.items()}

    def streams(self) -> dict[str, DataStream]:
        """Each client's batch order: the product's (seeded from the client id), the same for every method."""
        return {c: data_stream(c, len(ds)) for c, ds in self.clients.items()}


def make_data(
    task: str, out_dir: Path, tokenizer: Any, *, seed: int, n_clients: int = 10, alpha: float = 0.5,
    n_single: int = 0, n_train: int = 1000, n_eval: int = 200, max_length: int = 128,
) -> ClientData:
    """Write the split with bench.tinylm.tasks.write_task and read it back as the client engine does."""
    meta_path = tasks_mod.write_task(out_dir, task, n_clients=n_clients, alpha=alpha, seed=seed,
                                     n_train=n_train, n_eval=n_eval, n_single=n_single)
    files = tasks_mod.load_task(meta_path)
    cfg = replace(load_task_config(meta_path), max_length=max_length)  # what a client reads from task.json
    root = meta_path.parent
    clients = {Path(f).stem: load_jsonl(root / f, tokenizer, cfg) for f in files.meta["train"]}
    return ClientData(task, clients, load_jsonl(root / files.meta["eval"], tokenizer, cfg),
                      dict(files.meta["label_counts"]))


# ---------------------------------------------------------------- results


@dataclass
class Curve:
    """Eval accuracy after rounds; `bytes` = cumulative communicated bytes at that point (all clients)."""

    rounds: list[int] = field(default_factory=list)
    accuracy: list[float] = field(default_factory=list)
    bytes: list[int] = field(default_factory=list)

    def add(self, r: int, acc: float, nbytes: int) -> None:
        self.rounds.append(r)
        self.accuracy.append(acc)
        self.bytes.append(nbytes)


@dataclass
class RunResult:
    accuracy: float  # eval accuracy at the end
    curve: Curve
    bytes_up: int
    bytes_down: int
    seconds: float
    limited: dict[str, int] = field(default_factory=dict)  # MEERKAT-VP: client -> round it was flagged
    gradip: dict[str, list[float]] = field(default_factory=dict)  # per client, when a monitor ran
    final_loss: float = math.nan
    spikes: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # per client: (round, max|g| / median)
    dp_spent: dict[str, float] = field(default_factory=dict)  # DP runs: epsilon each device spent
    lrs: list[float] = field(default_factory=list)  # ZO: the lr each round's result was applied with
    # lr = "auto": each round's decision, "action: reason" (coordinator/lrctl.py), and mean training loss
    decisions: list[str] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"accuracy": self.accuracy, "bytes_up": self.bytes_up, "bytes_down": self.bytes_down,
                "seconds": round(self.seconds, 3), "limited": self.limited, "final_loss": self.final_loss,
                "curve": {"rounds": self.curve.rounds, "accuracy": self.curve.accuracy, "bytes": self.curve.bytes},
                **({"lrs": self.lrs} if self.lrs else {}),
                **({"decisions": self.decisions,
                    "losses": [x if math.isfinite(x) else None for x in self.losses]} if self.decisions else {})}


def eval_accuracy(model: torch.nn.Module, ds: Dataset) -> float:
    acc = evaluate(model, ds, batch_size=32)["accuracy"]
    if acc is None:
        raise ValueError("eval set has no labels")
    return float(acc)


def _eval_rounds(rounds: int, n_evals: int) -> set[int]:
    """Rounds (1-based: after round r) at which to evaluate: about n_evals, always the last."""
    every = max(1, rounds // max(1, n_evals))
    return {r for r in range(1, rounds + 1) if r % every == 0} | {rounds}


# ---------------------------------------------------------------- zeroth-order rounds


@dataclass(frozen=True)
class ZOSpec:
    """One zeroth-order run: T local steps for `rounds` rounds, every client every round."""

    rounds: int
    T: int
    lr: float | str  # a fixed lr, "auto" (the coordinator's controller) or "auto@X" (the controller started at X)
    eps: float
    batch_size: int
    seed: int
    dist: Dist = "rademacher"
    vp: bool = False  # MEERKAT-VP: limit drifting clients to one local step
    n_evals: int = 10
    thresholds: DriftThresholds | None = None
    aggregation: Aggregation = "centered"  # the coordinator's rule (its default: centred clipping)
    weight_cap_factor: float = 2.0  # the coordinator's FedAvg weight cap (0 = the devices' n_samples as they are)
    dp_epsilon: float = 0.0  # > 0: device-level DP at this target epsilon (bench/privacy.py), budget = rounds * T
    dp_clip: float = 1.0
    dp_delta: float = 0.0  # 0: each device's 1 / n^1.1


def zo_config(spec: ZOSpec, n_devices: int) -> CoordinatorConfig:
    """The coordinator config of a bench run: every device sampled every round, no deadline pressure
    (devices here are instantaneous), MEERKAT-VP on only for meerkat-vp. min_updates is 1, not n: the
    round closes by the product's quorum rule (0.75 + grace; every device reports in the same simulated
    second), so an update the book rejects (e.g. over the adaptive |g| cap) cannot stall the round; when
    so many are rejected that the quorum is never met, the round closes at its deadline (600 simulated s)
    with what was accepted."""
    return CoordinatorConfig(
        fleet=FLEET, mask=Path("in-process"), quant="none", master_seed=spec.seed, steps=spec.T, eps=spec.eps,
        **lr_fields(spec.lr),
        dist=spec.dist, batch_size=spec.batch_size, min_clients=n_devices, clients_per_round=0,
        min_updates=1, round_deadline_s=600.0, offline_after_s=1e9, drift_control=spec.vp, metrics=False,
        aggregation=spec.aggregation, weight_cap_factor=spec.weight_cap_factor,
        dp_epsilon=spec.dp_epsilon, dp_clip=spec.dp_clip, dp_delta=spec.dp_delta, dp_steps=spec.rounds * spec.T,
    )


def lr_fields(lr: float | str) -> dict[str, Any]:
    """The coordinator's lr / lr_start of a bench lr: a number, "auto" or "auto@X" (start at X)."""
    if isinstance(lr, str):
        mode, _, start = lr.partition("@")
        if mode != "auto":
            raise ValueError(f"bench lr {lr!r}: expected a number, \"auto\" or \"auto@X\"")
        return {"lr": "auto", "lr_start": float(start) if start else 0.0}
    return {"lr": lr}


# (loaded model, the device's examples, client id, mask id) -> that device's engine
TrainerFactory = Callable[[Any, Dataset, str, str], Trainer]


def run_zo(
    loaded: Any, data: ClientData, spec: ZOSpec, grad_on_mask: torch.Tensor | None,
    on_round: Callable[[int, list[float]], None] | None = None, mask_id: str = "0" * 16,
    trainer: TrainerFactory = SharedModelTrainer,
) -> RunResult:
    """The federated ZO run through the product's round code (bench/inproc.py: RoundBook + one ClientRounds
    per client + the client's engine step, messages through the real codec). `loaded` =
    shared.modelload.LoadedModel with a side-car, shared by the simulated devices.

    With `grad_on_mask`, the book's DriftMonitor records GradIP for every client (for calibration); it
    limits clients only when spec.vp. `on_round(r, G)` sees every round's aggregate (tests use it).
    `trainer` builds each device's engine (the MEERKAT-VP probe passes one that also records every step).
    """
    sidecar = loaded.sidecar
    if sidecar is None:
        raise ValueError("run_zo needs a model loaded with a mask (side-car)")
    t0 = time.perf_counter()
    monitor = DriftMonitor(grad_on_mask, spec.dist, spec.thresholds) if grad_on_mask is not None else None
    clients = sorted(data.clients)
    book = RoundBook(zo_config(spec, len(clients)), fingerprint=loaded.fingerprint, mask_id=mask_id,
                     values=sidecar.initial_values(), drift=monitor)
    dp = spec.dp_epsilon > 0
    devices = []
    for c in clients:
        engine = trainer(loaded, data.clients[c], c, mask_id)
        if dp:  # a DP fleet: every device needs its secret stream (SharedModelTrainer.private_step)
            engine.secret = bench_secret(spec.seed, c)  # type: ignore[attr-defined]
        core = ClientRounds(Identity(c, FLEET, loaded.fingerprint, mask_id, len(data.clients[c])),
                            sidecar.initial_values, privacy=DeviceBudget(len(data.clients[c])) if dp else None)
        devices.append(Device(core, engine))
    decisions: list[str] = []  # lr = "auto": the controller's record of each closed round
    fleet = InProcessFleet(book, devices, journal=lambda recs: decisions.extend(
        f"{r.action}: {r.reason}" for r in recs if isinstance(r, LrRecord)))
    curve = Curve()
    evals = _eval_rounds(spec.rounds, spec.n_evals)
    losses: list[float] = []
    lrs: list[float] = []
    for r in range(spec.rounds):
        ((res, _payload),) = fleet.run(1)
        lrs.append(res.lr)
        round_losses = fleet.losses.pop(r, [])
        losses.append(sum(round_losses) / len(round_losses) if round_losses else math.nan)
        if on_round is not None:
            on_round(r, list(res.scalars))
        if r + 1 in evals:
            sidecar.set_values(book.values)
            acc = eval_accuracy(loaded.model, data.eval)
            curve.add(r + 1, acc, fleet.traffic.up + fleet.traffic.down)
            log.info("zo T=%d round %d/%d: train loss %.4f, eval acc %.3f", spec.T, r + 1, spec.rounds, losses[-1], acc)
    sidecar.set_values(book.values)
    limited: dict[str, int] = {}
    if monitor is not None and spec.vp:
        for c in sorted(monitor.limited()):
            flagged = monitor.flagged_round(c)
            limited[c] = -1 if flagged is None else flagged
    return RunResult(
        curve.accuracy[-1], curve, fleet.traffic.up, fleet.traffic.down, time.perf_counter() - t0, limited=limited,
        gradip={c: monitor.gradip(c) for c in clients} if monitor is not None else {},
        final_loss=losses[-1] if losses else math.nan,
        spikes={c: [(st.round, st.ratio) for st in monitor.spikes(c)] for c in clients} if monitor is not None else {},
        dp_spent={d.client: spent[0] for d in devices if d.core.privacy and (spent := d.core.privacy.spent())},
        lrs=lrs, decisions=decisions, losses=losses if decisions else [],
    )


def bench_secret(seed: int, client: str) -> SecretStream:
    """A simulated device's DP secret, derived from the run seed so a benchmark run is reproducible. A real
    device draws its secret from os.urandom (edge_client/privacy.py); nothing public may derive it."""
    return SecretStream(hashlib.sha256(f"meerkat-bench-dp|{seed}|{client}".encode()).digest())


# ---------------------------------------------------------------- backprop FedAvg (upper bound)


@dataclass(frozen=True)
class BPSpec:
    rounds: int
    T: int
    lr: float
    batch_size: int
    seed: int
    n_evals: int = 10


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every parameter, for `restore`."""
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def run_backprop(model: torch.nn.Module, data: ClientData, spec: BPSpec) -> RunResult:
    """FedAvg of full fp32 models: T local AdamW steps per client per round, weights averaged by n_samples."""
    t0 = time.perf_counter()
    clients = sorted(data.clients)
    weights = data.weights
    total_w = math.fsum(weights.values())
    streams = data.streams()
    params = dict(model.named_parameters())
    global_state = snapshot(model)
    n_bytes = 4 * sum(p.numel() for p in global_state.values())  # dense fp32 payload, one direction
    curve = Curve()
    evals = _eval_rounds(spec.rounds, spec.n_evals)
    up = down = 0
    losses: list[float] = []
    for r in range(spec.rounds):
        acc_state = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in global_state.items()}
        round_losses = []
        for c in clients:
            restore(model, global_state)
            model.train()
            model.requires_grad_(True)
            opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.0)
            ds = data.clients[c]
            for _ in range(spec.T):
                batch = ds.batch(streams[c].take(spec.batch_size))
                per_ex, _, _ = example_losses(model, batch.examples, ds.pad_id)
                loss = per_ex.mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()  # type: ignore[no-untyped-call]
                opt.step()
                round_losses.append(float(loss.detach()))
            model.requires_grad_(False)
            model.eval()
            w = weights[c] / total_w
            for n, p in params.items():
                acc_state[n].add_(p.detach().double(), alpha=w)
            down += n_bytes
            up += n_bytes
        global_state = {n: a.float() for n, a in acc_state.items()}
        losses.append(sum(round_losses) / len(round_losses))
        if r + 1 in evals:
            restore(model, global_state)
            acc = eval_accuracy(model, data.eval)
            curve.add(r + 1, acc, up + down)
            log.info("backprop T=%d round %d/%d: train loss %.4f, eval acc %.3f", spec.T, r + 1, spec.rounds, losses[-1], acc)
    return RunResult(curve.accuracy[-1], curve, up, down, time.perf_counter() - t0, final_loss=losses[-1])


def restore(model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Put a saved parameter state back (backprop runs modify the model in place)."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, t in state.items():
            params[n].copy_(t)


__all__ = ["BPSpec", "ClientData", "Curve", "RunResult", "ZOSpec", "eval_accuracy", "make_data", "restore",
           "run_backprop", "run_zo", "snapshot", "zo_config"]
