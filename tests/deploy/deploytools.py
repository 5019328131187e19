"""Helpers for the deploy tests: run deploy/install.sh, read a systemd unit, run its ExecStart like systemd would
(its Environment=, and the kernel's MemoryDenyWriteExecute equivalent when the unit asks for it)."""

from __future__ import annotations

import ctypes
import os
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO / "tests" / "client") not in sys.path:  # clienttoy: the tiny model + mask + data of the client tests
    sys.path.insert(0, str(REPO / "tests" / "client"))
INSTALL = REPO / "deploy" / "install.sh"
VENV = REPO / ".venv"
PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1  # linux/prctl.h (Linux >= 6.3): what MemoryDenyWriteExecute= enforces


def install(role: str, bundle: Path, root: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """install.sh in test mode: under `root`, the caller as service user, this checkout's venv instead of pip."""
    user = subprocess.run(["id", "-un"], capture_output=True, text=True, check=True).stdout.strip()
    cmd = ["sh", str(INSTALL), role, "--bundle", str(bundle), "--root", str(root), "--user", user, "--no-useradd",
           "--reuse-venv", str(VENV), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def unit_settings(unit: Path) -> dict[str, list[str]]:
    """Key -> values (in order) of a unit file; comments and section headers dropped."""
    out: dict[str, list[str]] = {}
    for line in unit.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        out.setdefault(key.strip(), []).append(value.strip())
    return out


def _mdwe() -> None:  # runs in the child between fork and exec
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_MDWE)")


def mdwe_supported() -> bool:
    try:
        return subprocess.run(["true"], preexec_fn=_mdwe, capture_output=True, check=False).returncode == 0
    except subprocess.SubprocessError:  # prctl failed in the child: an older kernel
        return False


def _env(s: dict[str, list[str]]) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for e in s.get("Environment", []):
        k, _, v = e.partition("=")
        env[k] = v
    return env


def _argv(s: dict[str, list[str]], extra: tuple[str, ...]) -> list[str]:
    return [*shlex.split(s["ExecStart"][-1]), *extra]


def exec_start(unit: Path, *extra: str, log: Path) -> subprocess.Popen[bytes]:
    """Start the unit's ExecStart (+ extra args) as systemd would: its Environment=, cwd /, W^X when it asks."""
    s = unit_settings(unit)
    mdwe = s.get("MemoryDenyWriteExecute", ["false"])[-1] in ("true", "yes", "1")
    return subprocess.Popen(_argv(s, extra), env=_env(s), stdout=log.open("ab"), stderr=subprocess.STDOUT,
                            preexec_fn=_mdwe if mdwe else None, cwd="/")


def run_exec_start(unit: Path, *extra: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    """The unit's ExecStart + extra (e.g. --check) to completion, output captured."""
    s = unit_settings(unit)
    return subprocess.run(_argv(s, extra), env=_env(s), capture_output=True, text=True, timeout=timeout, cwd="/",
                          check=False)
