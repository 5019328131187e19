"""lr = "auto" through the real coordinator (Mosquitto, SQLite, a subprocess): every RoundResult carries
the lr it was applied with, so a device that replays the missed results or loads a checkpoint lands on
the coordinator's checksum across lr changes (a grow, a damp that applies less than the plan's lr, an
undo that publishes the previous result negated); a SIGKILLed coordinator resumes the controller exactly:
the same RoundPlans and RoundResults as a run nobody killed."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from coordfakes import (
    FakeClient,
    ThreadedCoordinator,
    make_config,
    synthetic_mask,
    synthetic_v0,
    uid,
    write_config_toml,
)

from coordinator.dashboard import render_html
from coordinator.eventlog import EventLog
from coordinator.fleetview import fleet_view
from coordinator.server import Coordinator
from coordinator.status import format_status, status_report
from shared.apply import apply_round, values_checksum
from shared.messages import CheckpointChunk, Replay, RoundPlan, RoundResult

ROOT = Path(__file__).resolve().parents[2]
CALM = [1.0, -0.9, 1.1, -1.0]
STEEP = [1.0, -4.0, 5.0, -4.5]  # g_1.. ~4.5 x g_0: the local paths diverged (drift > DRIFT_MAX)
# per round: (loss, grads) the scripted device reports; the controller's answers are asserted below
SCRIPT = [(1.0, CALM), (0.8, CALM), (0.6, CALM), (0.5, STEEP), (0.9, CALM), (0.85, CALM), (1.4, CALM), (0.4, CALM)]


def test_replay_and_checkpoint_catch_up_across_lr_changes(tmp_path: Path, broker_url: str) -> None:
    mask = synthetic_mask((300, 200))
    v0 = synthetic_v0(mask.nnz)
    cfg = make_config(tmp_path, broker_url, min_clients=1, steps=4, lr="auto", lr_start=0.01, replay_max=5,
                      chunk_bytes=1024, checkpoint_every=2, keep_checkpoints=2)  # fmt: skip
    coord = Coordinator(cfg, mask=mask, initial_values=v0)
    runner = ThreadedCoordinator(coord).start()
    fp = mask.meta.fingerprint
    active = FakeClient(broker_url, cfg.fleet, uid("act"))
    sleeper = FakeClient(broker_url, cfg.fleet, uid("sleep"))
    plans: list[RoundPlan] = []
    results: list[RoundResult] = []
    try:
        active.join(fp, mask.mask_id, n_samples=3)
        for r, (loss, grads) in enumerate(SCRIPT):
            plans.append(active.wait_for(RoundPlan, lambda p, r=r: p.round == r))
            active.update(r, grads, 3, fp, msg_id=r, loss=loss)
            results.append(active.wait_for(RoundResult, lambda m, r=r: m.round == r))
        # start 0.01, calm (step cap 0.4 x 1.0 / (4 x 1.0) = 0.1): x2; round 1 fell: x2; round 2 fell: x2 but
        # only up to the step cap (0.4 x 0.6 / (4 x 1.0) = 0.06); round 3 diverged: applied at 0.06 / 4, next
        # 0.03; round 4 spiked (0.9 > 1.5 x its 0.5): 0.015; round 5 held (0.85 ~ smoothed 0.825); round 6, at
        # the same lr, jumped on the values round 5 made (1.4 >> smoothed ~0.84, 1 of 1 spiked): its result is
        # round 6's seeds with scalar 0, then round 5's pairs negated, at round 5's lr 0.015; the next plan
        # 0.0075; round 7 fell: x1.25 (ceiling 0.7 x 0.015)
        assert [p.lr for p in plans] == pytest.approx([0.01, 0.02, 0.04, 0.06, 0.03, 0.015, 0.015, 0.0075])
        assert [r.lr for r in results] == pytest.approx([0.01, 0.02, 0.04, 0.015, 0.03, 0.015, 0.015, 0.0075])
        assert results[6].seeds == plans[6].seeds + results[5].seeds and results[6].n_clients == 0
        assert results[6].scalars == (0.0,) * 4 + tuple(-g for g in results[5].scalars) and results[5].scalars
        mine = v0
        for res in results[:3]:
            mine = apply_round(mine, res.seeds, res.scalars, res.lr, "rademacher")
        sleeper.join(fp, mask.mask_id, n_samples=3, last_round=2)
        sleeper.sync(2)  # 5 behind = replay_max: the scalar replay of rounds 3..7, each with its lr
        rep = sleeper.wait_for(Replay)
        assert [r.round for r in rep.results] == [3, 4, 5, 6, 7]
        after = {}
        for res in rep.results:
            assert res == results[res.round]
            mine = apply_round(mine, res.seeds, res.scalars, res.lr, "rademacher")
            assert values_checksum(mine) == res.values_checksum
            after[res.round] = mine
        assert (after[6] - after[4]).abs().max() <= 1e-6 * after[4].abs().max()  # undone up to float32 rounding
        assert not torch.equal(after[5], after[4])
        sleeper.sync(-1)  # 8 behind: the values as checkpoint chunks
        chunks = [sleeper.wait_for(CheckpointChunk)]
        chunks += [sleeper.wait_for(CheckpointChunk) for _ in range(chunks[0].total - 1)]
        data = b"".join(c.data for c in sorted(chunks, key=lambda c: c.index))
        assert chunks[0].round == 7 and hashlib.sha256(data).hexdigest() == results[-1].values_checksum
        from_ckpt = torch.from_numpy(np.frombuffer(data, dtype="<f4").copy())
        with_plan_lr = v0  # what a replica that applied each plan's lr would hold: not the fleet's values
        for p, res in zip(plans, results, strict=True):
            with_plan_lr = apply_round(with_plan_lr, res.seeds, res.scalars, p.lr, "rademacher")
    finally:
        runner.stop()
        active.close()
        sleeper.close()
    assert torch.equal(mine, coord.values) and torch.equal(from_ckpt, coord.values)
    assert values_checksum(with_plan_lr) != results[-1].values_checksum
    ev = EventLog(cfg.state_dir, readonly=True)
    rows = ev.views.lr_decisions()
    ev.close()
    assert [(d.round, d.action) for d in rows] == [(0, "start"), (1, "grow"), (2, "grow"), (3, "damp"),
                                                   (4, "backoff"), (5, "hold"), (6, "undo"), (7, "grow")]  # fmt: skip
    assert "drift" in rows[3].reason and "1 of 1 devices spiked" in rows[4].reason
    assert "round 5 damaged the fleet" in rows[6].reason
    rep = status_report(cfg.state_dir)  # `meerkat status` and the dashboard show the lr per round and why
    assert [r["lr"] for r in rep["recent_rounds"]] == [r.lr for r in results]
    assert [d["action"] for d in rep["lr_decisions"]][-5:] == ["damp", "backoff", "hold", "undo", "grow"]
    text = format_status(rep)
    assert "0.06 -> 0.015 -> 0.03  damp: local paths diverged: drift" in text
    assert "0.015 -> 0.015 -> 0.0075  undo: round 5 damaged the fleet" in text
    html = render_html(fleet_view(cfg.state_dir, 0.0, last=None))
    assert 'id="lr"' in html and "local paths diverged" in html and "1 of 1 devices spiked" in html
    assert "round 5 damaged the fleet" in html
    again = Coordinator(cfg, mask=mask, initial_values=v0)  # a restart rebuilds values and the controller
    assert torch.equal(again.values, coord.values) and again.book.lr.lr == coord.book.lr.lr
    assert again.book.lr.ctl is not None and coord.book.lr.ctl is not None
    assert again.book.lr.ctl.state() == coord.book.lr.ctl.state()
    again.log.close()


def _start(cfg: Path, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "shared.cli", "-v", "coordinator", "--config", str(cfg)],
        cwd=ROOT, stdout=log.open("ab"), stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip


def _run(tmp: Path, broker_url: str, tiny_model, kill_after: int | None) -> tuple[list, list, list]:  # type: ignore[no-untyped-def, type-arg]
    """Script two devices through len(SCRIPT) rounds of a coordinator subprocess (lr auto); SIGKILL it once
    the result of round `kill_after` arrived and start it again. Returns plans, results, lr decisions."""
    fleet, state = uid("f"), tmp / "state"
    tmp.mkdir()
    cfg = write_config_toml(
        tmp / "coordinator.toml", broker=broker_url, fleet=fleet, client_id=uid("coord"), state_dir=state,
        model_dir=tiny_model.model_dir, mask=tiny_model.mask_path, steps=4, lr="auto", min_clients=2,
        round_deadline_s=600.0, rounds=len(SCRIPT), metrics=False, master_seed=7,
    )  # fmt: skip
    log = tmp / "coordinator.log"
    fp, mid = tiny_model.fingerprint, tiny_model.mask.mask_id
    clients = [FakeClient(broker_url, fleet, uid(k)) for k in ("a", "b")]
    plans, results = [], []
    proc = _start(cfg, log)
    try:
        for k, cl in enumerate(clients):
            cl.join(fp, mid, n_samples=5 + k)
        for r, (loss, grads) in enumerate(SCRIPT):
            plans.append(clients[0].wait_for(RoundPlan, lambda p, r=r: p.round == r, timeout=60))
            for k, cl in enumerate(clients):
                cl.update(r, [g * (1 + 0.5 * k) for g in grads], 5 + k, fp, msg_id=r, loss=loss + 0.1 * k)
            results.append(clients[1].wait_for(RoundResult, lambda m, r=r: m.round == r, timeout=60))
            if r == kill_after:
                proc.send_signal(signal.SIGKILL)
                assert proc.wait(10) == -signal.SIGKILL
                proc = _start(cfg, log)
        assert proc.wait(60) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for cl in clients:
            cl.close()
    ev = EventLog(state, readonly=True)
    try:
        decisions = [(d.round, d.lr_used, d.lr_step, d.lr_next, d.action) for d in ev.views.lr_decisions()]
    finally:
        ev.close()
    return plans, results, decisions


@pytest.mark.timeout(240)
def test_a_killed_coordinator_resumes_the_controller_exactly(tmp_path: Path, broker_url: str, tiny_model) -> None:  # type: ignore[no-untyped-def]
    plans, results, decisions = _run(tmp_path / "calm", broker_url, tiny_model, None)
    k_plans, k_results, k_decisions = _run(tmp_path / "killed", broker_url, tiny_model, 2)
    assert len({p.lr for p in plans}) >= 3 and any(d[2] != d[1] for d in decisions)  # it moved and damped
    assert [d[4] for d in decisions][6] == "undo"  # and undid round 5 (a kill at round 2 resumes into it)
    assert [(p.round, p.seeds, p.lr) for p in k_plans] == [(p.round, p.seeds, p.lr) for p in plans]
    assert [(r.round, r.seeds, r.scalars, r.lr, r.values_checksum) for r in k_results] == [
        (r.round, r.seeds, r.scalars, r.lr, r.values_checksum) for r in results]  # fmt: skip
    assert k_decisions == decisions and len(decisions) == len(SCRIPT)
