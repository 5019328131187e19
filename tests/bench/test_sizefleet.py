"""`python -m bench.sizefleet`: a 2-device fleet on a local model dir, checksums equal, export reloads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.sizefleet import main
from bench.tinylm.pretrain import get_model_dir


@pytest.fixture(scope="module")
def micro(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The micro tiny LM (its BPE covers the demo's topic task), built once into a private cache."""
    return get_model_dir("micro", seed=3, cache=tmp_path_factory.mktemp("tinylm"), progress=False)


def test_two_devices_two_rounds_equal_checksums_and_export(micro: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["--model", str(micro), "--fraction", "0.02", "--workdir", str(tmp_path / "run"), "--json"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 0 and result["checksums_equal"] and result["last_round"] == 1
    devices = result["devices"]
    assert set(devices) == {"client_00", "client_01"}
    for dev in devices.values():
        assert dev["checksum"] == result["coordinator_checksum"] and dev["steps"] == 4  # 2 rounds x T = 2
        assert dev["plan_mib"]["weights"] > 0 and dev["micro_batch"] >= 1
    assert result["export_dtype"] == result["export_config_dtype"] and result["export_eval_loss"] > 0
    assert (micro.parent / f"{micro.name}.mask-0.02.safetensors").is_file()  # the random mask, beside the model


def test_a_model_without_tokenizer_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text("{}")
    with pytest.raises(SystemExit) as info:
        main(["--model", str(bare), "--workdir", str(tmp_path / "run")])
    assert info.value.code == 2 and "no tokenizer" in capsys.readouterr().err
