"""deploy/install.sh and the systemd units: modes and owners, idempotence, systemd-analyze verify, exit codes."""

from __future__ import annotations

import grp
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from deploytools import INSTALL, REPO, VENV, install, unit_settings

from coordinator.server_cli import EXIT_PORT_IN_USE
from coordinator.storage import EXIT_LOG_DAMAGED, EXIT_LOG_LOST, EXIT_STORAGE_FULL
from edge_client.service.cli import EXIT_BROKER, EXIT_CONFIG, EXIT_MISMATCH, EXIT_SETUP

HARDENING = {
    "NoNewPrivileges": "true", "ProtectSystem": "strict", "ProtectHome": "true", "PrivateTmp": "true",
    "CapabilityBoundingSet": "", "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6", "LockPersonality": "true",
    "SystemCallFilter": "@system-service", "Restart": "on-failure", "User": "meerkat",
}  # fmt: skip


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fleet") / "out"
    fleet = out.parent / "fleet.toml"
    fleet.write_text('fleet = "inst"\nbroker_host = "127.0.0.1"\ndevices = ["dev-a"]\n')
    r = subprocess.run([sys.executable, "-m", "shared.cli", "-q", "provision", str(fleet), "--out", str(out)],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return out


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


@pytest.mark.parametrize("role", ["coordinator", "client"])
def test_units_are_hardened_and_do_not_restart_on_config_errors(role: str) -> None:
    s = unit_settings(REPO / "deploy" / f"meerkat-{role}.service")
    for key, want in HARDENING.items():
        assert s.get(key, [None])[-1] == want, (key, s.get(key))
    assert f"/var/lib/meerkat/{role}" in s["ReadWritePaths"][-1]
    assert int(s["RestartSec"][-1]) >= 5 and int(s["StartLimitBurst"][-1]) <= 10
    no_restart = {int(x) for x in s["RestartPreventExitStatus"][-1].split()}
    # the codes the service itself returns for "fix the config first" (edge_client/service/cli.py,
    # coordinator/server_cli.py: 9 = metrics_port taken; coordinator/storage.py: 7 = event log lost,
    # 8 = damaged; a full disk (5) may clear, so it restarts); 4 is --check only
    codes = ({EXIT_CONFIG, EXIT_SETUP, EXIT_MISMATCH} if role == "client"
             else {EXIT_CONFIG, EXIT_PORT_IN_USE, EXIT_LOG_LOST, EXIT_LOG_DAMAGED})
    assert no_restart == codes, no_restart
    assert EXIT_STORAGE_FULL not in no_restart
    assert EXIT_BROKER not in no_restart


@pytest.mark.parametrize("role,bundle", [("coordinator", "coordinator"), ("client", "devices/dev-a")])
def test_installed_units_pass_systemd_analyze_verify(bundles: Path, tmp_path: Path, role: str, bundle: str) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed (apt-get install systemd)")
    r = install(role, bundles / bundle, tmp_path)
    assert r.returncode == 0, r.stderr
    unit = tmp_path / "etc" / "systemd" / "system" / f"meerkat-{role}.service"
    assert str(tmp_path / "opt" / "meerkat" / ".venv" / "bin" / "meerkat") in unit_settings(unit)["ExecStart"][-1]
    v = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    # verify exits 0 on unknown keys too (a warning): any output is a finding
    assert v.returncode == 0 and not (v.stdout + v.stderr).strip(), v.stdout + v.stderr
    bad = tmp_path / "bad.service"
    bad.write_text(unit.read_text().replace("ProtectHome=", "ProtectHom="))
    v = subprocess.run([analyze, "verify", str(bad)], capture_output=True, text=True, timeout=60)
    assert "Unknown key" in v.stderr  # the check above can fail


def test_client_unit_is_a_good_guest_and_memory_max_follows_the_budget(bundles: Path, tmp_path: Path) -> None:
    """Issue 27: Nice, idle IO class, CPU/IO weights below the default 100, MemoryMax = budget + 2 GiB."""
    s = unit_settings(REPO / "deploy" / "meerkat-client.service")
    assert (s["Nice"][-1], s["IOSchedulingClass"][-1]) == ("10", "idle")
    assert int(s["CPUWeight"][-1]) < 100 and int(s["IOWeight"][-1]) < 100 and "CPUQuota" not in s
    r = install("client", bundles / "devices" / "dev-a", tmp_path)
    assert r.returncode == 0, r.stderr
    unit = tmp_path / "etc" / "systemd" / "system" / "meerkat-client.service"
    assert unit_settings(unit)["MemoryMax"] == [f"{(4 + 2) * 1024}M"]  # no budget in the bundle: the default 4 GiB
    toml = tmp_path / "etc" / "meerkat" / "client.toml"
    toml.write_text(toml.read_text() + "memory_budget_gib = 6.5   # a Jetson with 8 GB\n")
    assert install("client", bundles / "devices" / "dev-a", tmp_path).returncode == 0  # re-run keeps the edit
    assert unit_settings(unit)["MemoryMax"] == [f"{int(8.5 * 1024)}M"]
    coord = unit_settings(REPO / "deploy" / "meerkat-coordinator.service")
    assert "MemoryMax" not in coord and "Nice" not in coord  # the coordinator's host is not a guest's


def test_client_install_modes_and_rerun_keeps_edited_config(bundles: Path, tmp_path: Path) -> None:
    r = install("client", bundles / "devices" / "dev-a", tmp_path)
    assert r.returncode == 0, r.stderr
    etc, state = tmp_path / "etc" / "meerkat", tmp_path / "var" / "lib" / "meerkat" / "client"
    assert _mode(etc) == 0o750 and _mode(state) == 0o750
    assert {f.name: _mode(f) for f in etc.iterdir()} == dict.fromkeys(
        ["client.toml", "broker.password", "ca.crt", "client.crt", "client.key"], 0o640)
    toml = (etc / "client.toml").read_text()
    assert f'password_file = "{etc}/broker.password"' in toml and f'state_dir = "{state}"' in toml
    (etc / "client.toml").write_text(toml.replace('"/opt/models/base"', '"/srv/edited"'))
    r = install("client", bundles / "devices" / "dev-a", tmp_path)  # idempotent: the edit survives
    assert r.returncode == 0 and "keeping" in r.stdout, r.stdout + r.stderr
    assert '"/srv/edited"' in (etc / "client.toml").read_text()
    r = install("client", bundles / "devices" / "dev-a", tmp_path, "--force-config")
    assert r.returncode == 0 and '"/srv/edited"' not in (etc / "client.toml").read_text()


def test_broker_install_owner_and_modes(bundles: Path, tmp_path: Path) -> None:
    for _ in range(2):
        r = install("broker", bundles / "broker", tmp_path)
        assert r.returncode == 0, r.stderr
    d = tmp_path / "etc" / "mosquitto" / "meerkat"
    modes = {f.name: _mode(f) for f in d.iterdir()}
    assert modes == {"mosquitto.conf": 0o644, "acl": 0o644, "ca.crt": 0o644, "server.crt": 0o644, "crl.pem": 0o644,
                     "passwd": 0o640, "server.key": 0o640, "store": 0o700}, modes
    assert f"password_file {d}/passwd" in (d / "mosquitto.conf").read_text()
    if os.geteuid() == 0:
        gid = grp.getgrnam("mosquitto").gr_gid
        assert all(f.stat().st_gid == gid for f in d.iterdir()) and (d / "store").stat().st_uid != 0
    dropin = (tmp_path / "etc" / "systemd" / "system" / "mosquitto.service.d" / "meerkat.conf").read_text()
    assert f"ExecStart=/usr/sbin/mosquitto -c {d}/mosquitto.conf" in dropin


@pytest.mark.parametrize("args,needle", [
    ([], "which role"), (["client"], "--bundle"), (["client", "--bundle", "/nonexistent"], "no such directory"),
    (["broker", "--bundle", str(REPO)], "has no mosquitto.conf"), (["client", "--bogus"], "unknown argument"),
])  # fmt: skip
def test_install_refuses_bad_arguments(args: list[str], needle: str) -> None:
    r = subprocess.run(["sh", str(INSTALL), *args], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and needle in r.stderr, r.stderr


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("runuser") is None or not Path("/usr/bin/python3").exists(),
                    reason="needs root, runuser (util-linux) and /usr/bin/python3")
def test_install_refuses_a_python_the_service_user_cannot_run(bundles: Path) -> None:
    """A venv whose interpreter lies under a directory the service user cannot enter (pyenv under /root) is
    refused, naming the interpreter and the fix; the same install with a venv of /usr/bin/python3 goes through."""
    import tempfile

    top = Path(tempfile.mkdtemp(prefix="meerkat-inst-"))  # outside pytest's 0700 tmp root: `nobody` can enter
    try:
        os.chmod(top, 0o755)
        hidden = top / "root-home"
        hidden.mkdir(mode=0o700)
        os.chmod(hidden, 0o700)
        (hidden / "python3").symlink_to(Path(sys.executable).resolve())
        bad = top / "bad-venv"
        (bad / "bin").mkdir(parents=True)
        (bad / "bin" / "python").symlink_to(hidden / "python3")
        (bad / "bin" / "meerkat").symlink_to(VENV / "bin" / "meerkat")
        nobody = ["--user", "nobody", "--no-useradd"]
        cmd = ["sh", str(INSTALL), "client", "--bundle", str(bundles / "devices" / "dev-a"), *nobody]
        r = subprocess.run([*cmd, "--root", str(top / "a"), "--reuse-venv", str(bad)],
                           capture_output=True, text=True, timeout=60)  # fmt: skip
        assert r.returncode == 2, r.stdout + r.stderr
        assert f"the service user nobody cannot run {bad}/bin/python" in r.stderr, r.stderr
        assert f"the interpreter is {Path(sys.executable).resolve()}" in r.stderr and "PYTHON=/usr/bin/python3" in r.stderr
        assert not (top / "a" / "etc" / "systemd" / "system" / "meerkat-client.service").exists()  # stopped before
        good = top / "good-venv"  # a venv of the system Python, which every user can run
        subprocess.run(["/usr/bin/python3", "-m", "venv", "--without-pip", str(good)], check=True, timeout=60)
        (site,) = good.glob("lib/python3*/site-packages")
        (site / "meerkat-checkout.pth").write_text(f"{REPO}\n")
        (good / "bin" / "meerkat").symlink_to(VENV / "bin" / "meerkat")
        r = subprocess.run([*cmd, "--root", str(top / "b"), "--reuse-venv", str(good)],
                           capture_output=True, text=True, timeout=60)  # fmt: skip
        assert r.returncode == 0 and "user nobody can run" in r.stdout, r.stdout + r.stderr
    finally:
        shutil.rmtree(top, ignore_errors=True)
