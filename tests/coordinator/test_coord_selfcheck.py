"""`meerkat coordinator --check` tests what used to fail only after start (issue 30): the model and mask
(built for another model: exit 2), the eval data (unreadable: exit 2, the file named), the metrics port
(held by another process: exit 9, the port and the fix named), then the broker; a good setup exits 0."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from coordfakes import uid, write_config_toml

from bench.demo.toy import Toy, build_toy
from shared.cli import main


@pytest.fixture(scope="module")
def toys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Toy, Toy]:
    root = tmp_path_factory.mktemp("toys")
    return build_toy(root / "a"), build_toy(root / "b", seed=29)


def _cfg(tmp: Path, broker_url: str, toy: Toy, **kw: object) -> Path:
    keys = dict(broker=broker_url, fleet=uid("f"), client_id=uid("coord"), state_dir=tmp / uid("s"),
                model_dir=toy.model_dir, mask=toy.mask_path, eval_data=toy.data_path, metrics=True, metrics_port=0)
    keys.update(kw)
    return write_config_toml(tmp / f"{uid('c')}.toml", **keys)  # fmt: skip


def test_coordinator_check_catches_port_eval_data_and_mask(
    toys: tuple[Toy, Toy], tmp_path: Path, broker_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    toy, other = toys
    assert main(["coordinator", "--config", str(_cfg(tmp_path, broker_url, toy)), "--check"]) == 0
    out = capsys.readouterr().out
    assert f"ok   model + mask: model {toy.fingerprint[:16]} mask {toy.mask.mask_id}" in out, out
    assert f"ok   eval_data {toy.data_path}: 24 examples" in out and "ok   metrics_port 0" in out, out
    assert "broker check passed" in out

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        assert main(["coordinator", "--config", str(_cfg(tmp_path, broker_url, toy, metrics_port=port)), "--check"]) == 9
    err = capsys.readouterr().err
    assert f"FAIL metrics_port {port}: metrics_port {port} on 127.0.0.1 is already in use" in err, err

    bad = tmp_path / "eval.jsonl"
    bad.write_text('{"text": "ok", "label": "a"}\nnot json\n')
    assert main(["coordinator", "--config", str(_cfg(tmp_path, broker_url, toy, eval_data=bad)), "--check"]) == 2
    err = capsys.readouterr().err
    assert f"FAIL eval_data {bad}:" in err and str(bad) in err.split("FAIL eval_data", 1)[1], err

    missing = tmp_path / "nope.jsonl"
    assert main(["coordinator", "--config", str(_cfg(tmp_path, broker_url, toy, eval_data=missing)), "--check"]) == 2
    assert f"{missing} does not exist" in capsys.readouterr().err

    # the mask of another model: refused before anything else is tried
    assert main(["coordinator", "--config", str(_cfg(tmp_path, broker_url, toy, mask=other.mask_path)), "--check"]) == 2
    err = capsys.readouterr().err
    assert f"built for model {other.fingerprint[:12]}" in err and f"fleet model is {toy.fingerprint[:12]}" in err, err
