"""`meerkat bench attacks`: the attack strategies against a scripted coordinator, hostile devices of the
in-process fleet judged by the real RoundBook (a stand-in engine: every honest device computes the same g),
and the whole bench end to end on the micro model (1 seed, 2 rounds)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import cast

import pytest
import torch

from bench.attacks.strategies import FLIP, SCALE, Attack, make_attack
from bench.inproc import Device, InProcessFleet
from bench.learning.sim import FLEET, ZOSpec, zo_config
from coordinator.aggregate import RULES
from coordinator.config import Aggregation, CoordinatorConfig
from coordinator.rounds import RoundBook
from edge_client.engine.spsa import StepResult, to_f32
from edge_client.service.rounds import ClientRounds, Identity
from shared.apply import apply_round, values_checksum
from shared.messages import U32, ErrorCode, ErrorMsg, Join, Update
from shared.prng import Dist

FP, MASK, NNZ, N = "cd" * 32, "0123456789abcdef", 32, 100


def honest_g(seed: int) -> float:
    """The stand-in engine's g: a function of the step's seed only, so every honest device agrees."""
    return to_f32(1.0 + ((seed % 7) - 3) / 30.0)  # 0.9 .. 1.1


class SameG:
    """A Trainer whose step answers honest_g(seed): what the round book sees is then known exactly."""

    fingerprint, mask_id, nnz, n_samples = FP, MASK, NNZ, N
    peak_mem_bytes = None

    def initial_values(self) -> torch.Tensor:
        return torch.zeros(NNZ)

    def set_values(self, values: torch.Tensor) -> None:
        pass

    def step(self, seed: int, eps: float, lr: float, dist: Dist, batch_size: int,
             data_pointer: int) -> tuple[StepResult, int]:
        g = honest_g(seed)
        return StepResult(g, 2.0 + g, 2.0 - g, 0.0, seed), data_pointer + batch_size

    def capabilities(self) -> dict[str, str | int | float | bool]:
        return {"device": "cpu"}


def fleet(rule: str, attack: str, hostile: int, cap: float = 1e6, lr: float | str = 1e-2) -> tuple[InProcessFleet, Attack]:
    """Ten devices of n = N (equal shares), the first `hostile` sharing one `attack`; `cap`: a fixed |g| cap
    and no adaptive one (so what reaches the aggregate is known: the rule alone decides)."""
    spec = ZOSpec(rounds=3, T=3, lr=lr, eps=1e-2, batch_size=4, seed=5)
    cfg = replace(zo_config(spec, 10), aggregation=cast("Aggregation", rule), max_abs_grad=cap, grad_cap_k=0.0)
    book = RoundBook(cfg, fingerprint=FP, mask_id=MASK, values=torch.zeros(NNZ))
    strategy = make_attack(attack)
    devices = [Device(ClientRounds(Identity(f"d{i}", FLEET, FP, MASK, N), lambda: torch.zeros(NNZ)), SameG(),
                      tamper=strategy if i < hostile else None) for i in range(10)]  # fmt: skip
    return InProcessFleet(book, devices), strategy


# -- strategies against a scripted coordinator --------------------------------------------------------
def update(round: int = 0, grads: tuple[float, ...] = (1.0, -0.5, 0.25)) -> Update:
    return Update(round=round, msg_id=41, grads=grads, n_samples=N, fp_tag=7, loss=1.0)


class CapAt:
    """A coordinator that refuses (BAD_UPDATE) every Update over a fixed |g| cap and records what it got."""

    def __init__(self, cap: float) -> None:
        self.cap = cap
        self.got: list[Join | Update] = []

    def __call__(self, msg: Join | Update) -> ErrorMsg | None:
        self.got.append(msg)
        if isinstance(msg, Update) and max(map(abs, msg.grads)) > self.cap:
            return ErrorMsg(int(ErrorCode.BAD_UPDATE), f"grad_too_large: over {self.cap}")
        return None


def test_ratchet_bisects_an_unannounced_cap_with_fresh_msg_ids_and_climbs_when_it_passes() -> None:
    ratchet, wire = make_attack("ratchet"), CapAt(5.0)
    for r in range(4):
        ratchet.update("h", update(r), wire)
    ups = [u for u in wire.got if isinstance(u, Update)]
    assert len(ups) == len(wire.got)
    ids = [(u.round, u.msg_id) for u in ups]
    assert len(ids) == len(set(ids))  # every probe a fresh msg_id (a repeat would be a Duplicate)
    passed = [max(map(abs, u.grads)) for u in ups if max(map(abs, u.grads)) <= 5.0]
    assert len(passed) == 4 and passed == sorted(passed)  # one accepted per round, each closer to the cap
    assert 4.0 < passed[-1] <= 5.0 and ratchet.tally.refused["grad_too_large"] >= 3
    first = ups[0].grads
    assert all(math.copysign(1, a) == -math.copysign(1, b) for a, b in zip(first, update().grads, strict=True))


def test_colluders_share_one_vector_rejoin_inflates_n_before_its_first_update_absent_never_answers() -> None:
    flip, wire = make_attack("sign-flip"), CapAt(1e9)
    flip.update("a", update(0, (1.0, 2.0, 3.0)), wire)
    flip.update("b", update(0, (9.0, 9.0, 9.0)), wire)  # another colluder's honest g: the round's vector stays
    assert [u.grads for u in wire.got if isinstance(u, Update)] == [(-FLIP, -2 * FLIP, -3 * FLIP)] * 2
    rejoin, wire = make_attack("rejoin"), CapAt(1e9)
    join = Join(client="", fingerprint=FP, mask_id=MASK, n_samples=N, budget_gib=1.0, capabilities={"compact_plan": True})
    rejoin.join("a", join, wire)
    rejoin.update("a", update(3), wire)
    rejoin.update("a", update(4), wire)
    kinds = [(type(m).__name__, m.n_samples) for m in wire.got]
    assert kinds == [("Join", N), ("Join", U32), ("Update", U32), ("Update", U32)]
    assert wire.got[1].last_round == 2  # type: ignore[union-attr]
    absent, wire = make_attack("absent"), CapAt(1e9)
    absent.join("a", join, wire)
    absent.update("a", update(0), wire)
    assert wire.got == [join]  # joins (it is sampled), never answers: the lost-data baseline


# -- hostile devices judged by the real round book ----------------------------------------------------
@pytest.mark.parametrize("rule", [r for r in ("fedavg", "median", "centered") if r in RULES])
def test_a_scaling_device_reaches_the_books_aggregation(rule: str) -> None:
    f, strategy = fleet(rule, "scaling", 1)
    for res, _ in f.run(3):
        assert res.n_clients == 10
        for s, G in zip(res.seeds, res.scalars, strict=True):
            g = honest_g(s)
            # equal weights, nine identical honest g: FedAvg moves by the attacker's tenth, the robust
            # rules (median; centred clipping: MAD 0, band = the median) do not move at all
            want = (9 * g + to_f32(SCALE * g)) / 10 if rule == "fedavg" else g  # f32 on the wire
            assert G == pytest.approx(want, rel=1e-9)
    assert strategy.tally.sent == 1 + 3 and not strategy.tally.refused


def test_the_default_rule_weighs_an_always_clipped_device_zero_and_replicas_follow_exactly() -> None:
    """Default config (centered, center_discount): the scaling device's every scalar is outside its band, so it
    weighs 0 and each G_t is exactly the nine honest devices' FedAvg; a replica applying the results gets
    each result's checksum (the coordinator aggregates, the result carries what a replica needs)."""
    f, strategy = fleet(CoordinatorConfig().aggregation, "scaling", 1)
    values = torch.zeros(NNZ)
    for res, _ in f.run(3):
        assert res.n_clients == 10
        for s, G in zip(res.seeds, res.scalars, strict=True):
            assert G == math.fsum([N / (9 * N) * honest_g(s)] * 9)  # bit for bit: no term of the attacker
        values = apply_round(values, res.seeds, res.scalars, res.lr, res.dist)
        assert values_checksum(values) == res.values_checksum
    assert strategy.tally.sent == 1 + 3 and not strategy.tally.refused


