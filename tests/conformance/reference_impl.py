"""Our implementation of the conformance interface (tests/conformance/runner.py): shared.codec + shared.apply.

    python tests/conformance/runner.py --impl ".venv/bin/python tests/conformance/reference_impl.py"

A third party writes the same small loop around its own decoder and apply (docs/PROTOCOL.md §12).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
for p in (HERE.parents[1], HERE):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from wirejson import to_json  # noqa: E402

from shared.apply import apply_round, values_checksum  # noqa: E402
from shared.codec import DecodeError, ErrorCode, decode  # noqa: E402
from shared.messages import (  # noqa: E402
    CLIENT_FROM_TOPIC,
    CheckpointChunk,
    ErrorMsg,
    Heartbeat,
    Join,
    Replay,
    RoundPlan,
    RoundResult,
    RunState,
    Status,
    SyncRequest,
    Update,
)
from shared.sampling import plan_steps  # noqa: E402
from shared.topics import ID_RE, PREFIX  # noqa: E402

ON_TOPIC: dict[str, Any] = {  # topic kind -> what may arrive there (PROTOCOL.md §1)
    "plan": RoundPlan, "result": RoundResult, "up": Update, "join": Join, "hb": Heartbeat, "status": Status,
    "sync": SyncRequest, "to": (Replay, CheckpointChunk, ErrorMsg), "run": RunState,
}  # fmt: skip
FROM_CLIENT = ("up", "join", "hb", "status", "sync")  # the sender's id is the topic's last level
RETAINED = ("plan", "result_latest", "run", *FROM_CLIENT)  # a zero-length payload there clears a retained message


def _topic(topic: str) -> tuple[str, str, str] | None:
    """(kind, client id or "", fleet) of meerkat/v1/{fleet}/{kind}[/{arg}]; None for a topic that is not
    one of §1 (ignored unread, PROTOCOL.md §2 "Check order" 1). The client id is NOT checked here: an
    invalid one is BAD_CLIENT, the decoder's first check."""
    parts = topic.split("/")
    if len(parts) < 4 or f"{parts[0]}/{parts[1]}" != PREFIX or not ID_RE.match(parts[2]):
        return None
    fleet, kind, rest = parts[2], parts[3], parts[4:]
    if kind in ("plan", "run") and not rest:  # run: 1.3, the run's lifecycle (RunState)
        return kind, "", fleet
    if kind == "result" and len(rest) == 1:
        r = rest[0]
        if r == "latest":
            return "result_latest", "", fleet
        if r.isascii() and r.isdigit() and (r == "0" or r[0] != "0"):
            return "result", "", fleet
        return None
    if kind in FROM_CLIENT and len(rest) == 1:
        return kind, rest[0], fleet
    if kind == "to" and len(rest) == 1 and ID_RE.match(rest[0]):
        return "to", "", fleet
    return None


class Receiver:
    """`max_pairs` (tests only) makes it WRONG on purpose: it applies only the first pairs of a result."""

    def __init__(self, max_pairs: int | None = None) -> None:
        self.values: torch.Tensor | None = None
        self.max_pairs = max_pairs

    def handle(self, req: dict[str, Any]) -> dict[str, Any]:
        op = req.get("op")
        if op == "decode":
            where = _topic(req["topic"])
            if where is None:
                return {"ignored": "foreign_topic"}
            kind, client, fleet = where
            payload = bytes.fromhex(req["payload"])
            try:
                if client and not ID_RE.match(client):  # the topic before the payload (a clear included)
                    raise DecodeError(ErrorCode.BAD_CLIENT, f"client id {client!r}")
                if not payload and kind in RETAINED:
                    return {"ignored": "retained_clear"}
                m = decode(payload, ON_TOPIC[kind.removesuffix("_latest")], client=client, fleet=fleet)
            except DecodeError as exc:
                return {"error": exc.code.name}
            assert type(m) not in CLIENT_FROM_TOPIC or m.client == client
            return {"type": type(m).__name__, "fields": to_json(m)}
        if op == "load":
            raw = np.frombuffer(Path(req["path"]).read_bytes(), dtype="<f4").astype(np.float32)
            self.values = torch.from_numpy(raw.copy())
            return {"values_checksum": values_checksum(self.values)}
        if op == "apply":
            if self.values is None:
                return {"error": "no values loaded"}
            res = decode(bytes.fromhex(req["payload"]), RoundResult)
            n = len(res.seeds) if self.max_pairs is None else self.max_pairs
            self.values = apply_round(self.values, res.seeds[:n], res.scalars[:n], res.lr, res.dist)
            return {"round": res.round, "values_checksum": values_checksum(self.values)}
        if op == "steps":  # 1.3: T_client of a plan (compact: the exceptions, else the sampling rule)
            where = _topic(req["topic"])
            plan = decode(bytes.fromhex(req["payload"]), RoundPlan, fleet=where[2] if where else "")
            return {"steps": plan_steps(plan, req["client"])}
        return {"error": f"unknown op {op!r}"}


def main() -> int:
    args = sys.argv[1:]
    rx = Receiver(int(args[1]) if args[:1] == ["--broken-max-pairs"] else None)
    for line in sys.stdin:
        if line.strip():
            sys.stdout.write(json.dumps(rx.handle(json.loads(line))) + "\n")
            sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
