"""A device that missed rounds catches up bit-identically: scalar Replay, or checkpoint chunks when far behind.
Checkpoints are written every K rounds, pruned, and a restart rebuilds the same values (even from a
corrupt newest checkpoint)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from coordfakes import FakeClient, ThreadedCoordinator, make_config, synthetic_mask, synthetic_v0, uid

from coordinator.server import Coordinator
from shared.apply import apply_round, values_checksum
from shared.messages import CheckpointChunk, ErrorCode, ErrorMsg, Replay, RoundPlan, RoundResult


def test_missed_rounds_replay_and_checkpoint(tmp_path: Path, broker_url: str) -> None:
    mask = synthetic_mask((300, 200))
    v0 = synthetic_v0(mask.nnz)
    cfg = make_config(
        tmp_path, broker_url, min_clients=1, steps=4, lr=0.05, replay_max=5, chunk_bytes=1024,
        checkpoint_every=2, keep_checkpoints=2,
    )  # fmt: skip
    coord = Coordinator(cfg, mask=mask, initial_values=v0)
    runner = ThreadedCoordinator(coord).start()
    fp = mask.meta.fingerprint
    active = FakeClient(broker_url, cfg.fleet, uid("act"))
    sleeper = FakeClient(broker_url, cfg.fleet, uid("sleep"))
    results: list[RoundResult] = []
    try:
        active.join(fp, mask.mask_id, n_samples=3)
        for r in range(6):
            active.wait_for(RoundPlan, lambda p, r=r: p.round == r)
            active.update(r, [0.5 - r, 0.25 * r, -1.0, 2.0], 3, fp, msg_id=r)
            results.append(active.wait_for(RoundResult, lambda m, r=r: m.round == r))
        # the sleeper saw round 0 only, then was away for rounds 1..5
        mine = apply_round(v0, results[0].seeds, results[0].scalars, results[0].lr, "rademacher")

        sleeper.sync(0)  # not joined: no values for ids that never joined (PROTOCOL.md §2 Acceptance)
        assert sleeper.wait_for(ErrorMsg).code == ErrorCode.UNKNOWN_CLIENT
        sleeper.join(fp, mask.mask_id, n_samples=3, last_round=0)
        sleeper.sync(0)  # 5 behind = replay_max: scalar replay of rounds 1..5
        rep = sleeper.wait_for(Replay)
        assert [r.round for r in rep.results] == [1, 2, 3, 4, 5]
        for res in rep.results:
            assert res == results[res.round]
            mine = apply_round(mine, res.seeds, res.scalars, res.lr, "rademacher")
            assert values_checksum(mine) == res.values_checksum

        sleeper.sync(-1)  # 6 behind > replay_max: the values come as checkpoint chunks
        chunks = [sleeper.wait_for(CheckpointChunk)]
        chunks += [sleeper.wait_for(CheckpointChunk) for _ in range(chunks[0].total - 1)]
        assert chunks[0].total == 2 and chunks[0].round == 5
        data = b"".join(c.data for c in sorted(chunks, key=lambda c: c.index))
        assert hashlib.sha256(data).hexdigest() == chunks[0].sha256 == results[-1].values_checksum
        from_ckpt = torch.from_numpy(np.frombuffer(data, dtype="<f4").copy())

        sleeper.sync(2)
        assert [r.round for r in sleeper.wait_for(Replay).results] == [3, 4, 5]
        sleeper.sync(5)
        assert sleeper.wait_for(Replay).results == ()  # up to date
    finally:
        runner.stop()
        active.close()
        sleeper.close()
    assert torch.equal(mine, coord.values) and torch.equal(from_ckpt, coord.values)
    assert not torch.equal(mine, v0)

    ckpts = sorted(p.name for p in (cfg.state_dir / "checkpoints").iterdir())
    assert ckpts == ["values-r00000003.safetensors", "values-r00000005.safetensors"]
    again = Coordinator(cfg, mask=mask, initial_values=v0)
    assert again.last_round == 5 and torch.equal(again.values, coord.values)
    again.log.close()
    # a corrupt newest checkpoint: fall back to the older one and replay the log
    newest = cfg.state_dir / "checkpoints" / ckpts[-1]
    raw = bytearray(newest.read_bytes())
    raw[-4:] = b"\x00\x00\xc0\x7f"
    newest.write_bytes(bytes(raw))
    third = Coordinator(cfg, mask=mask, initial_values=v0)
    assert third.last_round == 5 and torch.equal(third.values, coord.values)
    third.log.close()
