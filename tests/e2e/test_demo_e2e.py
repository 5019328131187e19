"""The walking skeleton end to end: broker + coordinator + 2 client processes, 2 rounds, over real MQTT.

Runs `meerkat demo` machinery (separate `meerkat coordinator` / `meerkat client` processes that talk only
through Mosquitto) on the micro tiny model, then checks what the issue promises: the values rebuilt from the
broadcast scalars alone match the coordinator's checksum every round (build_report raises otherwise), and
both clients persisted bit-identical masked values.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.demo.demo import DemoConfig, run_demo

pytestmark = pytest.mark.slow


def test_two_clients_two_rounds_bit_identical(broker_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    cfg = DemoConfig(clients=2, rounds=2, steps=2, broker=broker_url, workdir=tmp_path / "demo",
                     report=tmp_path / "report.json", size="micro", batch_size=4, seq_len=64, timeout_s=300)
    report = run_demo(cfg)

    assert [r["round"] for r in report["rounds"]] == [0, 1]
    assert all(r["clients"] == 2 for r in report["rounds"])
    exact = report["exact"]
    assert set(exact["clients"]) == {"client_00", "client_01"}
    assert exact["all_identical"], exact
    assert all(ck == exact["final_checksum"] for ck in exact["clients"].values())
    # the values moved (the scalars were applied), and only scalars crossed the wire
    assert report["after"]["train_loss"] != report["before"]["train_loss"]
    assert report["bytes"]["messages_by_kind"]["up"] == 2 * 2
    assert 0 < report["bytes"]["uplink_updates"] < 4 * 100  # 4 updates of T=2: tens of bytes each
    assert report["exit_codes"] == {"coordinator": 0, "client_00": 0, "client_01": 0}
    on_disk = json.loads(cfg.report.read_text())
    assert on_disk["exact"]["final_checksum"] == exact["final_checksum"]
