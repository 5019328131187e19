"""Issue 27: a real CPU-hog process started beside a training client pauses it within one local step, and
its exit resumes it (the real client, the real psutil reading of the hog's CPU)."""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from clienttoy import Toy, client_settings, retained_plan, uid

from edge_client.service.client import EdgeClient
from edge_client.service.config import load_client_config
from edge_client.service.policy import BUSY
from edge_client.service.sensors import SystemSensors, TreeCpu
from edge_client.service.trainer import EngineTrainer
from shared.codec import decode
from shared.messages import Update
from shared.topics import Topics

HOG = "import sys\nprint('ready', flush=True)\nwhile True:\n    pass\n"


def _wait(cond: object, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        if time.monotonic() > end:
            raise TimeoutError(what)
        time.sleep(0.005)


@pytest.mark.slow
def test_a_cpu_hog_pauses_the_client_within_one_step_and_its_exit_resumes_it(
    toy: Toy, broker_url: str, tmp_path: Path
) -> None:
    fleet, cid, T = uid("f"), uid("dev"), 60
    t = Topics(fleet)
    plan, probe = retained_plan(toy, broker_url, fleet, cid, T, 99)
    import torch

    # this machine is shared and its CPUs are busy already: the "other processes" are the ones this test
    # starts (TreeCpu: the descendants of this process), read with the same psutil counters
    policy = {"enabled": True, "max_other_cpu_pct": 20.0, "quiet_s": 1.0, "poll_s": 0.1, "nice": 0,
              "io_class": "none", "max_threads": torch.get_num_threads(), "min_free_mem_gib": 0.0,
              "max_temp_c": 1000.0, "ac_only": False}
    cfg = load_client_config(None, client_settings(toy, broker_url, fleet, cid, tmp_path / "s", policy=policy),
                             environ={})  # fmt: skip
    client = EdgeClient(cfg, EngineTrainer(cfg), sensors=SystemSensors(others=TreeCpu(os.getpid())))
    th = threading.Thread(target=client.run, daemon=True)
    th.start()
    hog: subprocess.Popen[str] | None = None
    try:
        _wait(lambda: client.counters["steps"] >= 3, 120, "the client never trained")
        hog = subprocess.Popen([sys.executable, "-c", HOG], stdout=subprocess.PIPE, text=True)
        assert hog.stdout is not None and hog.stdout.readline().strip() == "ready"
        at_start = client.counters["steps"]
        assert client.policy is not None
        _wait(lambda: client.policy is not None and client.policy.verdict.reason == BUSY, 30, "the hog never paused it")
        at_pause = client.counters["steps"]
        assert at_pause - at_start <= 1, (at_start, at_pause)  # at most the step in flight when the hog was ready
        time.sleep(3.0)  # the hog keeps running: no step
        assert client.counters["steps"] == at_pause < T and client.rounds.job is not None
        hog.kill()
        hog.wait(10)
        hog = None
        _wait(lambda: client.counters["steps"] > at_pause, 30, "the hog's exit did not resume training")
        end = time.monotonic() + 180
        while True:
            assert time.monotonic() < end, "no Update after resuming"
            try:
                msg = probe.inbox.get(timeout=0.2)
            except queue.Empty:
                continue
            if msg.payload:
                upd = decode(msg.payload, Update)
                break
        assert (upd.round, len(upd.grads)) == (0, T) and client.counters["policy_pauses"] == 1
    finally:
        if hog is not None:
            hog.kill()
            hog.wait(10)
        client.stop()
        th.join(30)
        probe.stop(final=[(t.plan, b"", 1, True), (t.status(cid), b"", 1, True)])
