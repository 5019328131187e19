"""edge_client/service/carry.py: the Join / SyncRequest / Heartbeat a device sends and its training step,
the one copy both pumps use (EdgeClient over MQTT, bench/inproc.py in memory); and the action types."""

from __future__ import annotations

import dataclasses
import typing

import torch

import edge_client.service.actions as actions
from edge_client.engine.spsa import StepResult
from edge_client.service.actions import Action, QueueUpdate, SaveStep, TrainStep
from edge_client.service.carry import heartbeat_message, join_message, sync_message, train_step
from edge_client.service.telemetry import Reading
from shared.codec import decode, encode
from shared.evaluation import EvalResult
from shared.messages import Heartbeat, Join, SyncRequest
from shared.prng import Dist

from roundkit import FP, MASK, V0, core, engine_step, plan  # isort: skip


class FakeTrainer:
    """What the constructors read of a Trainer; `step` is the stand-in engine of roundkit."""

    fingerprint, mask_id, nnz, n_samples = FP, MASK, 64, 24
    peak_mem_bytes: int | None = 1234

    def initial_values(self) -> torch.Tensor:
        return V0.clone()

    def set_values(self, values: torch.Tensor) -> None:
        self.values = values

    def step(self, seed: int, eps: float, lr: float, dist: Dist, batch_size: int,
             data_pointer: int) -> tuple[StepResult, int]:
        return engine_step(TrainStep(0, 0, 0, seed, eps, lr, dist, batch_size, data_pointer))

    def capabilities(self) -> dict[str, str | int | float | bool]:
        return {"device": "cpu", "quant": "nf4", "nnz": self.nnz}


def test_join_and_sync_messages_round_trip_the_codec() -> None:
    join = join_message(FakeTrainer(), 2, last_round=4)
    assert join == Join(client="", fingerprint=FP, mask_id=MASK, n_samples=24, budget_gib=2.0,
                        capabilities={"device": "cpu", "quant": "nf4", "nnz": 64, "compact_plan": True}, last_round=4)
    assert isinstance(join.budget_gib, float) and decode(encode(join), Join, client="d") == dataclasses.replace(
        join, client="d")
    assert decode(encode(sync_message(7)), SyncRequest, client="d") == SyncRequest(client="d", have_round=7)


def test_heartbeat_names_the_round_being_trained_else_the_values_round() -> None:
    c, t = core(), FakeTrainer()
    hb = heartbeat_message(c, t, 5.0)
    assert hb == Heartbeat(client="", ts=5.0, cpu_pct=0.0, rss_bytes=0, gpu_mem_bytes=None, temp_c=None, power_w=None,
                           step_time_s=None, peak_mem_bytes=1234, round=-1)
    c.on_plan(plan(round=0), 0.0)
    reading = Reading(cpu_pct=50.0, rss_bytes=10, gpu_mem_bytes=20, temp_c=40.0, power_w=3.0, peak_rss_bytes=30)
    hb = heartbeat_message(c, t, 6.0, reading, step_time_s=0.5, last_eval=(3, EvalResult(1.5, 0.75, 8)))
    assert (hb.round, hb.cpu_pct, hb.gpu_mem_bytes, hb.temp_c, hb.power_w, hb.step_time_s) == (0, 50.0, 20, 40.0, 3.0, 0.5)
    assert (hb.eval_round, hb.eval_loss, hb.eval_acc, hb.eval_n) == (3, 1.5, 0.75, 8)
    back = decode(encode(hb), Heartbeat, client="d")
    assert (back.round, back.rss_bytes, back.peak_rss_bytes) == (0, 10, 30)  # key 19: the process's peak


def test_train_step_answers_the_core() -> None:
    c, t = core(), FakeTrainer()
    c.on_plan(plan(round=0), 0.0)
    kinds: list[type] = []
    for _ in range(3):
        (req,) = [a for a in c.tick(0.0) if isinstance(a, TrainStep)]
        result, acts = train_step(c, t, req)
        assert result == engine_step(req)[0]
        kinds += [type(a) for a in acts]
    assert kinds == [SaveStep, SaveStep, SaveStep, QueueUpdate] and c.job is None and c.trained_round == 0


def test_action_is_the_union_of_every_action_type() -> None:
    defined = {v for v in vars(actions).values() if isinstance(v, type) and dataclasses.is_dataclass(v)
               and v.__module__ == actions.__name__}
    assert set(typing.get_args(Action)) == defined and len(defined) == 12
    assert all(v.__dataclass_params__.frozen for v in defined)  # type: ignore[attr-defined]
