"""Our implementation of the conformance interface (tests/conformance/runner.py): shared.codec + shared.apply.

    python tests/conformance/runner.py --impl ".venv/bin/python tests/conformance/reference_impl.py"

A third party writes the same small loop around its own decoder and apply (docs/PROTOCOL.md §11).
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
from shared.codec import DecodeError, decode  # noqa: E402
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
from shared.topics import PREFIX  # noqa: E402

ON_TOPIC: dict[str, Any] = {  # topic kind -> what may arrive there (PROTOCOL.md §1)
    "plan": RoundPlan, "result": RoundResult, "up": Update, "join": Join, "hb": Heartbeat, "status": Status,
    "sync": SyncRequest, "to": (Replay, CheckpointChunk, ErrorMsg), "run": RunState,
}  # fmt: skip


def _topic(topic: str) -> tuple[str, str]:
    """(kind, client id or "") of meerkat/v1/{fleet}/{kind}[/{arg}]."""
    parts = topic[len(PREFIX) + 1 :].split("/")
    kind, arg = parts[1], parts[2] if len(parts) > 2 else ""
    return kind, arg if kind not in ("result", "plan", "to") else ""


class Receiver:
    """`max_pairs` (tests only) makes it WRONG on purpose: it applies only the first pairs of a result."""

    def __init__(self, max_pairs: int | None = None) -> None:
        self.values: torch.Tensor | None = None
        self.max_pairs = max_pairs

    def handle(self, req: dict[str, Any]) -> dict[str, Any]:
        op = req.get("op")
        if op == "decode":
            kind, client = _topic(req["topic"])
            try:
                m = decode(bytes.fromhex(req["payload"]), ON_TOPIC[kind], client=client)
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
