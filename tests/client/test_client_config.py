"""`meerkat client` configuration: defaults, env overrides, every bad value named, exit 2, nothing started."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from clienttoy import REPO, Toy, client_settings, write_toml

from edge_client.service.config import ClientConfig, ConfigError, load_client_config


def _ok(toy: Toy, tmp_path: Path, **kw: object) -> dict[str, object]:
    settings = client_settings(toy, "mqtt://127.0.0.1:1883", "fleet1", "dev-1", tmp_path / "state")
    settings.update(kw)
    return settings


def test_valid_file_env_and_set_priority(toy: Toy, tmp_path: Path) -> None:
    path = write_toml(tmp_path / "client.toml", _ok(toy, tmp_path, heartbeat_s=5.0))
    cfg = load_client_config(path, environ={})
    assert isinstance(cfg, ClientConfig)
    assert (cfg.client_id, cfg.quant, cfg.heartbeat_s, cfg.state_dir) == ("dev-1", "nf4", 5.0, tmp_path / "state")
    env = {"MEERKAT_CLIENT_HEARTBEAT_S": "7.5", "MEERKAT_CLIENT_QUANT": "int8"}
    cfg = load_client_config(path, environ=env)
    assert (cfg.heartbeat_s, cfg.quant) == (7.5, "int8")
    cfg = load_client_config(path, {"quant": "none"}, environ=env)  # --set beats the environment
    assert cfg.quant == "none"
    # a [client] table works too
    (tmp_path / "sect.toml").write_text("[client]\n" + path.read_text())
    assert load_client_config(tmp_path / "sect.toml", environ={}).client_id == "dev-1"


def test_each_bad_value_is_named(toy: Toy, tmp_path: Path) -> None:
    bad = _ok(toy, tmp_path, client_id="a/b", heartbeat_s=-1.0, batch_size=0, fleet="", max_queued=0)
    with pytest.raises(ConfigError) as err:
        load_client_config(write_toml(tmp_path / "c.toml", bad), environ={})
    text = str(err.value)
    for key in ("client_id: 'a/b'", "heartbeat_s: -1.0", "batch_size: 0", "fleet: ''", "max_queued: 0"):
        assert key in text, text
    assert len(err.value.problems) == 5


def test_type_errors_unknown_keys_and_files(toy: Toy, tmp_path: Path) -> None:
    bad = _ok(toy, tmp_path, quant="fp8", device="tpu", seq_len="long", colour="red")
    with pytest.raises(ConfigError) as err:
        load_client_config(write_toml(tmp_path / "c.toml", bad), environ={})
    text = str(err.value)
    assert "quant: 'fp8' is not one of" in text and "device: 'tpu'" in text and "seq_len: expected an integer" in text
    assert "unknown key 'colour'" in text
    missing = _ok(toy, tmp_path, mask=str(tmp_path / "nope.safetensors"), model_dir=str(tmp_path),
                  tls_cert=str(toy.mask_path), username=None)
    missing.pop("username")
    with pytest.raises(ConfigError) as err:
        load_client_config(write_toml(tmp_path / "m.toml", missing), environ={})
    text = str(err.value)
    assert f"mask: file {tmp_path / 'nope.safetensors'} does not exist" in text
    assert f"model_dir: {tmp_path} has no config.json" in text
    assert "tls_cert/tls_key: give both or neither" in text


def test_password_never_in_url_or_errors(toy: Toy, tmp_path: Path) -> None:
    secret = "hunter2-secret"
    with pytest.raises(ConfigError) as err:
        load_client_config(None, _ok(toy, tmp_path, broker=f"mqtt://bob:{secret}@127.0.0.1:1883"), environ={})
    assert "password_file" in str(err.value) and secret not in str(err.value)
    pw = tmp_path / "pw"
    pw.write_text(secret + "\n")
    cfg = load_client_config(None, _ok(toy, tmp_path, username="bob", password_file=str(pw)), environ={})
    assert cfg.read_password() == secret and secret not in repr(cfg)


def test_cli_bad_config_exits_2_and_starts_nothing(toy: Toy, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "state"
    path = write_toml(tmp_path / "client.toml", _ok(toy, tmp_path, quant="fp8", heartbeat_s=0.0))
    proc = subprocess.run(
        [sys.executable, "-m", "shared.cli", "client", "--config", str(path)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "quant: 'fp8' is not one of" in proc.stderr
    assert not state.exists()  # nothing started: no state directory, no broker connection

    from shared.cli import main

    good = write_toml(tmp_path / "good.toml", _ok(toy, tmp_path))
    assert main(["client", "--config", str(good), "--set", "heartbeat_s=-3"]) == 2
    assert "heartbeat_s: -3.0 must be > 0" in capsys.readouterr().err
    assert main(["client", "--config", str(good), "--set", "oops"]) == 2
    assert "--set 'oops': expected KEY=VALUE" in capsys.readouterr().err
    assert not state.exists()


def test_cli_setup_error_exits_3(toy: Toy, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A budget too small for one sequence: the planner refuses with its numbers, exit 3, no state dir."""
    from shared.cli import main

    path = write_toml(tmp_path / "client.toml", _ok(toy, tmp_path, memory_budget_gib=1e-6))
    assert main(["client", "--config", str(path)]) == 3
    err = capsys.readouterr().err
    assert "MemoryBudgetError" in err and "too small for one sequence" in err
    assert not (tmp_path / "state").exists()
