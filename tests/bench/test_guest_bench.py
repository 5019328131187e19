"""`meerkat bench guest`: one small run end to end (both fleets complete their rounds; the result names
every number BENCHMARKS.md records), and the foreground job's runner."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bench.guest.guest import GuestConfig, JobRunner, run_guest


def test_job_runner_times_the_same_work_each_call() -> None:
    r = JobRunner(200_000)
    try:
        times = [r.run() for _ in range(3)]
    finally:
        r.close()
    assert all(0 < t < 30 for t in times)
    assert r.proc.returncode == 0


@pytest.mark.slow
def test_guest_bench_small_run(tmp_path: Path) -> None:
    cfg = GuestConfig(hidden=64, layers=2, intermediate=128, filler=8, rounds=2, steps=3, jobs=2,
                      job_iters=3_000_000, quiet_s=0.5, max_other_cpu_pct=5.0, scope="tree", workdir=tmp_path / "g",
                      timeout_s=300.0)  # fmt: skip
    res = run_guest(cfg)
    assert res["bench"] == "guest" and res["cores"] == os.cpu_count() and len(res["alone_s"]) == 2 * cfg.jobs
    for k in ("off", "default"):
        r = res[k]
        assert r["rounds_done"] == cfg.rounds and len(r["job_s"]) == cfg.jobs and r["slowdown"] > -1
    assert res["off"]["policy"] == {"enabled": False} and res["off"]["policy_pauses"] == 0
    assert res["default"]["policy_pauses"] >= 1  # a job of several steps' length pauses the default client
