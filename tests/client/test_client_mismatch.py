"""Issue 16: a device whose mask cannot match its fleet's exits with a clear message and exit status 5
(systemd: RestartPreventExitStatus) instead of looping on MASK_MISMATCH. The real `meerkat client`
process, the real coordinator (its fleet on another mask of the same model), a real Mosquitto."""

from __future__ import annotations

import queue
import time
from pathlib import Path

import pytest
import torch
from clienttoy import (
    ClientProc,
    ThreadedCoordinator,
    Toy,
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


@pytest.mark.timeout(180)
def test_client_on_a_fleet_with_another_mask_exits_6_with_the_fix(toy: Toy, broker_url: str, tmp_path: Path) -> None:
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
        join = encode(Join("", toy.fingerprint, fleet_mask.mask_id, 8, 1.0, {}, -1))
        end = time.monotonic() + 60
        while True:  # the coordinator's subscriptions may not be in place yet (a loaded machine): join again
            peer.publish(t.join(peer.client_id), join, 1)
            try:
                plan = decode(peer.inbox.get(timeout=2).payload, RoundPlan)
                break
            except queue.Empty:
                assert time.monotonic() < end, "no RoundPlan within 60 s of joining"
        assert plan.mask_id == fleet_mask.mask_id

        conf = write_toml(tmp_path / "client.toml", client_settings(toy, broker_url, fleet, uid("dev"), tmp_path / "c"))
        client = ClientProc(conf, tmp_path / "client.log")
        client.wait_log("joining fleet", 120)  # model loaded, connected, Join sent
        t0 = time.monotonic()
        code = client.proc.wait(30)
        took = time.monotonic() - t0
    finally:
        peer.stop()
        coord.stop()
    text = client.text()
    assert code == EXIT_MISMATCH == 6, text[-3000:]
    assert took < 20, took
    last = text.strip().splitlines()[-1]  # the reason, printed to stderr as the last line
    assert last.startswith("meerkat client: cannot take part in fleet " + fleet), last
    for needle in ("MASK_MISMATCH", f"mask {fleet_mask.mask_id}", f"mask {toy.mask.mask_id}", "quant nf4", "Fix:"):
        assert needle in last, (needle, last)
    assert text.count("joining fleet") == 1  # no Join loop before the exit
