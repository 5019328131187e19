"""docs/DEPLOY.md followed step by step on this machine: provision a 2-device fleet, install the broker files
with deploy/install.sh and run Mosquitto from the installed drop-in's ExecStart (it drops to the mosquitto
user and must read the files install.sh wrote), install the coordinator and two devices (each its own
--root, the "machines"), fill in model/mask/data, `--check` each, run the installed units' ExecStart lines
as real subprocesses for 2 rounds over TLS, `meerkat status --json`, `meerkat export`.

systemd is not PID 1 here: the units' ExecStart + Environment= run as the test's user; the coordinator's
MemoryDenyWriteExecute=true is applied with prctl(PR_SET_MDWE). install.sh runs with --reuse-venv (no pip).
"""

from __future__ import annotations

import json
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from deploytools import REPO, exec_start, install, mdwe_supported, run_exec_start, unit_settings  # isort: skip
from clienttoy import Toy, build_toy  # isort: skip

from bench.demo.broker import free_port, port_open

pytestmark = pytest.mark.slow
DEVICES = ("dev-a", "dev-b")


@pytest.fixture
def world() -> Iterator[Path]:
    """A temp dir the mosquitto user can traverse (pytest's tmp is 0700 root)."""
    d = Path(tempfile.mkdtemp(prefix="meerkat-walk-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _set(toml: Path, **kv: object) -> None:
    """What an operator does in an editor: replace `key = ...` lines, append the others."""
    lines = toml.read_text().splitlines()
    for k, v in kv.items():
        new = f"{k} = {json.dumps(v) if isinstance(v, str) else v}"
        hit = [i for i, line in enumerate(lines) if line.split("=")[0].strip() == k]
        if hit:
            lines[hit[0]] = new
        else:
            lines.append(new)
    toml.write_text("\n".join(lines) + "\n")


def _meerkat(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shared.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=240)


def _stop(p: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 60) -> int:
    if p.poll() is None:
        p.send_signal(sig)
    return p.wait(timeout)


def test_walkthrough(world: Path, tmp_path: Path) -> None:
    if not shutil.which("mosquitto"):
        pytest.skip("mosquitto not installed")
    toy: Toy = build_toy(world / "toy")
    port = free_port()

    # 1. provision
    (world / "fleet.toml").write_text(f'fleet = "walk"\nbroker_host = "127.0.0.1"\nbroker_port = {port}\n'
                                      f'listen_host = "127.0.0.1"\ndevices = ["dev-a", "dev-b"]\n')
    r = _meerkat("provision", str(world / "fleet.toml"), "--out", str(world / "fleet-walk"))
    assert r.returncode == 0, r.stderr
    out = world / "fleet-walk"

    # 2-3. broker files, then Mosquitto as its systemd drop-in runs it
    r = install("broker", out / "broker", world / "broker-host")
    assert r.returncode == 0, r.stderr
    dropin = world / "broker-host" / "etc" / "systemd" / "system" / "mosquitto.service.d" / "meerkat.conf"
    broker_log = world / "mosquitto.log"
    broker = subprocess.Popen(shlex.split(unit_settings(dropin)["ExecStart"][-1]), stdout=broker_log.open("ab"),
                              stderr=subprocess.STDOUT)
    procs: list[subprocess.Popen[bytes]] = [broker]
    try:
        deadline = time.monotonic() + 15
        while not port_open("127.0.0.1", port):
            assert broker.poll() is None, broker_log.read_text()
            assert time.monotonic() < deadline, broker_log.read_text()
            time.sleep(0.05)

        # 4. coordinator: install, fill in model/mask (+ this test's small settings), --check, unit
        coord_root = world / "coordinator-host"
        r = install("coordinator", out / "coordinator", coord_root)
        assert r.returncode == 0, r.stderr
        ctoml = coord_root / "etc" / "meerkat" / "coordinator.toml"
        _set(ctoml, model_dir=str(toy.model_dir), mask=str(toy.mask_path), rounds=2, min_clients=2, min_updates=2,
             steps=3, lr=1e-3, eps=1e-2, batch_size=4, metrics_port=free_port(), round_deadline_s=120.0)
        cunit = coord_root / "etc" / "systemd" / "system" / "meerkat-coordinator.service"
        r = run_exec_start(cunit, "--check")
        assert r.returncode == 0, r.stdout + r.stderr

        # 5. devices
        dunits = []
        for dev in DEVICES:
            root = world / f"{dev}-host"
            r = install("client", out / "devices" / dev, root)
            assert r.returncode == 0, r.stderr
            _set(root / "etc" / "meerkat" / "client.toml", model_dir=str(toy.model_dir), mask=str(toy.mask_path),
                 data=str(toy.data_path), device="cpu", seq_len=32, batch_size=4, memory_budget_gib=2.0, heartbeat_s=2.0)
            dunit = root / "etc" / "systemd" / "system" / "meerkat-client.service"
            r = run_exec_start(dunit, "--check")
            assert r.returncode == 0 and "ok: model" in r.stdout, r.stdout + r.stderr
            dunits.append(dunit)

        # systemctl start: coordinator (under W^X when the unit says so) and both devices
        if unit_settings(cunit).get("MemoryDenyWriteExecute") == ["true"] and not mdwe_supported():
            pytest.skip("kernel has no PR_SET_MDWE (< 6.3): cannot run the coordinator as its unit asks")
        coord = exec_start(cunit, log=world / "coordinator.log")
        procs.append(coord)
        # both devices, the coordinator and the broker share this machine: the device policy would see each
        # other's steps as the owner's load and pause (docs/CLIENT.md "Device policy")
        clients = [exec_start(u, "--set", "policy.enabled=false", log=world / f"{u.parents[3].name}.log")
                   for u in dunits]
        procs += clients
        # rounds = 2: the coordinator exits 0 after the second round closes
        assert coord.wait(300) == 0, (world / "coordinator.log").read_text()[-4000:]
        for c, dev in zip(clients, DEVICES, strict=True):
            assert _stop(c) == 0, (world / f"{dev}-host.log").read_text()[-4000:]  # systemctl stop: clean exit

        # 6. watch
        r = _meerkat("status", "--config", str(ctoml), "--json")
        assert r.returncode == 0, r.stderr
        st = json.loads(r.stdout)
        assert st["fleet"] == "walk" and st["last_round_clients"] == 2 and st["open_round"] is None, st
        assert {c["client"]: c["updates"] >= 2 for c in st["clients"]} == dict.fromkeys(DEVICES, True), st["clients"]

        # 7. export
        r = _meerkat("export", "--config", str(ctoml), "--out", str(world / "export"))
        assert r.returncode == 0, r.stderr
        info = json.loads((world / "export" / "meerkat_export.json").read_text())
        assert info["round"] == st["last_round"] and info["base_fingerprint"] == toy.fingerprint
        from transformers import AutoModelForCausalLM, AutoTokenizer

        AutoModelForCausalLM.from_pretrained(str(world / "export"))
        tok = AutoTokenizer.from_pretrained(str(world / "export"))
        assert tok("the good movie")["input_ids"] == AutoTokenizer.from_pretrained(str(toy.model_dir))("the good movie")["input_ids"]
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.kill()
                p.wait(10)
