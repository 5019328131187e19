"""Files the services read are readable by the service user (issue 30): `meerkat tiny-model --out` and
`meerkat export` write model dirs 0755 / files 0644 even under umask 077 (transformers writes
model.safetensors 0600), checked by reading them as another user (`nobody`, via setpriv); and a
coordinator that cannot read its model says which user it runs as and the command that fixes it."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from deploytools import REPO  # isort: skip
from clienttoy import build_toy  # isort: skip

from coordinator.export import export_merged
from shared.maskfile import load_mask
from shared.sidecar import initial_values_from_dir

SETPRIV = shutil.which("setpriv")
needs_other_user = pytest.mark.skipif(
    SETPRIV is None or os.geteuid() != 0, reason="reading as another user needs root and setpriv (util-linux)"
)


def as_nobody(*argv: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    assert SETPRIV is not None
    return subprocess.run([SETPRIV, "--reuid=nobody", "--regid=nogroup", "--clear-groups", *argv],
                          capture_output=True, text=True, timeout=timeout, cwd="/", env=env)  # fmt: skip


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A 0755 directory outside pytest's 0700 tmp root: another user can reach what is inside."""
    d = Path(tempfile.mkdtemp(prefix="meerkat-svc-"))
    os.chmod(d, 0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode) for p in (root, *root.rglob("*"))}


def assert_shared(root: Path) -> None:
    got = modes(root)
    want = {k: 0o755 if (root / k).is_dir() else 0o644 for k in got}
    assert "model.safetensors" in got and got == want, {k: oct(v) for k, v in got.items()}


def readable_by_nobody(path: Path) -> None:
    py = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else sys.executable  # stdlib only
    r = as_nobody(py, "-c", "import sys; open(sys.argv[1], 'rb').read(64)", str(path))
    assert r.returncode == 0, r.stderr


@pytest.mark.timeout(300)
def test_tiny_model_out_is_readable_by_the_service_user(shared_dir: Path, tmp_path: Path) -> None:
    out = shared_dir / "models" / "tiny"
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "xdg"), "PYTHONPATH": str(REPO)}
    r = subprocess.run(
        ["sh", "-c", 'umask 077 && exec "$0" -m shared.cli tiny-model --size micro --seed 5 --no-progress '
         '--threads 1 --out "$1"', sys.executable, str(out)],
        capture_output=True, text=True, timeout=280, env=env, cwd=REPO,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == str(out)
    assert_shared(out)
    (cached,) = (tmp_path / "xdg" / "meerkat-edge" / "tinylm").iterdir()
    assert_shared(cached)  # the cache entry too: without --out its dir is what the user is told to use
    if SETPRIV is not None and os.geteuid() == 0:
        os.chmod(out.parent, 0o755)  # made by copytree under umask 077: the operator's own directory
        readable_by_nobody(out / "model.safetensors")


@pytest.mark.timeout(300)
def test_export_is_readable_by_the_service_user(shared_dir: Path) -> None:
    toy = build_toy(shared_dir / "toy")
    mask = load_mask(toy.mask_path, expected_fingerprint=toy.fingerprint)
    values = initial_values_from_dir(toy.model_dir, mask.layers)
    old = os.umask(0o077)
    try:
        out = export_merged(toy.model_dir, mask, values, "nf4", shared_dir / "export")
    finally:
        os.umask(old)
    assert_shared(out)
    if SETPRIV is not None and os.geteuid() == 0:
        readable_by_nobody(out / "model.safetensors")


@needs_other_user
@pytest.mark.timeout(300)
def test_an_unreadable_model_names_the_user_and_the_fix(shared_dir: Path, tmp_path: Path) -> None:
    toy = build_toy(shared_dir / "toy")
    for p in (shared_dir / "toy", *(shared_dir / "toy").rglob("*")):
        os.chmod(p, 0o755 if p.is_dir() else 0o644)
    os.chmod(toy.model_dir / "model.safetensors", 0o600)  # what transformers leaves, owned by root
    state = shared_dir / "state"
    state.mkdir(mode=0o777)
    os.chmod(state, 0o777)
    cfg = shared_dir / "coordinator.toml"
    cfg.write_text(f'[coordinator]\nbroker = "mqtt://127.0.0.1:1"\nmask = "{toy.mask_path}"\n'
                   f'model_dir = "{toy.model_dir}"\nstate_dir = "{state}"\nmetrics = false\n')  # fmt: skip
    os.chmod(cfg, 0o644)
    env = {"PATH": os.environ["PATH"], "HOME": str(shared_dir), "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    probe = as_nobody(sys.executable, "-c", "import torch", env=env)
    if probe.returncode != 0:
        pytest.skip(f"user nobody cannot run this venv's Python ({sys.executable}): {probe.stderr.strip()[-200:]}")
    argv = (sys.executable, "-m", "shared.cli", "coordinator", "--config", str(cfg), "--check")
    r = as_nobody(*argv, env=env)
    assert r.returncode == 2, r.stderr[-2000:]
    err = r.stderr.strip().splitlines()[-1]
    assert "Permission denied" in err and "not readable by user nobody" in err, err
    assert f"`sudo chmod -R a+rX {toy.model_dir}`" in err, err
    # a model under a directory the user cannot enter: that directory is named
    hidden = tmp_path / "toy"  # pytest's tmp root is 0700
    shutil.copytree(shared_dir / "toy", hidden)
    cfg.write_text(cfg.read_text().replace(str(toy.model_dir), str(hidden / "model")))
    r = as_nobody(*argv, env=env)
    err = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 2 and "user nobody cannot enter" in err and "/opt/meerkat/models" in err, err
