"""Mosquitto ACL for a meerkat-edge deployment: per fleet, per device, no fleet wildcard for devices.

Mosquitto's ACL patterns know the client id (%c) and the username (%u) but not a device's fleet, so a
pattern like `meerkat/v1/+/up/%c` lets a device write into ANY fleet and read every fleet's plans and
results. This renders one `user` block per device naming its own fleet instead:

    python -m coordinator.broker_acl --fleet farm-a dev-01 dev-02 --fleet farm-b dev-03 > meerkat.acl

(devices log in with username == client id; deploy/mosquitto/meerkat.conf sets use_username_as_clientid).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence

from shared.topics import PREFIX, check_id

DEVICE_WRITES = ("up", "join", "hb", "status", "sync")
TELEMETRY_SUFFIX = "-hb"  # the coordinator's heartbeat link logs in as its user + this (coordinator/server.py)


def render_acl(
    fleets: Mapping[str, Sequence[str]],
    coordinator: str = "coordinator",
    observers: Sequence[str] = ("observer",),
) -> str:
    """ACL text: `coordinator` reads/writes everything, `observers` read everything, each device only
    writes its own topics of its own fleet and reads that fleet's plan/results and its own inbox."""
    lines = [
        "# Mosquitto ACL for meerkat-edge, rendered by `python -m coordinator.broker_acl` (docs/SECURITY.md).",
        "# A device may write only meerkat/v1/<its fleet>/{up,join,hb,status,sync}/<its id> and read only its",
        "# fleet's plan and results and its own inbox. Devices log in with username == client id.",
        "",
        f"user {check_id(coordinator, 'coordinator user')}",
        f"topic readwrite {PREFIX}/#",
        "",
        "# the coordinator's heartbeat link (telemetry_link): reads only",
        f"user {coordinator}{TELEMETRY_SUFFIX}",
        f"topic read {PREFIX}/#",
    ]
    for obs in observers:
        lines += ["", f"user {check_id(obs, 'observer user')}", f"topic read {PREFIX}/#"]
    seen: dict[str, str] = {}
    for fleet, devices in fleets.items():
        base = f"{PREFIX}/{check_id(fleet, 'fleet id')}"
        for dev in devices:
            check_id(dev, "device id")
            if dev in seen or dev in (coordinator, *observers):
                raise ValueError(
                    f"device {dev!r} listed twice (fleet {seen.get(dev, fleet)!r} and {fleet!r})"
                )
            seen[dev] = fleet
            lines += ["", f"user {dev}"]
            lines += [f"topic write {base}/{kind}/{dev}" for kind in DEVICE_WRITES]
            lines += [f"topic read {base}/plan", f"topic read {base}/result/#", f"topic read {base}/to/{dev}"]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m coordinator.broker_acl", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--fleet", nargs="+", action="append", required=True, metavar=("FLEET", "DEVICE"),
        help="a fleet id followed by the client ids of its devices (repeat per fleet)",
    )  # fmt: skip
    p.add_argument(
        "--coordinator", default="coordinator", help="username of the coordinator (default: coordinator)"
    )
    p.add_argument("--observer", action="append", default=None, help="read-only username (default: observer)")
    args = p.parse_args(argv)
    fleets: dict[str, list[str]] = {}
    for fleet, *devices in args.fleet:
        fleets.setdefault(fleet, []).extend(devices)
    try:
        sys.stdout.write(render_acl(fleets, args.coordinator, args.observer or ["observer"]))
    except ValueError as exc:
        p.error(str(exc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
