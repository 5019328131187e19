"""shared.logthrottle: a burst of one repeated line becomes the first line plus one counted line per interval;
nothing is lost (every held-back line is counted), keys are independent, and the client's catch-up uses it."""

from __future__ import annotations

import logging

import pytest

from shared.logthrottle import LogThrottle


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_324_catch_up_lines_at_12_per_s_become_4(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    quiet = LogThrottle(logging.getLogger("t.throttle"), every_s=10.0, clock=clock)
    caplog.set_level(logging.INFO, logger="t.throttle")
    shown = 0
    for i in range(324):
        shown += quiet.log("catchup", logging.INFO, "result %d arrived, we are at round %d: catching up", 77 + i, 76)
        clock.t += 1 / 12
    quiet.flush("catchup")
    lines = [r.getMessage() for r in caplog.records]
    assert shown == 3 and len(lines) == 4, lines  # 27 s of lines: at 0, 10, 20 s, and the flush at the end
    assert lines[0] == "result 77 arrived, we are at round 76: catching up"
    assert lines[1] == "result 197 arrived, we are at round 76: catching up (+119 like it in 10 s, 11.9/s)"
    held = [int(m.split("(+")[1].split(" ")[0]) for m in lines[1:]]
    assert len(lines) + sum(held) - 1 == 324  # the flushed line was one of the held ones: nothing lost
    assert lines[-1].startswith("result 400 arrived")  # the newest line of the burst
    quiet.flush("catchup")
    assert len(caplog.records) == 4  # nothing pending: nothing more


def test_keys_are_independent_and_a_quiet_key_logs_at_once(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    quiet = LogThrottle(logging.getLogger("t.keys"), every_s=5.0, clock=clock)
    caplog.set_level(logging.DEBUG, logger="t.keys")
    assert quiet.log("a", logging.INFO, "a %d", 1) and quiet.log("b", logging.WARNING, "b")
    assert not quiet.log("a", logging.INFO, "a %d", 2)
    clock.t += 5.0
    assert quiet.log("a", logging.INFO, "a %d", 3)
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.INFO, "a 1"), (logging.WARNING, "b"), (logging.INFO, "a 3 (+1 like it in 5 s, 0.2/s)")]
    with pytest.raises(ValueError, match="every_s"):
        LogThrottle(logging.getLogger("t"), every_s=0)


def test_the_client_rate_limits_its_catching_up_lines(caplog: pytest.LogCaptureFixture) -> None:
    import torch

    from edge_client.service.rounds import ClientRounds, Identity
    from shared.apply import values_checksum
    from shared.messages import RoundResult

    c = ClientRounds(Identity("dev1", "f1", "ab" * 32, "0123456789abcdef", n_samples=24), lambda: torch.zeros(8))
    c.connected(0.0)
    caplog.set_level(logging.INFO, logger="edge_client.service.rounds")
    for i, r in enumerate(range(5, 329)):  # 324 results far ahead of our round (-1), 12/s: each "catching up"
        res = RoundResult(r, (1,), (0.5,), 1e-2, "rademacher", 2, values_checksum(torch.ones(8)))
        assert c.on_result(res, now=100.0 + i / 12) == []
    lines = [r.getMessage() for r in caplog.records if "catching up" in r.getMessage()]
    assert lines == [
        "result 5 arrived, we are at round -1: catching up (6 rounds behind)",
        "result 125 arrived, we are at round -1: catching up (126 rounds behind) (+119 like it in 10 s, 11.9/s)",
        "result 245 arrived, we are at round -1: catching up (246 rounds behind) (+119 like it in 10 s, 11.9/s)",
    ], lines
    assert c.known_round == 328