def test_a_device_lying_about_its_loss_moves_not_one_lr_of_the_controller() -> None:
    """lr = "auto": the loss attack (x1000 / /1000 on alternate rounds; honest g) against nine honest devices
    whose losses agree: the controller's clipped fleet loss is the honest one and one device is no fleet
    spike, so every round's lr and result are bit for bit the honest fleet's."""
    honest, _ = fleet("centered", "scaling", 0, lr="auto")
    lying, strategy = fleet("centered", "loss", 1, lr="auto")
    a, b = honest.run(6), lying.run(6)
    assert [r.lr for r, _ in b] == [r.lr for r, _ in a] and len({r.lr for r, _ in a}) > 1  # the lr moved
    assert [(r.seeds, r.scalars, r.values_checksum) for r, _ in b] == [(r.seeds, r.scalars, r.values_checksum) for r, _ in a]
    assert strategy.tally.sent == 1 + 6 and not strategy.tally.refused


def test_bench_lr_takes_a_number_or_the_controller() -> None:
    from bench.attacks.cli import bench_lr

    assert bench_lr("0.05") == 0.05 and bench_lr("auto") == "auto" and bench_lr("auto@0.2") == "auto@0.2"
    for bad in ("fast", "2", "auto@3", "0"):
        with pytest.raises(ValueError):
            bench_lr(bad)


