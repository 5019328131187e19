"""Issue 16: a device whose mask cannot match its fleet's exits with a clear message and exit status 6
(systemd: RestartPreventExitStatus) instead of looping on MASK_MISMATCH. The real `meerkat client`
process, the real coordinator (its fleet on another mask of the same model), a real Mosquitto."""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from clienttoy import (
    REPO,
    ClientProc,
    ThreadedCoordinator,
    Toy,
    build_toy,
    client_settings,
    coordinator_config,
    uid,
    write_toml,
)

from edge_client.service.cli import EXIT_MISMATCH
from shared.codec import decode, encode
from shared.maskfile import Mask, save_mask
from shared.messages import Join, RoundPlan
from shared.mqtt import MqttLink
from shared.topics import Topics


def _other_mask(toy: Toy, path: Path) -> Mask:
    """The same model and layers, other positions: the fleet's mask differs from the device's."""
    layers = {}
    for name, idx in toy.mask.layers.items():
        rows, cols = toy.mask.shapes[name]
        layers[name] = torch.unique((idx + 1) % (rows * cols))
    mask = Mask(layers=layers, shapes=dict(toy.mask.shapes), grad=None, meta=toy.mask.meta)
    save_mask(mask, path)
    return mask


def _check(conf: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shared.cli", "client", "--config", str(conf), "--check"],
                          cwd=REPO, capture_output=True, text=True, timeout=150)  # fmt: skip


@pytest.mark.timeout(600)
def test_client_on_a_fleet_with_another_mask_exits_6_with_the_fix(toy: Toy, broker_url: str, tmp_path: Path) -> None:
    """...then (issue 30) `--check` names the model, mask and fleet mismatches before any start, and the
    state directory that one wrong start created takes the right mask at the next start (was: exit 3)."""
    fleet = uid("f")
    fleet_mask = _other_mask(toy, tmp_path / "fleet-mask.safetensors")
    assert fleet_mask.mask_id != toy.mask.mask_id
    coord = ThreadedCoordinator(
        coordinator_config(toy, broker_url, fleet, tmp_path / "coord", mask=tmp_path / "fleet-mask.safetensors")
    )
    t = Topics(fleet)
    peer = MqttLink(broker_url, uid("peer"), subscriptions=[(t.plan, 1)])
    peer.start()
    try:  # a device of the fleet joins, so a round opens: the retained plan names the fleet's mask
        assert peer.connected.wait(10)
        join = encode(Join("", toy.fingerprint, fleet_mask.mask_id, 8, 1.0, {"compact_plan": True}, -1))
        end = time.monotonic() + 60
        while True:  # the coordinator's subscriptions may not be in place yet (a loaded machine): join again
            peer.publish(t.join(peer.client_id), join, 1)
            try:
                plan = decode(peer.inbox.get(timeout=2).payload, RoundPlan)
                break
            except queue.Empty:
                assert time.monotonic() < end, "no RoundPlan within 60 s of joining"
        assert plan.mask_id == fleet_mask.mask_id

        dev = uid("dev")
        settings = client_settings(toy, broker_url, fleet, dev, tmp_path / "c")
        conf = write_toml(tmp_path / "client.toml", settings)
        client = ClientProc(conf, tmp_path / "client.log")
        client.wait_log("joining fleet", 120)  # model loaded, connected, Join sent
        t0 = time.monotonic()
        code = client.proc.wait(30)
        took = time.monotonic() - t0
        text = client.text()
        assert code == EXIT_MISMATCH == 6, text[-3000:]
        assert took < 20, took
        last = text.strip().splitlines()[-1]  # the reason, printed to stderr as the last line
        assert last.startswith("meerkat client: cannot take part in fleet " + fleet), last
        for needle in ("MASK_MISMATCH", f"mask {fleet_mask.mask_id}", f"mask {toy.mask.mask_id}", "quant nf4", "Fix:"):
            assert needle in last, (needle, last)
        assert text.count("joining fleet") == 1  # no Join loop before the exit

        # --check compares with the coordinator's retained plan: the wrong mask ...
        r = _check(conf)
        assert r.returncode == EXIT_MISMATCH, r.stdout + r.stderr
        assert f"FAIL fleet {fleet}: the coordinator runs mask {fleet_mask.mask_id} (this device: {toy.mask.mask_id})" in r.stderr, r.stderr
        # ... another model (with its own mask) ...
        other = build_toy(tmp_path / "other", seed=29)
        r = _check(write_toml(tmp_path / "other.toml", {**settings, "model_dir": str(other.model_dir),
                                                         "mask": str(other.mask_path)}))  # fmt: skip
        assert r.returncode == EXIT_MISMATCH, r.stdout + r.stderr
        assert f"the coordinator runs model {toy.fingerprint[:16]} (this device: {other.fingerprint[:16]})" in r.stderr
        # ... a fleet name nobody runs (a typo) ...
        typo = uid("typo")
        r = _check(write_toml(tmp_path / "typo.toml", {**settings, "fleet": typo}))
        assert r.returncode == 0, r.stdout + r.stderr
        assert f"n/a  fleet {typo}: no coordinator answers on fleet {typo!r}" in r.stdout, r.stdout
        # ... and the right mask passes
        fixed = write_toml(tmp_path / "fixed.toml", {**settings, "mask": str(tmp_path / "fleet-mask.safetensors")})
        r = _check(fixed)
        assert r.returncode == 0, r.stdout + r.stderr
        assert f"ok   fleet {fleet}: the coordinator's plan" in r.stdout and f"mask {fleet_mask.mask_id}" in r.stdout

        # the state dir the refused start created (v_0 of the wrong mask, nothing trained) takes the right mask
        client = ClientProc(fixed, tmp_path / "client2.log")
        try:
            client.wait_log("joined fleet", 120)
        finally:
            assert client.terminate() == 0, client.text()[-3000:]
        assert "never trained (round -1, nothing queued): starting it over" in client.text()
        ident = json.loads((tmp_path / "c" / "identity.json").read_text())
        assert ident["mask_id"] == fleet_mask.mask_id
    finally:
        peer.stop()
        coord.stop()
