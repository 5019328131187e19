"""bench/fleet/log_cost.py: the event log's write cost per update, on a real SQLite file."""

from __future__ import annotations

from bench.fleet.log_cost import main, measure


def test_log_cost_measures_a_small_fleet() -> None:
    r = measure(clients=300, batch=50, rounds=2, pragmas=["cache_size=-2000"])
    assert r["clients"] == 300 and r["pragmas"] == ["cache_size=-2000"]
    assert r["write_us_per_update"] > 0 and r["commit_us_per_update"] > 0
    assert r["total_us_per_update"] >= r["write_us_per_update"] and r["last_close_ms"] > 0


def test_log_cost_cli_prints_one_json_line(capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["--clients", "100", "--batch", "40", "--rounds", "1"]) == 0
    assert '"total_us_per_update"' in capsys.readouterr().out
