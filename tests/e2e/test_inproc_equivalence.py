"""The in-process fleet is the product, not a sibling of it: for one seed and config, a real fleet
(`meerkat coordinator` + 3 `meerkat client` processes over Mosquitto) and `bench.inproc` built from the
same config files publish byte-identical RoundResults and end at the same values checksum."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from bench.demo.demo import DemoConfig, run_demo
from bench.inproc import from_configs
from shared.apply import values_checksum

pytestmark = pytest.mark.slow


def test_inproc_fleet_publishes_the_real_fleets_results(broker_url: str, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    cfg = DemoConfig(clients=3, rounds=3, steps=3, broker=broker_url, workdir=tmp_path / "demo",
                     report=tmp_path / "report.json", size="micro", batch_size=4, seq_len=64, timeout_s=300)
    report = run_demo(cfg)
    real = {r["round"]: r["result_sha256"] for r in report["rounds"]}
    assert sorted(real) == [0, 1, 2] and all(real.values())
    assert report["exact"]["all_identical"]

    config = cfg.workdir / "config"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what each demo client ran with (2 cores / 3 clients)
    try:
        fleet = from_configs(config / "coordinator.toml", sorted(config.glob("client_*.toml")))
        results = fleet.run(cfg.rounds)
    finally:
        torch.set_num_threads(threads)
    mine = {res.round: hashlib.sha256(payload).hexdigest() for res, payload in results}
    assert mine == real  # every RoundResult byte for byte: seeds, scalars, n_clients, checksum
    assert values_checksum(fleet.book.values) == report["exact"]["final_checksum"]
    assert {d.committed for d in fleet.devices.values()} == {cfg.rounds - 1}  # every device applied them all
    assert fleet.traffic.messages["Update"] == cfg.clients * cfg.rounds
