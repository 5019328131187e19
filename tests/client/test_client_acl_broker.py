"""A real coordinator and client train through the shipped broker config (ACL + passwords from files).

With deploy/mosquitto the broker takes the username as the MQTT client id, so both sides must log in as
their configured client_id and read their password from `password_file`; the round must still close
and leave both with the same bits.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from clienttoy import ThreadedClient, ThreadedCoordinator, Toy, client_settings, coordinator_config

from shared.apply import values_checksum

pytestmark = pytest.mark.slow


def test_round_through_acl_broker_with_password_files(toy: Toy, acl_broker, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    for user in ("coordinator", "client_00"):
        (tmp_path / f"{user}.pw").write_text(acl_broker.users[user] + "\n")
    fleet = "fleet-a"  # the shipped ACL names its fleets (deploy/mosquitto/meerkat.acl, tests/conftest.py)
    coord = ThreadedCoordinator(
        coordinator_config(toy, acl_broker.url, fleet, tmp_path / "coord", client_id="coordinator",
                           username="coordinator", password_file=tmp_path / "coordinator.pw"),
        stop_after_round=1,
    )
    client = ThreadedClient(client_settings(toy, acl_broker.url, fleet, "client_00", tmp_path / "c",
                                            username="client_00", password_file=str(tmp_path / "client_00.pw")))
    try:
        coord.wait(90)
        client.wait_round(1, 30)
    finally:
        client.stop()
    assert client.client.st.checksum == values_checksum(coord.coord.values)
