"""A coordinator whose metrics_port is taken exits EXIT_PORT_IN_USE (9) with one line naming the port and
the fix (issue 30: it was exit 1 with the cause under `AttributeError: ... no attribute '_jobs'`), and the
systemd unit does not restart it in a loop."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from coordfakes import uid, write_config_toml

from coordinator.server_cli import EXIT_PORT_IN_USE

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(120)
def test_busy_metrics_port_exits_9_with_one_line(tmp_path: Path, broker_url: str, tiny_model) -> None:  # type: ignore[no-untyped-def]
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        cfg = write_config_toml(
            tmp_path / "coordinator.toml", broker=broker_url, fleet=uid("f"), client_id=uid("coord"),
            state_dir=tmp_path / "state", model_dir=tiny_model.model_dir, mask=tiny_model.mask_path,
            steps=2, lr=0.01, min_clients=1, metrics=True, metrics_port=port, dashboard=False,
        )  # fmt: skip
        proc = subprocess.run(
            [sys.executable, "-m", "shared.cli", "coordinator", "--config", str(cfg)],
            cwd=ROOT, capture_output=True, text=True, timeout=100, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
    assert proc.returncode == EXIT_PORT_IN_USE == 9, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert "Traceback" not in proc.stderr and "AttributeError" not in proc.stderr, proc.stderr
    assert lines[-1].startswith(f"meerkat coordinator: metrics_port {port} on 127.0.0.1 is already in use"), lines
    assert "set metrics_port to a free port" in lines[-1] and f"sport = :{port}" in lines[-1]
    assert "connecting to" not in proc.stderr  # the port is bound first: nothing was connected


def test_the_unit_does_not_restart_on_a_busy_port() -> None:
    unit = (ROOT / "deploy" / "meerkat-coordinator.service").read_text()
    prevent = [ln.split("=", 1)[1].split() for ln in unit.splitlines() if ln.startswith("RestartPreventExitStatus=")]
    assert prevent and str(EXIT_PORT_IN_USE) in prevent[0] and "2" in prevent[0]