def test_the_ratchet_never_gets_more_than_the_books_cap_into_a_result() -> None:
    cap = 5.0
    f, strategy = fleet("fedavg", "ratchet", 1, cap=cap)
    results = f.run(3)
    assert strategy.tally.max_abs_sent > cap
    for res, _ in results:
        if res.n_clients < 10:
            continue  # the attacker was refused outright this round
        for s, G in zip(res.seeds, res.scalars, strict=True):
            hostile = 10 * G - 9 * honest_g(s)  # what the book aggregated for the attacker
            assert abs(hostile) <= cap * (1 + 1e-6)


# -- the bench, end to end ----------------------------------------------------------------------------
def test_bench_attacks_cli_on_the_micro_model(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "shared.cli", "bench", "attacks", "--size", "micro", "--seeds", "1", "--rounds", "2",
           "--steps", "2", "--attacks", "ratchet,rejoin", "--hostile", "1,3", "--n-train", "100", "--n-eval", "40",
           "--out", str(tmp_path / "out"), "--json"]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    rules = sorted({run["rule"] for run in res["runs"]})
    assert "fedavg" in rules and res["default_rule"] in rules
    assert len(res["runs"]) == len(rules) * (1 + 2 * 2)
    for run in res["runs"]:
        assert len(run["accuracy"]) == len(run["loss"]) == len(run["lr"]) == 2
        assert all(0.0 <= a <= 1.0 for a in run["accuracy"]) and all(math.isfinite(x) for x in run["loss"])
        if run["attack"] != "none":
            assert run["attacker"]["sent"] >= 2 * run["hostile"] >= 2  # every hostile device sent each round
    assert {(row["rule"], row["attack"], row["hostile"]) for row in res["rows"]} == {
        (rule, a, h) for rule in rules for a in ("ratchet", "rejoin") for h in (1, 3)}
    assert (tmp_path / "out" / "attacks.md").read_text().startswith("| rule | attack |")
    # cached runs are read back, not rerun: the same numbers
    again = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, timeout=600)
    assert json.loads(again.stdout.strip().splitlines()[-1])["runs"] == res["runs"]


def test_the_hostile_devices_are_the_typical_ones_not_the_largest() -> None:
    from bench.attacks.run import typical

    sizes = {f"c{i}": n for i, n in enumerate([400, 10, 30, 50, 60, 70, 80, 90, 100, 110])}
    assert typical(sizes, 1) == ["c5"]  # ranked 10, 30, 50, 60, [70], 80, ...: the 5th smallest
    assert typical(sizes, 3) == ["c4", "c5", "c6"]
    assert typical(sizes, 0) == [] and "c0" not in typical(sizes, 8)
    assert typical({"a": 5, "b": 5, "c": 5}, 1) == ["b"]  # ties ranked by id
    with pytest.raises(ValueError, match="hostile must be in 0..3"):
        typical({"a": 5, "b": 5, "c": 5}, 4)
