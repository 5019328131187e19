"""The broker persistence settings docs/RELIABILITY.md documents: deploy/ and `meerkat provision` agree."""

from __future__ import annotations

import re
from pathlib import Path

from bench.chaos import deploy_persistence
from coordinator.provision import Fleet, mosquitto_conf

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "mosquitto" / "meerkat.conf"
KEYS = ("persistence", "autosave_interval", "autosave_on_changes")


def _settings(text: str) -> dict[str, str]:
    return {m[1]: m[2] for m in re.finditer(r"(?m)^(\w+) (.*)$", text) if m[1] in KEYS}


def test_deploy_and_provision_persist_alike() -> None:
    shipped = _settings(DEPLOY.read_text())
    assert shipped == _settings(mosquitto_conf(Fleet(devices=("d1",))))
    assert shipped["persistence"] == "true" and int(shipped["autosave_interval"]) <= 60  # not the 1800 s default
    assert _settings(deploy_persistence()) == shipped  # the chaos run uses exactly these
