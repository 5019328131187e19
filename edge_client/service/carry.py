"""What a device sends and trains, whatever carries it: shared by the MQTT pump (client.py) and the
in-process fleet (bench/inproc.py), so both put the very same bytes on the wire.

`ClientRounds` (rounds.py) decides WHEN to Join, ask, beat or train; these build WHAT goes out:
    join_message(trainer, budget_gib, last_round)   the Join of a SendJoin
    sync_message(have_round)                         the SyncRequest of a SendSync
    heartbeat_message(core, trainer, ts, ...)        the periodic Heartbeat (telemetry optional)
    train_step(core, trainer, act)                   carry out a TrainStep and answer the core (step_done);
                                                     a DP step (act.dp) through trainer.private_step
The `client` field stays "": the coordinator takes the id from the topic the broker delivered.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from edge_client.engine.spsa import StepResult
from edge_client.service.actions import Action, TrainStep
from edge_client.service.rounds import ClientRounds
from edge_client.service.trainer import Trainer
from shared.messages import Heartbeat, Join, SyncRequest

if TYPE_CHECKING:
    from edge_client.service.policy import Verdict
    from edge_client.service.telemetry import Reading
    from shared.evaluation import EvalResult


def join_message(trainer: Trainer, budget_gib: float, last_round: int) -> Join:
    """The Join announcing what `trainer` holds (fingerprint, mask, n_samples, capabilities), and that this
    client reads compact plans (1.3, `compact_plan`: docs/PROTOCOL.md §2 RoundPlan key 18)."""
    return Join(
        client="",
        fingerprint=trainer.fingerprint,
        mask_id=trainer.mask_id,
        n_samples=trainer.n_samples,
        budget_gib=float(budget_gib),
        capabilities={**trainer.capabilities(), "compact_plan": True},
        last_round=last_round,
    )


def sync_message(have_round: int) -> SyncRequest:
    return SyncRequest(client="", have_round=have_round)


def heartbeat_message(
    core: ClientRounds,
    trainer: Trainer,
    ts: float,
    reading: Reading | None = None,
    step_time_s: float | None = None,
    last_eval: tuple[int, EvalResult] | None = None,
    verdict: Verdict | None = None,
    trained_share: float | None = None,
) -> Heartbeat:
    """A Heartbeat at `ts`: the round being trained (else the round the values are at), the telemetry
    `reading` (None: cpu 0, rss 0, the rest unknown), the last evaluation (round, result), if any, and
    the device policy's `verdict` (available / paused + reason) with the share of time trained (1.3)."""
    job = core.job
    cpu_pct, rss_bytes = (0.0, 0) if reading is None else (reading.cpu_pct, reading.rss_bytes)
    privacy = core.privacy
    spent = privacy.spent() if privacy is not None else None
    if spent is not None:  # a DP fleet: no held-out evaluation (a function of the data, not noised) and no
        last_eval, step_time_s = None, None  # step time (it tracks the secret batch size) leave the device
    return Heartbeat(
        client="", ts=ts, cpu_pct=cpu_pct, rss_bytes=rss_bytes,
        gpu_mem_bytes=None if reading is None else reading.gpu_mem_bytes,
        temp_c=None if reading is None else reading.temp_c,
        power_w=None if reading is None else reading.power_w,
        step_time_s=step_time_s, peak_mem_bytes=trainer.peak_mem_bytes,
        round=job.plan.round if job is not None else max(core.round, -1),
        eval_round=None if last_eval is None else last_eval[0],
        eval_loss=None if last_eval is None else last_eval[1].loss,
        eval_acc=None if last_eval is None else last_eval[1].accuracy,
        eval_n=None if last_eval is None else last_eval[1].n,
        dp_epsilon=None if spent is None else spent[0], dp_delta=None if spent is None else spent[1],
        dp_exhausted=None if spent is None or privacy is None else privacy.exhausted,
        available=None if verdict is None else verdict.available,
        pause_reason=None if verdict is None else verdict.reason,
        trained_share=trained_share, peak_rss_bytes=None if reading is None else reading.peak_rss_bytes,
    )  # fmt: skip


def train_step(core: ClientRounds, trainer: Trainer, act: TrainStep) -> tuple[StepResult, list[Action]]:
    """Run SPSA step `act` on `trainer` and answer the core: the engine's result and the core's actions
    (SaveStep, and QueueUpdate after the round's last step), to carry out next."""
    if act.dp is not None:  # a DP fleet: the core asks this only of a device with a budget (private_step)
        result, pointer = trainer.private_step(  # type: ignore[attr-defined]
            act.seed, act.eps, act.lr, act.dist, act.data_pointer, act.dp)
    else:
        result, pointer = trainer.step(act.seed, act.eps, act.lr, act.dist, act.batch_size, act.data_pointer)
    return result, core.step_done(result, pointer)


__all__ = ["heartbeat_message", "join_message", "sync_message", "train_step"]
