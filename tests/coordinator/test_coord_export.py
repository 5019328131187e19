"""`meerkat export`: the merged directory loads with transformers and gives the side-car model's logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from coordfakes import FakeClient, ThreadedCoordinator, uid, write_config_toml

from coordinator.config import load_coordinator_config
from coordinator.export import ExportError, values_from_state
from coordinator.server import Coordinator
from shared.apply import values_checksum
from shared.cli import main
from shared.messages import RoundPlan, RoundResult
from shared.modelload import load_model


def test_export_matches_sidecar_logits(tmp_path: Path, broker_url: str, tiny_model) -> None:  # type: ignore[no-untyped-def]
    fleet = uid("f")
    cfg_path = write_config_toml(
        tmp_path / "coordinator.toml", broker=broker_url, fleet=fleet, client_id=uid("coord"),
        state_dir=tmp_path / "state", model_dir=tiny_model.model_dir, mask=tiny_model.mask_path, quant="nf4",
        steps=4, lr=0.02, min_clients=1, metrics=False, rounds=2, checkpoint_every=1,
    )  # fmt: skip
    config = load_coordinator_config(cfg_path)
    coord = Coordinator(config)
    runner = ThreadedCoordinator(coord).start()
    cl = FakeClient(broker_url, fleet, uid("dev"))
    try:
        cl.join(tiny_model.fingerprint, tiny_model.mask.mask_id, n_samples=4)
        for r in range(2):
            cl.wait_for(RoundPlan, lambda p, r=r: p.round == r)
            cl.update(r, [1.5, -2.0, 0.5, 1.0], 4, tiny_model.fingerprint, msg_id=r + 1)
            last = cl.wait_for(RoundResult, lambda m, r=r: m.round == r)
        assert runner.join(30) == 0
    finally:
        runner.stop()
        cl.close()

    values, round = values_from_state(
        config.state_dir, tiny_model.mask, tiny_model.model_dir, tiny_model.fingerprint
    )
    assert round == 1 and values_checksum(values) == last.values_checksum

    out = tmp_path / "export"
    assert main(["export", "--config", str(cfg_path), "--out", str(out)]) == 0
    assert main(["export", "--config", str(cfg_path), "--out", str(out)]) == 2  # refuses to overwrite
    info = json.loads((out / "meerkat_export.json").read_text())
    assert info["round"] == 1 and info["values_checksum"] == last.values_checksum

    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    ref = load_model(tiny_model.model_dir, "nf4", "cpu", tiny_model.mask, compute_dtype=torch.float32)
    assert ref.sidecar is not None
    ids = torch.arange(0, 48).reshape(2, 24) * 5 % 256
    with torch.no_grad():
        before = ref.model(input_ids=ids).logits
        ref.sidecar.set_values(values)
        want = ref.model(input_ids=ids).logits
        got = exported(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), (got - want).abs().max()
    assert (want - before).abs().max() > 1e-3  # the learned values changed the model: the check can fail
    # the exported weights at the mask are exactly the learned values
    w = exported.get_submodule("model.layers.0.mlp.down_proj").weight.detach().reshape(-1)
    a, b = tiny_model.mask.offsets()["model.layers.0.mlp.down_proj"]
    assert torch.equal(w[tiny_model.mask.layers["model.layers.0.mlp.down_proj"]], values[a:b])


def test_export_refuses_foreign_state(tmp_path: Path, tiny_model) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ExportError, match="no coordinator event log"):
        values_from_state(tmp_path, tiny_model.mask, tiny_model.model_dir, tiny_model.fingerprint)
